//! The admin HTTP listener: `/metrics` (Prometheus text), `/healthz` (200 while the process
//! runs), `/readyz` (200 while accepting, 503 from the moment a drain begins and while no
//! upstream server is up), the ban endpoints of [`crate::admin_bans`], 404 for the rest. Loopback by default: metrics describe the
//! attack surface and are not public.
//!
//! Bounded like the gateway itself, so that no client can hold the listener or the process:
//! - at most `admin.max_connections` at once; at the cap the connection open longest is
//!   closed to make room, so a trickle of slow clients cannot lock out the health check;
//! - a request's headers must arrive whole within `admin.header_timeout`, however slowly
//!   they trickle (hyper's header timer, which needs the tokio timer set here);
//! - a connection with no traffic for `admin.idle_timeout` is closed;
//! - when `stop` fires, open connections get [`CLOSE_GRACE`] to finish a response and are
//!   then dropped: the admin listener never holds up the process's exit.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::{ConnectInfo, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Extension, Router};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;

use crate::config::AdminSection;
use crate::gateway::Gateway;

/// After `stop`, how long open admin connections may take to finish a response. A response
/// is rendered in microseconds; only a client that does not read needs this bound.
pub const CLOSE_GRACE: Duration = Duration::from_millis(500);
/// Pause after a failed admin `accept` (EMFILE and friends), so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);

#[derive(Clone)]
struct AdminState {
    gateway: Arc<Gateway>,
    metrics: PrometheusHandle,
}

/// Serves until `stop` is cancelled, then closes every admin connection within
/// [`CLOSE_GRACE`].
pub async fn serve(
    listener: TcpListener,
    gateway: Arc<Gateway>,
    metrics: PrometheusHandle,
    stop: CancellationToken,
) {
    let config = gateway.config();
    let limits = Limits::from(&config.admin);
    let slots = Arc::new(Slots::new(config.admin.max_connections));
    let router = router(AdminState { gateway, metrics });
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let slot = slots.take();
                    // The source address, for the log line of each admin write.
                    let router = router.clone().layer(Extension(ConnectInfo(peer)));
                    let serving = serve_connection(stream, router, slot, limits, stop.clone());
                    connections.spawn(serving);
                }
                Err(e) => {
                    tracing::debug!(error = %e, "admin accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            _ = stop.cancelled() => break,
        }
    }
    drop(listener);
    let finished = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(CLOSE_GRACE, finished).await.is_err() {
        tracing::debug!(
            connections = connections.len(),
            "admin connections dropped at exit"
        );
    }
    // Dropping the set aborts whatever is still open.
}

fn router(state: AdminState) -> Router {
    Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found\n") })
        .with_state(state.clone())
        .merge(crate::admin_bans::router(state.gateway))
}

async fn render_metrics(State(state): State<AdminState>) -> impl IntoResponse {
    let admission = &state.gateway.admission;
    crate::metrics::limiter_keys(admission.keys());
    crate::metrics::connections_active(admission.active());
    // Listing /proc/self/fd takes a while with 10,000 connections open: not on a worker.
    if let Err(e) = tokio::task::spawn_blocking(crate::metrics::refresh_process).await {
        tracing::warn!(error = %e, "reading the process metrics failed");
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

async fn ready(State(state): State<AdminState>) -> impl IntoResponse {
    if state.gateway.shutdown.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n")
    } else if !state.gateway.service.is_ready() {
        (StatusCode::SERVICE_UNAVAILABLE, "no upstream server up\n")
    } else {
        (StatusCode::OK, "ready\n")
    }
}

/// The per-connection time limits of `[admin]`.
#[derive(Debug, Clone, Copy)]
struct Limits {
    header_timeout: Duration,
    idle_timeout: Duration,
}

impl From<&AdminSection> for Limits {
    fn from(admin: &AdminSection) -> Self {
        Limits {
            header_timeout: admin.header_timeout,
            idle_timeout: admin.idle_timeout,
        }
    }
}

/// One admin connection: HTTP/1.1 with a header deadline, until it ends, is evicted to make
/// room for a newer one, or `stop` fires (then it may finish its response).
async fn serve_connection(
    stream: TcpStream,
    router: Router,
    slot: Slot,
    limits: Limits,
    stop: CancellationToken,
) {
    let io = TokioIo::new(IdleTimeoutIo::new(stream, limits.idle_timeout));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let connection = builder.serve_connection(io, TowerToHyperService::new(router));
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(error = %e, "admin connection ended with an error");
            }
            return;
        }
        _ = slot.evicted.cancelled() => {
            tracing::debug!("admin connection closed to make room for a newer one");
            return;
        }
        _ = stop.cancelled() => {}
    }
    // Keep-alive off: an idle connection closes now, one mid-request after its response.
    connection.as_mut().graceful_shutdown();
    let _ = connection.await;
}

/// The admin connections open now, oldest first, at most `cap` of them.
struct Slots {
    cap: usize,
    open: Mutex<OpenConnections>,
}

#[derive(Default)]
struct OpenConnections {
    next_id: u64,
    /// By id, so the first entry is the oldest; each token evicts its connection.
    by_age: BTreeMap<u64, CancellationToken>,
}

impl Slots {
    fn new(cap: usize) -> Self {
        Slots {
            cap,
            open: Mutex::new(OpenConnections::default()),
        }
    }

    /// A slot for a new connection; at the cap, the oldest connection is evicted first.
    fn take(self: &Arc<Self>) -> Slot {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        while open.by_age.len() >= self.cap {
            match open.by_age.pop_first() {
                Some((_, oldest)) => oldest.cancel(),
                None => break,
            }
        }
        let id = open.next_id;
        open.next_id += 1;
        let evicted = CancellationToken::new();
        open.by_age.insert(id, evicted.clone());
        Slot {
            slots: self.clone(),
            id,
            evicted,
        }
    }
}

/// A connection's place among the open ones; freed when dropped.
struct Slot {
    slots: Arc<Slots>,
    id: u64,
    /// Cancelled when a newer connection needs the place.
    evicted: CancellationToken,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self
            .slots
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        open.by_age.remove(&self.id);
    }
}

/// A TCP stream that fails with `TimedOut` once no byte has moved for `timeout`.
struct IdleTimeoutIo {
    inner: TcpStream,
    timeout: Duration,
    deadline: Pin<Box<Sleep>>,
}

impl IdleTimeoutIo {
    fn new(inner: TcpStream, timeout: Duration) -> Self {
        IdleTimeoutIo {
            inner,
            timeout,
            deadline: Box::pin(tokio::time::sleep(timeout)),
        }
    }

    /// Pushes the deadline back after progress; checks it while waiting.
    fn check<T>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match poll {
            Poll::Ready(result) => {
                self.deadline
                    .as_mut()
                    .reset(crate::deadline::from_now(self.timeout));
                Poll::Ready(result)
            }
            Poll::Pending => match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::ErrorKind::TimedOut.into())),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl AsyncRead for IdleTimeoutIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.check(cx, poll)
    }
}

impl AsyncWrite for IdleTimeoutIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.check(cx, poll)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        self.check(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_the_cap_the_oldest_connection_is_evicted() {
        let slots = Arc::new(Slots::new(2));
        let first = slots.take();
        let second = slots.take();
        assert!(!first.evicted.is_cancelled());
        let third = slots.take();
        assert!(first.evicted.is_cancelled(), "the oldest makes room");
        assert!(!second.evicted.is_cancelled());
        drop(first);
        drop(second);
        let fourth = slots.take();
        assert!(!third.evicted.is_cancelled(), "a freed slot is reused");
        assert!(!fourth.evicted.is_cancelled());
    }
}
