//! `PING` → `OK PONG`: liveness, served before authentication.

use bytes::Bytes;

use super::{no_argument, After, Reply};

pub fn apply(arg: Option<Bytes>) -> (Reply, After) {
    if let Err(refusal) = no_argument(&arg) {
        return refusal;
    }
    (Reply::ok("PONG"), After::Continue)
}
