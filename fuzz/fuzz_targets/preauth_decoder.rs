//! Auto-detected framing under the pre-authentication cap (`max_frame_bytes` 1024,
//! `max_line_bytes` 256, `max_preauth_bytes` 100): arbitrary bytes, delivered in chunks of
//! 1..=64 bytes (the first input byte's low six bits). While the cap is in force no request
//! exceeds 100 bytes and the buffer never holds more than 100 + 4 + chunk bytes, whatever a
//! header announces. When the first byte's bit 6 is set, a request starting with `AUTH`
//! lifts the cap, as a successful authentication does; from then on the full caps hold.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use portcullis::codec::{Message, MessageCodec};
use portcullis::config::FramingMode;

const MAX_FRAME: usize = 1024;
const MAX_LINE: usize = 256;
const PREAUTH: usize = 100;

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(first % 64) + 1;
    let auth_lifts = first & 0x40 != 0;
    let mut codec = MessageCodec::new(FramingMode::Auto, MAX_FRAME, MAX_LINE).with_preauth_cap(PREAUTH);
    let mut authenticated = false;
    let mut buf = BytesMut::new();
    for piece in rest.chunks(chunk) {
        buf.extend_from_slice(piece);
        let cap = if authenticated { MAX_FRAME } else { PREAUTH };
        assert!(buf.len() <= cap + 4 + chunk, "buffered {} bytes", buf.len());
        loop {
            match codec.decode_message(&mut buf) {
                Ok(Some(Message::Request(b))) => {
                    if !authenticated {
                        assert!(b.len() <= PREAUTH, "pre-auth request of {} bytes", b.len());
                    }
                    assert!(b.len() <= MAX_FRAME, "request of {} bytes", b.len());
                    if auth_lifts && b.starts_with(b"AUTH") {
                        codec.authenticated();
                        authenticated = true;
                    }
                }
                Ok(Some(Message::Heartbeat)) => {}
                Ok(None) => break,
                Err(too_large) => {
                    let expected = if authenticated { too_large.cap } else { PREAUTH };
                    assert_eq!(too_large.cap, expected, "the cap in force is reported");
                    return;
                }
            }
        }
        let cap = if authenticated { MAX_FRAME } else { PREAUTH };
        assert!(buf.len() <= cap + 4 + chunk, "buffered {} bytes", buf.len());
    }
});
