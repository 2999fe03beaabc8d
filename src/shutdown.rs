//! Signals → cancellation tokens. The first SIGTERM/SIGINT starts the drain; a second skips
//! the wait. The stages, in order: `drain` (readiness turns 503, everything else goes on as
//! before for `shutdown_delay`), `closing` (the listener closes, idle connections are closed,
//! in-flight requests finish), `force` (at `drain_timeout` or a second signal: close all).

use tokio_util::sync::CancellationToken;

/// The two stages of shutdown.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    /// Cancelled when the drain begins: `/readyz` answers 503 so that load balancers stop
    /// sending, while new connections are still served for `shutdown_delay`.
    pub drain: CancellationToken,
    /// Cancelled when `shutdown_delay` is over: the listener closes, connections waiting
    /// for a request are closed, requests in flight finish.
    pub closing: CancellationToken,
    /// Cancelled when the drain deadline passes or a second signal arrives: close everything.
    pub force: CancellationToken,
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// True once the drain has begun (`/readyz` answers 503 from then on).
    pub fn is_draining(&self) -> bool {
        self.drain.is_cancelled()
    }

    /// Cancels `drain` on the first SIGTERM or SIGINT and `force` on the second.
    pub fn listen_for_signals(&self) -> std::io::Result<()> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let this = self.clone();
        tokio::spawn(async move {
            let mut seen = 0;
            loop {
                tokio::select! {
                    _ = term.recv() => {},
                    _ = int.recv() => {},
                }
                seen += 1;
                if seen == 1 {
                    tracing::info!("shutdown signal: draining (send it again to skip the wait)");
                    this.drain.cancel();
                } else {
                    tracing::warn!("second shutdown signal: closing every connection now");
                    this.force.cancel();
                    return;
                }
            }
        });
        Ok(())
    }
}
