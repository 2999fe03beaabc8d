//! Text framing (`FramingMode::Text`, max_line_bytes 256): arbitrary bytes, delivered in
//! chunks of 1..=64 bytes (chosen by the first input byte), must never panic the decoder,
//! never yield a request over 256 bytes or holding a `\n`, and never leave more than
//! 256 + 2 + chunk bytes buffered. Only one trailing `\r` is dropped ("a\r\r\n" is "a\r"),
//! so a trailing `\r` in a request is not an error. Decoding stops at the first error.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use portcullis::codec::{Message, MessageCodec};
use portcullis::config::FramingMode;

const MAX_LINE: usize = 256;

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(first % 64) + 1;
    let mut codec = MessageCodec::new(FramingMode::Text, 1024, MAX_LINE);
    let mut buf = BytesMut::new();
    for piece in rest.chunks(chunk) {
        buf.extend_from_slice(piece);
        assert!(buf.len() <= MAX_LINE + 2 + chunk, "buffered {} bytes", buf.len());
        loop {
            match codec.decode_message(&mut buf) {
                Ok(Some(Message::Request(b))) => {
                    assert!(b.len() <= MAX_LINE, "request of {} bytes", b.len());
                    assert!(!b.contains(&b'\n'), "request holds a newline: {b:?}");
                }
                Ok(Some(Message::Heartbeat)) => {}
                Ok(None) => break,
                Err(_) => return,
            }
        }
        assert!(buf.len() <= MAX_LINE + 2 + chunk, "buffered {} bytes", buf.len());
    }
});
