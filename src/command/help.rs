//! `HELP` → `OK ` and the verbs, space-separated.

use bytes::Bytes;

use super::{no_argument, After, Reply, Verb};

pub fn apply(arg: Option<Bytes>) -> (Reply, After) {
    if let Err(refusal) = no_argument(&arg) {
        return refusal;
    }
    let verbs: Vec<&str> = Verb::KNOWN.iter().map(|v| v.wire_name()).collect();
    (Reply::ok(verbs.join(" ")), After::Continue)
}
