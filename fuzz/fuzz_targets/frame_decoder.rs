//! Binary framing (`FramingMode::Binary`, max_frame_bytes 1024): arbitrary bytes, delivered
//! in chunks of 1..=64 bytes (chosen by the first input byte), must never panic the decoder,
//! never yield a request over 1024 bytes, and never leave more than 1024 + 4 + chunk bytes
//! buffered. Decoding stops at the first error, as the connection would.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use portcullis::codec::{Message, MessageCodec};
use portcullis::config::FramingMode;

const MAX_FRAME: usize = 1024;

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(first % 64) + 1;
    let mut codec = MessageCodec::new(FramingMode::Binary, MAX_FRAME, 256);
    let mut buf = BytesMut::new();
    for piece in rest.chunks(chunk) {
        buf.extend_from_slice(piece);
        assert!(buf.len() <= MAX_FRAME + 4 + chunk, "buffered {} bytes", buf.len());
        loop {
            match codec.decode_message(&mut buf) {
                Ok(Some(Message::Request(b))) => assert!(b.len() <= MAX_FRAME, "request of {} bytes", b.len()),
                Ok(Some(Message::Heartbeat)) => {}
                Ok(None) => break,
                Err(_) => return,
            }
        }
        assert!(buf.len() <= MAX_FRAME + 4 + chunk, "buffered {} bytes", buf.len());
    }
});
