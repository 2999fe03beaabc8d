//! stream mode (SPEC section 6): after authentication the bytes are relayed as they are,
//! both ways, through two fixed buffers. Each side's EOF is passed on (close_notify to the
//! client, a write shutdown to the upstream) once what it sent was delivered, and the other
//! direction goes on until it ends too. The connection is idle, and closed, when no byte
//! has moved either way for `idle_timeout`. A relayed connection stays under the rules of
//! every other one: a reload or an admin ban makes it check itself again (revoked token,
//! denied address), and `max_connection_lifetime` ends it.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::relay::Link;
use crate::error::{CloseReason, UpstreamError};
use crate::metrics::{self, UpstreamDirection};
use crate::wake_gate::WakeGate;

/// Each direction's buffer: what one connection holds, at most, in flight each way.
const BUFFER: usize = 16 * 1024;

/// Why relaying stops early.
pub struct Stops<'a> {
    /// `drain_timeout` is over (SIGTERM leaves relayed connections until then).
    pub force: &'a CancellationToken,
    pub banned: &'a CancellationToken,
    /// The token the next change of rules (reload, admin ban) cancels.
    pub subscribe: &'a (dyn Fn() -> CancellationToken + Sync),
    /// Run again after each change: whether the connection may stay, else why it closes.
    pub still_allowed: &'a (dyn Fn() -> Result<(), CloseReason> + Sync),
    /// The time limits in force: read at the start and again after each change, so that a
    /// reload's `idle_timeout` and `max_connection_lifetime` apply to open relays too.
    pub limits: &'a (dyn Fn() -> Limits + Sync),
}

/// A relay's time limits under the configuration in force.
#[derive(Clone, Copy)]
pub struct Limits {
    pub idle_timeout: Duration,
    /// When `max_connection_lifetime` ends the connection, if it is set.
    pub lifetime_end: Option<Instant>,
}

/// Relays `client` and the link's upstream until both directions have ended. `pending`
/// are client bytes read past the `AUTH` line: they go first, after the PROXY header.
pub async fn relay<C>(client: &mut C, link: Link, pending: Bytes, stops: Stops<'_>) -> CloseReason
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let (upstream, queued, _slot) = link.into_parts();
    let state = Arc::new(State::default());
    let mut upstream = Watched {
        inner: upstream,
        side: Side::Upstream,
        state: state.clone(),
    };
    let start = async {
        upstream.write_all(&queued).await?;
        upstream.write_all(&pending).await
    };
    if let Err(e) = start.await {
        return upstream_failed(&e);
    }
    let mut client = Watched {
        inner: client,
        side: Side::Client,
        state: state.clone(),
    };
    let copy = tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, BUFFER, BUFFER);
    let mut limits = (stops.limits)();
    let idle = tokio::time::sleep(limits.idle_timeout);
    let lifetime = tokio::time::sleep_until(limits.lifetime_end.unwrap_or_else(Instant::now));
    let changed = (stops.subscribe)().cancelled_owned();
    // A change that landed while the upstream connect was under way, before this
    // subscription, is seen by checking once now.
    if let Err(reason) = (stops.still_allowed)() {
        return reason;
    }
    let force = stops.force.cancelled();
    let banned = stops.banned.cancelled();
    tokio::pin!(copy, idle, lifetime, changed, force, banned);
    // The stops are polled through the gate, only once one of them has woken: not at every
    // read and write of the copy.
    let gate = WakeGate::new();
    loop {
        let woke = std::future::poll_fn(|cx| {
            if gate.woken(cx) {
                let mut gated = gate.context();
                let stop = if force.as_mut().poll(&mut gated).is_ready() {
                    Some(Stop::Force)
                } else if banned.as_mut().poll(&mut gated).is_ready() {
                    Some(Stop::Banned)
                } else if limits.lifetime_end.is_some()
                    && lifetime.as_mut().poll(&mut gated).is_ready()
                {
                    Some(Stop::Lifetime)
                } else if changed.as_mut().poll(&mut gated).is_ready() {
                    Some(Stop::Changed)
                } else if idle.as_mut().poll(&mut gated).is_ready() {
                    Some(Stop::Idle)
                } else {
                    None
                };
                if let Some(stop) = stop {
                    // Ready ones are replaced or reset: poll them all again next time.
                    gate.rearm();
                    return Poll::Ready(Err(stop));
                }
            }
            copy.as_mut().poll(cx).map(Ok)
        })
        .await;
        match woke {
            Ok(result) => return finished(result, &state),
            Err(Stop::Force) => return CloseReason::Shutdown,
            Err(Stop::Banned) => return CloseReason::Banned,
            Err(Stop::Lifetime) => return CloseReason::Lifetime,
            Err(Stop::Changed) => {
                // Subscribe again before checking, so that no change is missed.
                changed.set((stops.subscribe)().cancelled_owned());
                if let Err(reason) = (stops.still_allowed)() {
                    return reason;
                }
                limits = (stops.limits)();
                let next =
                    crate::deadline::after(state.last_activity().into_std(), limits.idle_timeout);
                idle.as_mut().reset(Instant::from_std(next));
                if let Some(end) = limits.lifetime_end {
                    lifetime.as_mut().reset(end);
                }
            }
            Err(Stop::Idle) => {
                let last = state.last_activity();
                if last.elapsed() >= limits.idle_timeout {
                    return CloseReason::IdleTimeout;
                }
                let next = crate::deadline::after(last.into_std(), limits.idle_timeout);
                idle.as_mut().reset(Instant::from_std(next));
            }
        }
    }
}

/// What interrupts the relay before both directions have ended.
enum Stop {
    Force,
    Banned,
    Lifetime,
    /// The rules changed (reload, admin ban): the connection checks itself again.
    Changed,
    /// The idle timer fired: closed if nothing moved since it was set.
    Idle,
}

/// The close reason once both directions ended or one failed.
fn finished(result: io::Result<(u64, u64)>, state: &State) -> CloseReason {
    match result {
        Ok(_) if state.first_eof() == Some(Side::Upstream) => CloseReason::UpstreamClosed,
        Ok(_) => CloseReason::ClientClose,
        Err(e) if state.failed() == Some(Side::Upstream) => upstream_failed(&e),
        Err(_) => CloseReason::IoError,
    }
}

fn upstream_failed(e: &io::Error) -> CloseReason {
    tracing::debug!(error = %e, "upstream failed mid-stream");
    metrics::upstream_error(UpstreamError::Reset);
    CloseReason::UpstreamError
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Client = 1,
    Upstream = 2,
}

/// What the two sides did, shared by their wrappers.
struct State {
    started: Instant,
    /// Milliseconds since `started` of the last byte moved either way.
    last_ms: std::sync::atomic::AtomicU64,
    first_eof: AtomicU8,
    failed: AtomicU8,
}

impl Default for State {
    fn default() -> Self {
        State {
            started: Instant::now(),
            last_ms: 0.into(),
            first_eof: AtomicU8::new(0),
            failed: AtomicU8::new(0),
        }
    }
}

impl State {
    fn touch(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last_activity(&self) -> Instant {
        self.started + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    fn side(value: u8) -> Option<Side> {
        match value {
            1 => Some(Side::Client),
            2 => Some(Side::Upstream),
            _ => None,
        }
    }

    fn first_eof(&self) -> Option<Side> {
        Self::side(self.first_eof.load(Ordering::Relaxed))
    }

    fn failed(&self) -> Option<Side> {
        Self::side(self.failed.load(Ordering::Relaxed))
    }

    fn mark(slot: &AtomicU8, side: Side) {
        let _ = slot.compare_exchange(0, side as u8, Ordering::Relaxed, Ordering::Relaxed);
    }
}

/// One side of the relay, noting activity, EOF and failure, and counting the bytes read.
struct Watched<S> {
    inner: S,
    side: Side,
    state: Arc<State>,
}

impl<S> Watched<S> {
    fn note<T>(&self, poll: &Poll<io::Result<T>>) {
        if let Poll::Ready(Err(_)) = poll {
            State::mark(&self.state.failed, self.side);
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.note(&poll);
        if let Poll::Ready(Ok(())) = poll {
            let n = buf.filled().len() - before;
            if n == 0 {
                State::mark(&self.state.first_eof, self.side);
            } else {
                self.state.touch();
                let direction = match self.side {
                    Side::Client => UpstreamDirection::ToUpstream,
                    Side::Upstream => UpstreamDirection::FromUpstream,
                };
                metrics::upstream_traffic(direction, 1, n as u64);
            }
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.note(&poll);
        if let Poll::Ready(Ok(_)) = poll {
            self.state.touch();
        }
        poll
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        self.note(&poll);
        poll
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
