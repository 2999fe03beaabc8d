//! Client certificate identity: any bytes given to `certificate_identity` (X.509 parse, SAN
//! and CN extraction, the control-character check) must return without panicking, and an
//! identity it returns never holds a control character (it would inject lines into
//! replies and logs).
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::auth::certificate_identity;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(identity)) = certificate_identity(&data.into()) {
        assert!(!identity.chars().any(char::is_control), "{identity:?}");
    }
});
