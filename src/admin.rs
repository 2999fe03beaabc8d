//! The admin HTTP listener: `/metrics` (Prometheus text), `/healthz` (200 while the process
//! runs), `/readyz` (200 while accepting, 503 from the moment a drain begins), 404 for the
//! rest. Loopback by default: metrics describe the attack surface and are not public.
//!
//! Bounded like the gateway itself: at most `admin.max_connections` at once (more are closed
//! at accept) and each closed after `admin.idle_timeout` without traffic, so a slow or idle
//! client cannot hold the listener.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

use crate::gateway::Gateway;

#[derive(Clone)]
struct AdminState {
    gateway: Arc<Gateway>,
    metrics: PrometheusHandle,
}

/// Serves until `stop` is cancelled.
pub async fn serve(
    listener: TcpListener,
    gateway: Arc<Gateway>,
    metrics: PrometheusHandle,
    stop: CancellationToken,
) {
    let listener = BoundedListener {
        inner: listener,
        permits: Arc::new(Semaphore::new(gateway.config.admin.max_connections)),
        idle_timeout: gateway.config.admin.idle_timeout,
    };
    let router = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found\n") })
        .with_state(AdminState { gateway, metrics });
    let result = axum::serve(listener, router)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "admin listener failed");
    }
}

async fn render_metrics(State(state): State<AdminState>) -> impl IntoResponse {
    let admission = &state.gateway.admission;
    crate::metrics::limiter_keys(admission.keys());
    crate::metrics::connections_active(admission.active());
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
    } else {
        (StatusCode::OK, "ready\n")
    }
}

/// The admin TCP listener with a connection cap and an idle timeout per connection.
struct BoundedListener {
    inner: TcpListener,
    permits: Arc<Semaphore>,
    idle_timeout: Duration,
}

impl axum::serve::Listener for BoundedListener {
    type Io = IdleTimeoutIo;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (stream, addr) = match self.inner.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::debug!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            // Over the cap: closed at once rather than queued.
            let Ok(permit) = self.permits.clone().try_acquire_owned() else {
                continue;
            };
            let io = IdleTimeoutIo {
                inner: stream,
                timeout: self.idle_timeout,
                deadline: Box::pin(tokio::time::sleep(self.idle_timeout)),
                _permit: permit,
            };
            return (io, addr);
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// A TCP stream that fails with `TimedOut` once no byte has moved for `timeout`, and holds
/// its admin connection permit until dropped.
struct IdleTimeoutIo {
    inner: TcpStream,
    timeout: Duration,
    deadline: Pin<Box<Sleep>>,
    _permit: OwnedSemaphorePermit,
}

impl IdleTimeoutIo {
    /// Pushes the deadline back after progress; checks it while waiting.
    fn check<T>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match poll {
            Poll::Ready(result) => {
                self.deadline.as_mut().reset(Instant::now() + self.timeout);
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
