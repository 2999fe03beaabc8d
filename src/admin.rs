//! The admin HTTP listener: `/metrics` (Prometheus text), `/healthz` (200 while the process
//! runs), `/readyz` (200 while accepting, 503 from the moment a drain begins), 404 for the
//! rest. Loopback by default: metrics describe the attack surface and are not public.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::server::Gateway;

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
