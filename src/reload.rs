//! Reload triggers: SIGHUP, and polling the certificate files every `tls.reload_interval`
//! when it is above zero. The reload itself is [`Gateway::reload`]: all or nothing, and a
//! failure keeps the previous material.

use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

use crate::gateway::Gateway;

/// Reloads on SIGHUP and when the watched files change, until `stop`.
pub async fn watch(gateway: &Gateway, stop: CancellationToken) {
    let mut hangup = match signal(SignalKind::hangup()) {
        Ok(stream) => Some(stream),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; reload by polling only");
            None
        }
    };
    let interval = gateway.config.tls.reload_interval;
    // Zero disables polling: wait (practically) forever.
    let period = if interval.is_zero() {
        Duration::from_secs(86400 * 365)
    } else {
        interval
    };
    let mut poll = tokio::time::interval(period);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    poll.tick().await;
    let mut seen = gateway.tls.files_fingerprint();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            Some(()) = async { hangup.as_mut()?.recv().await } => {
                tracing::info!("SIGHUP: reloading");
                let _ = gateway.reload();
                seen = gateway.tls.files_fingerprint();
            }
            _ = poll.tick(), if !interval.is_zero() => {
                let now = gateway.tls.files_fingerprint();
                if now != seen {
                    tracing::info!("certificate files changed: reloading");
                    let _ = gateway.reload();
                    seen = now;
                }
            }
        }
    }
}
