//! Message framing: binary length-prefixed frames and text lines, each with a cap that is
//! checked before a byte is buffered for the message (SPEC section 2.1).
//!
//! The decoder is pure (bytes in, messages out) so that it can be unit-tested, property-
//! tested and fuzzed without a socket. Like rustls' deframer, a binary frame is refused as
//! soon as its 4-byte header is read; a text line is refused as soon as more bytes than the
//! cap have arrived without a newline. Neither ever reserves more than `cap + 4` bytes.
//! Until the connection authenticates, the cap in force is the smaller of the framing's cap
//! and `protocol.max_preauth_bytes` (SPEC section 9).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::Decoder;

use crate::config::FramingMode;

/// The framing of one connection, decided by its first byte (or forced by configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// `u32` big-endian length, then that many payload bytes.
    Binary,
    /// One command per `\n`-terminated line.
    Text,
}

impl Framing {
    /// The label and `WHOAMI` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Framing::Binary => "binary",
            Framing::Text => "text",
        }
    }
}

/// One decoded message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A request: the frame's payload, or the line without its `\r\n` / `\n`.
    Request(Bytes),
    /// A zero-length binary frame: keeps the connection alive, gets no reply.
    Heartbeat,
}

/// A message over its cap. The connection must answer `ERR TOO_LARGE <cap>` and close.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{framing:?} message over the cap of {cap} bytes")]
pub struct TooLarge {
    pub framing: Framing,
    pub cap: usize,
}

/// What a [`Decoder`] built on this codec can fail with: `Io` only arises from the
/// `FramedRead` plumbing, never from the codec itself.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error(transparent)]
    TooLarge(#[from] TooLarge),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// The per-connection decoder state.
#[derive(Debug, Clone)]
pub struct MessageCodec {
    /// `None` until the first byte arrives (auto-detection).
    framing: Option<Framing>,
    max_frame_bytes: usize,
    max_line_bytes: usize,
    /// `protocol.max_preauth_bytes` until the connection authenticates: a tighter cap on
    /// both framings, so an unauthenticated client cannot make the gateway reserve a full
    /// frame. `None` once lifted.
    preauth_cap: Option<usize>,
    /// Text mode: how far the buffer is known to hold no `\n`, so that a line trickling in
    /// byte by byte is scanned once, not once per byte.
    scanned: usize,
}

/// The binary header size.
const HEADER_LEN: usize = 4;

impl MessageCodec {
    pub fn new(mode: FramingMode, max_frame_bytes: usize, max_line_bytes: usize) -> Self {
        let framing = match mode {
            FramingMode::Auto => None,
            FramingMode::Binary => Some(Framing::Binary),
            FramingMode::Text => Some(Framing::Text),
        };
        MessageCodec {
            framing,
            max_frame_bytes,
            max_line_bytes,
            preauth_cap: None,
            scanned: 0,
        }
    }

    /// Caps every message at `cap` bytes (when lower than the framing's own cap) until
    /// [`MessageCodec::authenticated`] is called.
    pub fn with_preauth_cap(mut self, cap: usize) -> Self {
        self.preauth_cap = Some(cap);
        self
    }

    /// Lifts the pre-authentication cap: the full caps apply from the next message.
    pub fn authenticated(&mut self) {
        self.preauth_cap = None;
    }

    /// Puts the pre-authentication cap back: a reload made an unauthenticated connection
    /// need authentication again (`auth.mode` no longer "none").
    pub fn unauthenticated(&mut self, cap: usize) {
        self.preauth_cap = Some(cap);
    }

    /// The binary cap in force.
    fn frame_cap(&self) -> usize {
        self.preauth_cap
            .map_or(self.max_frame_bytes, |cap| cap.min(self.max_frame_bytes))
    }

    /// The text cap in force.
    fn line_cap(&self) -> usize {
        self.preauth_cap
            .map_or(self.max_line_bytes, |cap| cap.min(self.max_line_bytes))
    }

    /// The framing, once decided.
    pub fn framing(&self) -> Option<Framing> {
        self.framing
    }

    /// Appends a reply made of `parts` to `dst` in the connection's framing (text when none
    /// was decided yet).
    pub fn encode_reply(&self, parts: &[&[u8]], dst: &mut BytesMut) {
        encode(self.framing.unwrap_or(Framing::Text), parts, dst);
    }

    fn decode_binary(&mut self, src: &mut BytesMut) -> Result<Option<Message>, TooLarge> {
        if src.len() < HEADER_LEN {
            return Ok(None);
        }
        let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
        let cap = self.frame_cap();
        if len > cap {
            return Err(TooLarge {
                framing: Framing::Binary,
                cap,
            });
        }
        if src.len() < HEADER_LEN + len {
            // Safe to reserve: `len` was checked against the cap above.
            src.reserve(HEADER_LEN + len - src.len());
            return Ok(None);
        }
        src.advance(HEADER_LEN);
        if len == 0 {
            return Ok(Some(Message::Heartbeat));
        }
        Ok(Some(Message::Request(src.split_to(len).freeze())))
    }

    fn decode_text(&mut self, src: &mut BytesMut) -> Result<Option<Message>, TooLarge> {
        loop {
            let Some(offset) = memchr::memchr(b'\n', &src[self.scanned..]) else {
                self.scanned = src.len();
                return if self.line_cannot_fit(src) {
                    Err(self.line_too_large())
                } else {
                    Ok(None)
                };
            };
            let newline = self.scanned + offset;
            self.scanned = 0;
            let mut line = src.split_to(newline + 1);
            line.truncate(newline);
            if line.last() == Some(&b'\r') {
                line.truncate(newline - 1);
            }
            if line.len() > self.line_cap() {
                return Err(self.line_too_large());
            }
            if !line.is_empty() {
                return Ok(Some(Message::Request(line.freeze())));
            }
        }
    }

    /// True when the buffered bytes, still without a `\n`, already exceed the cap: more
    /// than `max_line_bytes` of content, even allowing for a final `\r`.
    fn line_cannot_fit(&self, src: &BytesMut) -> bool {
        let cap = self.line_cap();
        src.len() > cap + 1 || (src.len() == cap + 1 && src.last() != Some(&b'\r'))
    }

    fn line_too_large(&self) -> TooLarge {
        TooLarge {
            framing: Framing::Text,
            cap: self.line_cap(),
        }
    }
}

impl Decoder for MessageCodec {
    type Item = Message;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Message>, CodecError> {
        Ok(self.decode_message(src)?)
    }
}

impl MessageCodec {
    /// The framing: as forced, as already decided, or decided now by the first byte of
    /// `src`. `None` while it is unknown and `src` is empty.
    pub fn detect(&mut self, src: &[u8]) -> Option<Framing> {
        if self.framing.is_none() {
            let &first = src.first()?;
            self.framing = Some(if first == 0 {
                Framing::Binary
            } else {
                Framing::Text
            });
        }
        self.framing
    }

    /// Decodes the next message, if a whole one is buffered.
    pub fn decode_message(&mut self, src: &mut BytesMut) -> Result<Option<Message>, TooLarge> {
        let Some(framing) = self.detect(src) else {
            return Ok(None);
        };
        match framing {
            Framing::Binary => self.decode_binary(src),
            Framing::Text => self.decode_text(src),
        }
    }
}

/// The most an emptied message buffer keeps for the next messages. Allocating a buffer
/// for every small message cost a `malloc` and a `free` each (callgrind, relay
/// benchmark); a larger one, left by a burst, is given back so that an idle connection
/// holds little.
pub const KEPT_BUFFER: usize = 1024;

/// Empties `buf`, whose bytes were all written: its allocation stays for the next messages
/// when it is at most [`KEPT_BUFFER`], else it is given back.
pub fn recycle(buf: &mut BytesMut) {
    buf.clear();
    // Written bytes were advanced past, so `capacity` counts only what lies after them;
    // with nothing buffered, reclaiming the front is free and makes it the whole
    // allocation again (false, and nothing done, when there is no front to reclaim).
    let _ = buf.try_reclaim(buf.capacity() + 1);
    if buf.capacity() > KEPT_BUFFER {
        *buf = BytesMut::new();
    }
}

/// Appends one reply, the concatenation of `parts`, in `framing` to `dst`.
pub fn encode(framing: Framing, parts: &[&[u8]], dst: &mut BytesMut) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    match framing {
        Framing::Binary => {
            dst.reserve(HEADER_LEN + len);
            // Replies are built from requests that fit their cap (< 16 MiB) plus a short
            // prefix, so the length always fits in a u32.
            dst.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
        }
        Framing::Text => dst.reserve(len + 1),
    }
    for part in parts {
        dst.extend_from_slice(part);
    }
    if framing == Framing::Text {
        dst.put_u8(b'\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn codec() -> MessageCodec {
        MessageCodec::new(FramingMode::Auto, 16, 8)
    }

    fn decode_all(codec: &mut MessageCodec, bytes: &[u8]) -> Result<Vec<Message>, TooLarge> {
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        while let Some(msg) = codec.decode_message(&mut buf)? {
            out.push(msg);
        }
        Ok(out)
    }

    fn req(b: &[u8]) -> Message {
        Message::Request(Bytes::copy_from_slice(b))
    }

    #[test]
    fn first_byte_decides_framing() {
        let mut c = codec();
        assert_eq!(decode_all(&mut c, b"PING\n").unwrap(), vec![req(b"PING")]);
        assert_eq!(c.framing(), Some(Framing::Text));
        let mut c = codec();
        assert_eq!(
            decode_all(&mut c, b"\0\0\0\x04PING").unwrap(),
            vec![req(b"PING")]
        );
        assert_eq!(c.framing(), Some(Framing::Binary));
    }

    #[test]
    fn text_drops_cr_and_skips_empty_lines() {
        let mut c = codec();
        let got = decode_all(&mut c, b"\r\n\nPING\r\nECHO a\n\r\n").unwrap();
        assert_eq!(got, vec![req(b"PING"), req(b"ECHO a")]);
    }

    #[test]
    fn text_line_at_cap_passes_and_one_over_fails() {
        let mut c = codec();
        assert_eq!(
            decode_all(&mut c, b"12345678\r\n").unwrap(),
            vec![req(b"12345678")]
        );
        let mut c = codec();
        assert_eq!(
            decode_all(&mut c, b"123456789\n"),
            Err(TooLarge {
                framing: Framing::Text,
                cap: 8
            })
        );
    }

    #[test]
    fn text_line_is_refused_before_its_newline_arrives() {
        let mut c = codec();
        // 8 bytes of content and a pending `\r`: may still be a valid line.
        assert_eq!(decode_all(&mut c, b"12345678\r").unwrap(), vec![]);
        let mut c = codec();
        assert!(decode_all(&mut c, b"123456789").is_err());
    }

    #[test]
    fn binary_heartbeat_and_exact_cap() {
        let mut c = codec();
        let mut bytes = vec![0, 0, 0, 0, 0, 0, 0, 16];
        bytes.extend_from_slice(&[0xFF; 16]);
        assert_eq!(
            decode_all(&mut c, &bytes).unwrap(),
            vec![Message::Heartbeat, req(&[0xFF; 16])]
        );
    }

    #[test]
    fn binary_length_is_refused_from_the_header_alone() {
        let mut c = codec();
        let mut buf = BytesMut::from(&[0u8, 0, 0, 17][..]);
        assert_eq!(
            c.decode_message(&mut buf),
            Err(TooLarge {
                framing: Framing::Binary,
                cap: 16
            })
        );
        let mut c = MessageCodec::new(FramingMode::Binary, 16, 8);
        let mut buf = BytesMut::from(&[0xFFu8, 0xFF, 0xFF, 0xFF][..]);
        assert!(c.decode_message(&mut buf).is_err());
        assert!(
            buf.capacity() < 64,
            "nothing was reserved for the claimed length"
        );
    }

    #[test]
    fn preauth_cap_applies_until_authenticated() {
        let mut c = MessageCodec::new(FramingMode::Auto, 65536, 4096).with_preauth_cap(1024);
        let mut buf = BytesMut::from(&[0u8, 1, 0, 0][..]); // announces 64 KiB
        assert_eq!(
            c.decode_message(&mut buf),
            Err(TooLarge {
                framing: Framing::Binary,
                cap: 1024
            })
        );
        assert!(
            buf.capacity() < 1024,
            "nothing reserved for the claimed 64 KiB"
        );

        let mut c = MessageCodec::new(FramingMode::Auto, 65536, 4096).with_preauth_cap(1024);
        let mut buf = BytesMut::from(&frame_of(1024)[..]);
        assert!(
            matches!(c.decode_message(&mut buf), Ok(Some(_))),
            "1024 fits"
        );
        c.authenticated();
        let mut buf = BytesMut::from(&frame_of(65536)[..]);
        assert!(
            matches!(c.decode_message(&mut buf), Ok(Some(_))),
            "full cap after auth"
        );

        let mut c = MessageCodec::new(FramingMode::Text, 65536, 4096).with_preauth_cap(8);
        assert_eq!(
            decode_all(&mut c, b"123456789"),
            Err(TooLarge {
                framing: Framing::Text,
                cap: 8
            })
        );
        // A smaller framing cap wins over the pre-authentication cap.
        let mut c = MessageCodec::new(FramingMode::Text, 65536, 4).with_preauth_cap(8);
        assert!(decode_all(&mut c, b"12345\n").is_err());
    }

    fn frame_of(len: usize) -> Vec<u8> {
        let mut bytes = (len as u32).to_be_bytes().to_vec();
        bytes.resize(4 + len, b'x');
        bytes
    }

    #[test]
    fn replies_use_the_framing() {
        let mut dst = BytesMut::new();
        encode(Framing::Binary, &[b"OK ", b"PONG"], &mut dst);
        encode(Framing::Text, &[b"OK PONG"], &mut dst);
        assert_eq!(&dst[..], b"\0\0\0\x07OK PONGOK PONG\n");
    }

    #[test]
    fn recycle_keeps_a_small_buffer_and_gives_back_a_large_one() {
        let mut small = BytesMut::with_capacity(128);
        small.extend_from_slice(&[1; 100]);
        small.advance(100);
        recycle(&mut small);
        assert!(small.is_empty());
        assert!(
            small.capacity() >= 128,
            "the whole allocation is reusable again"
        );
        let before = small.as_ptr();
        small.extend_from_slice(&[2; 128]);
        assert_eq!(
            small.as_ptr(),
            before,
            "no new allocation for the next message"
        );

        let mut large = BytesMut::with_capacity(64 * 1024);
        large.extend_from_slice(&[1; 60 * 1024]);
        large.advance(60 * 1024);
        recycle(&mut large);
        assert_eq!(large.capacity(), 0, "a burst's buffer is given back");
    }

    fn stream_strategy() -> impl Strategy<Value = (Vec<u8>, Vec<Message>, bool)> {
        let binary = prop::collection::vec(prop::collection::vec(any::<u8>(), 0..=16), 1..8)
            .prop_map(|frames| {
                let mut bytes = Vec::new();
                let mut msgs = Vec::new();
                for f in frames {
                    bytes.extend_from_slice(&(f.len() as u32).to_be_bytes());
                    bytes.extend_from_slice(&f);
                    msgs.push(if f.is_empty() {
                        Message::Heartbeat
                    } else {
                        req(&f)
                    });
                }
                (bytes, msgs, true)
            });
        let text = prop::collection::vec("[A-Za-z0-9 \\x01\\xff]{1,8}", 1..8).prop_map(|lines| {
            let mut bytes = Vec::new();
            let mut msgs = Vec::new();
            for (i, l) in lines.iter().enumerate() {
                // Avoid a leading NUL, which would select binary framing.
                let l = l.as_bytes();
                let l = &l[..l.len().min(8)];
                bytes.extend_from_slice(l);
                bytes.extend_from_slice(if i % 2 == 0 { b"\n" } else { b"\r\n" });
                let trimmed = l.strip_suffix(b"\r").unwrap_or(l);
                if !trimmed.is_empty() {
                    msgs.push(req(trimmed));
                }
            }
            (bytes, msgs, false)
        });
        prop_oneof![binary, text]
    }

    proptest! {
        /// Any split of a valid stream into reads decodes to the same messages.
        #[test]
        fn any_split_decodes_the_same(
            (bytes, expected, _binary) in stream_strategy(),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..10),
        ) {
            let mut points: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
            points.push(bytes.len());
            points.sort_unstable();
            let mut c = codec();
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            let mut start = 0;
            for end in points {
                buf.extend_from_slice(&bytes[start..end]);
                start = end;
                while let Some(m) = c.decode_message(&mut buf).unwrap() {
                    got.push(m);
                }
            }
            prop_assert_eq!(got, expected);
        }

        /// Any announced length above the cap is refused, whatever follows.
        #[test]
        fn any_length_above_cap_is_refused(len in 17u32.., tail in prop::collection::vec(any::<u8>(), 0..32)) {
            let mut c = MessageCodec::new(FramingMode::Binary, 16, 8);
            let mut buf = BytesMut::from(&len.to_be_bytes()[..]);
            buf.extend_from_slice(&tail);
            prop_assert_eq!(c.decode_message(&mut buf), Err(TooLarge { framing: Framing::Binary, cap: 16 }));
            prop_assert!(buf.capacity() < 1024);
        }

        /// Arbitrary bytes never panic and never grow the buffer past the cap.
        #[test]
        fn arbitrary_bytes_are_safe(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let mut c = codec();
            let mut buf = BytesMut::new();
            for chunk in bytes.chunks(7) {
                buf.extend_from_slice(chunk);
                loop {
                    match c.decode_message(&mut buf) {
                        Ok(Some(_)) => continue,
                        Ok(None) => break,
                        Err(_) => return Ok(()),
                    }
                }
                prop_assert!(buf.len() <= 16 + 4 + 7);
            }
        }
    }
}
