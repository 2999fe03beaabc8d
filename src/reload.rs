//! Reload triggers: SIGHUP, and polling the configuration file and the files it names every
//! `tls.reload_interval` when it is above zero. The reload itself is [`Gateway::reload`]:
//! all or nothing, and a failure keeps the previous configuration. It reads files and
//! resolves upstream names, which block, so it runs on tokio's blocking pool: a slow
//! resolver or file never holds up a worker that serves connections.

use std::sync::Arc;
use std::time::SystemTime;

use tokio::signal::unix::Signal;
use tokio_util::sync::CancellationToken;

use crate::gateway::Gateway;

/// Reloads on `hangup` (SIGHUP, registered at bind) and when the watched files change,
/// until `stop`.
pub async fn watch(gateway: &Arc<Gateway>, mut hangup: Option<Signal>, stop: CancellationToken) {
    let mut seen = fingerprint(gateway);
    loop {
        // Read every time round: a reload may change the interval (0 turns polling off).
        let interval = gateway.config().tls.reload_interval;
        tokio::select! {
            _ = stop.cancelled() => return,
            Some(()) = async { hangup.as_mut()?.recv().await } => {
                tracing::info!("SIGHUP: reloading");
                reload(gateway, &stop).await;
                seen = fingerprint(gateway);
            }
            _ = tokio::time::sleep(interval), if !interval.is_zero() => {
                if fingerprint(gateway) != seen {
                    tracing::info!("configuration or certificate files changed: reloading");
                    reload(gateway, &stop).await;
                    seen = fingerprint(gateway);
                }
            }
        }
    }
}

/// One reload, on the blocking pool; its result is logged and counted by
/// [`Gateway::reload`]. `stop` does not wait for it: a reload stuck on a file (a FIFO, a
/// hung network mount) must not hold up the exit.
async fn reload(gateway: &Arc<Gateway>, stop: &CancellationToken) {
    let gateway = gateway.clone();
    let reloading = tokio::task::spawn_blocking(move || gateway.reload());
    tokio::select! {
        _ = reloading => {}
        _ = stop.cancelled() => {}
    }
}

/// Size and modification time of the configuration file and of every TLS file it names.
fn fingerprint(gateway: &Gateway) -> Vec<Option<(u64, SystemTime)>> {
    let source = gateway.config().source.clone();
    let mut files = gateway.tls.files_fingerprint();
    files.extend(source.as_deref().map(crate::tls::file_fingerprint));
    files
}
