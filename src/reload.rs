//! Reload triggers: SIGHUP, and polling the configuration file and the files it names every
//! `tls.reload_interval` when it is above zero. The reload itself is [`Gateway::reload`]:
//! all or nothing, and a failure keeps the previous configuration.

use std::time::SystemTime;

use tokio::signal::unix::Signal;
use tokio_util::sync::CancellationToken;

use crate::gateway::Gateway;

/// Reloads on `hangup` (SIGHUP, registered at bind) and when the watched files change,
/// until `stop`.
pub async fn watch(gateway: &Gateway, mut hangup: Option<Signal>, stop: CancellationToken) {
    let mut seen = fingerprint(gateway);
    loop {
        // Read every time round: a reload may change the interval (0 turns polling off).
        let interval = gateway.config().tls.reload_interval;
        tokio::select! {
            _ = stop.cancelled() => return,
            Some(()) = async { hangup.as_mut()?.recv().await } => {
                tracing::info!("SIGHUP: reloading");
                let _ = gateway.reload();
                seen = fingerprint(gateway);
            }
            _ = tokio::time::sleep(interval), if !interval.is_zero() => {
                if fingerprint(gateway) != seen {
                    tracing::info!("configuration or certificate files changed: reloading");
                    let _ = gateway.reload();
                    seen = fingerprint(gateway);
                }
            }
        }
    }
}

/// Size and modification time of the configuration file and of every TLS file it names.
fn fingerprint(gateway: &Gateway) -> Vec<Option<(u64, SystemTime)>> {
    let source = gateway.config().source.clone();
    let mut files = gateway.tls.files_fingerprint();
    files.extend(source.as_deref().map(crate::tls::file_fingerprint));
    files
}
