//! messages mode (SPEC section 6): one upstream connection carrying length-prefixed frames
//! both ways, with bounded buffers.
//!
//! A [`Link`] is driven by the client's session: the session forwards the messages it has
//! checked, and takes replies only when its own write buffer has room; the link reads the
//! upstream only while the session can take what it reads, and accepts messages only while
//! its own buffer towards the upstream has room. No queue grows without bound either way.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::pool::ServerSlot;
use super::UpstreamStream;
use crate::error::UpstreamError;
use crate::metrics::{self, UpstreamDirection};

/// The most read from the upstream in one call.
const READ_CHUNK: usize = 8 * 1024;
/// The session stops taking its client's messages while this much waits for the upstream:
/// the queue towards an upstream that does not read holds at most this plus one message
/// (which passed its size cap), on top of what the kernel holds for the socket.
const OUT_CAP: usize = 8 * 1024;
/// The frame header: `u32` big-endian length.
const HEADER_LEN: usize = 4;

/// One relayed upstream connection.
pub struct Link {
    io: UpstreamStream,
    /// Frames (and, first, the PROXY header) not yet written to the upstream. The session
    /// stops reading its client while this holds [`OUT_CAP`] bytes or more.
    out: BytesMut,
    /// `max_write_buffer_bytes` when the connection opened: see [`Link::write_cap`].
    write_cap: usize,
    /// Bytes read from the upstream: at most one frame (checked against `max_reply_bytes`
    /// before it is waited for) plus one read chunk.
    inbuf: BytesMut,
    max_reply_bytes: usize,
    /// Its place on the server (`least_conn`, `max_connections_per_server`, the gauge).
    slot: ServerSlot,
}

/// What the upstream side did.
#[derive(Debug)]
pub enum LinkEvent {
    /// Bytes moved.
    Progress,
    /// The upstream closed its side.
    Closed,
    /// The upstream connection failed.
    Failed(io::Error),
}

impl Link {
    pub(super) fn new(
        io: UpstreamStream,
        header: Vec<u8>,
        write_cap: usize,
        max_reply_bytes: usize,
        slot: ServerSlot,
    ) -> Link {
        Link {
            io,
            out: BytesMut::from(header.as_slice()),
            write_cap,
            inbuf: BytesMut::new(),
            max_reply_bytes,
            slot,
        }
    }

    /// The cap on the client's write buffer for this connection: `max_write_buffer_bytes`
    /// when it opened, which validation keeps at `max_reply_bytes + 64` or more. A reload
    /// does not change it: lowering it under queued replies would close the connection
    /// (SPEC 9: a reload drops none) or, if the session stopped taking messages at the new
    /// cap while still reading its client, buffer the client without bound.
    pub fn write_cap(&self) -> usize {
        self.write_cap
    }

    /// True while another message may be forwarded without exceeding the buffer.
    pub fn has_room(&self) -> bool {
        self.out.len() < OUT_CAP
    }

    /// Queues one message for the upstream as a frame.
    pub fn forward(&mut self, payload: &[u8]) {
        self.out.reserve(HEADER_LEN + payload.len());
        // Payloads passed their cap (< 16 MiB): the length fits a u32.
        self.out
            .put_u32(u32::try_from(payload.len()).unwrap_or(u32::MAX));
        self.out.extend_from_slice(payload);
        metrics::upstream_traffic(UpstreamDirection::ToUpstream, 1, payload.len() as u64);
    }

    /// The next complete upstream message, when one is buffered and its length is at most
    /// `room` (so a reply waits until the client's write buffer can take it). A frame that
    /// announces more than `max_reply_bytes` is an error as soon as its header is read.
    pub fn next_reply(&mut self, room: usize) -> Result<Option<Bytes>, UpstreamError> {
        let Some(len) = self.announced() else {
            return Ok(None);
        };
        if len > self.max_reply_bytes {
            return Err(UpstreamError::ReplyTooLarge);
        }
        if self.inbuf.len() < HEADER_LEN + len || len > room {
            return Ok(None);
        }
        self.inbuf.advance(HEADER_LEN);
        let reply = self.inbuf.split_to(len).freeze();
        metrics::upstream_traffic(UpstreamDirection::FromUpstream, 1, len as u64);
        Ok(Some(reply))
    }

    /// The length the buffered frame header announces.
    fn announced(&self) -> Option<usize> {
        let header: [u8; HEADER_LEN] = self.inbuf.get(..HEADER_LEN)?.try_into().ok()?;
        Some(u32::from_be_bytes(header) as usize)
    }

    /// True while the upstream should be read: no whole frame is waiting (and none too
    /// large is announced). Reading stops there, so a client that does not take its
    /// replies stops the reading of the upstream.
    fn wants_bytes(&self) -> bool {
        match self.announced() {
            None => true,
            Some(len) => len <= self.max_reply_bytes && self.inbuf.len() < HEADER_LEN + len,
        }
    }

    /// Writes queued frames, then (when `may_read`) reads from the upstream.
    pub fn poll_io(&mut self, cx: &mut Context<'_>, may_read: bool) -> Poll<LinkEvent> {
        if !self.out.is_empty() {
            match Pin::new(&mut self.io).poll_write(cx, &self.out) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(LinkEvent::Failed(io::ErrorKind::WriteZero.into()))
                }
                Poll::Ready(Ok(n)) => {
                    self.out.advance(n);
                    if self.out.is_empty() {
                        // Kept for the next frames, unless a burst made it large.
                        crate::codec::recycle(&mut self.out);
                    }
                    return Poll::Ready(LinkEvent::Progress);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(LinkEvent::Failed(e)),
                Poll::Pending => {}
            }
        }
        if !may_read || !self.wants_bytes() {
            return Poll::Pending;
        }
        if self.inbuf.capacity() - self.inbuf.len() < READ_CHUNK / 2 {
            self.inbuf.reserve(READ_CHUNK);
        }
        let read = ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut self.io),
            cx,
            &mut self.inbuf
        ));
        Poll::Ready(match read {
            Ok(0) => LinkEvent::Closed,
            Ok(_) => LinkEvent::Progress,
            Err(e) => LinkEvent::Failed(e),
        })
    }

    /// Delivers what is queued for the upstream, then closes its write side. The caller
    /// bounds this with a timeout.
    pub async fn finish(&mut self) -> io::Result<()> {
        self.io.write_all(&self.out).await?;
        self.out.clear();
        self.io.shutdown().await
    }
}

impl Link {
    /// The upstream connection, what is still queued for it (the PROXY header), and its
    /// server slot: for stream mode, which relays bytes instead of frames.
    pub(super) fn into_parts(self) -> (UpstreamStream, BytesMut, ServerSlot) {
        (self.io, self.out, self.slot)
    }
}
