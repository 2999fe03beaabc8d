//! `QUIT` → `OK BYE`, then close_notify and close.

use bytes::Bytes;

use super::{no_argument, After, Reply};

pub fn apply(arg: Option<Bytes>) -> (Reply, After) {
    if let Err(refusal) = no_argument(&arg) {
        return refusal;
    }
    (Reply::ok("BYE"), After::Close)
}
