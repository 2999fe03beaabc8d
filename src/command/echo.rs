//! `ECHO <data>` → `OK <data>`, byte-exact (the data is a slice of the request, not a copy).

use bytes::Bytes;

use super::{After, Reply};
use crate::error::ErrorCode;

pub fn apply(arg: Option<Bytes>) -> (Reply, After) {
    match arg {
        Some(data) => (Reply::Ok(data), After::Continue),
        None => (
            Reply::Err(ErrorCode::BadRequest, "usage: ECHO <data>"),
            After::Continue,
        ),
    }
}
