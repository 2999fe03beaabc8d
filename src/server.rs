//! Bind, accept, drain. The accept loop never dies: out of descriptors (EMFILE), it accepts
//! with a reserved one and resets the connection, so clients are refused rather than left
//! in the backlog; other failures are logged and retried after a back-off. Each connection
//! runs in its own task, tracked so that shutdown can wait for them up to `drain_timeout`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::{TcpListener, TcpSocket};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::descriptors::{is_out_of_descriptors, Reserve};
use crate::error::RejectReason;
use crate::gateway::{Gateway, StartError};
use crate::shutdown::Shutdown;

/// The listen backlog: large enough to absorb bursts without SYN drops.
const BACKLOG: u32 = 1024;
/// Back-off bounds after a failed `accept`.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// After `drain_timeout`, how long forced connections get to finish closing.
const FORCE_GRACE: Duration = Duration::from_secs(1);
/// How often held-back security-log lines are summed up and metric storage is compacted.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(1);

/// A bound, not yet serving, gateway.
pub struct Server {
    listener: TcpListener,
    admin: TcpListener,
    gateway: Arc<Gateway>,
    metrics: PrometheusHandle,
    /// SIGHUP, caught from before the gateway says it is serving: a SIGHUP's default action
    /// ends the process, and a reload sent right after start must reload, not kill it.
    hangup: Option<Signal>,
}

impl Server {
    /// Installs the metrics recorder, builds the gateway and binds both listeners.
    pub fn bind(config: Config, shutdown: Shutdown) -> Result<Server, StartError> {
        let metrics = crate::metrics::install();
        let addr = config.server.listen;
        let admin_addr = config.admin.listen;
        let gateway = Arc::new(Gateway::new(config, shutdown)?);
        let listener = listen(addr).map_err(|source| StartError::Bind { addr, source })?;
        let admin = listen(admin_addr).map_err(|source| StartError::Bind {
            addr: admin_addr,
            source,
        })?;
        let hangup = signal(SignalKind::hangup())
            .inspect_err(
                |e| tracing::warn!(error = %e, "cannot listen for SIGHUP; reload by polling only"),
            )
            .ok();
        Ok(Server {
            listener,
            admin,
            gateway,
            metrics,
            hangup,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn admin_addr(&self) -> std::io::Result<SocketAddr> {
        self.admin.local_addr()
    }

    pub fn gateway(&self) -> &Arc<Gateway> {
        &self.gateway
    }

    /// Accepts until the drain begins (plus `shutdown_delay`), then waits for connections to
    /// finish, up to `drain_timeout` (or a second signal), and returns. The admin listener
    /// answers until then.
    pub async fn run(self) {
        let Server {
            listener,
            admin,
            gateway,
            metrics,
            hangup,
        } = self;
        let tracker = TaskTracker::new();
        let shutdown = gateway.shutdown.clone();
        let stopped = CancellationToken::new();
        let background = tokio::spawn(background(
            gateway.clone(),
            metrics.clone(),
            admin,
            hangup,
            stopped.clone(),
        ));
        let stop_accepting = async {
            shutdown.drain.cancelled().await;
            let delay = gateway.config().server.shutdown_delay;
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.force.cancelled() => {}
            }
        };
        tokio::select! {
            _ = accept_loop(&listener, &gateway, &tracker) => {}
            _ = stop_accepting => {}
        }
        drop(listener);
        shutdown.closing.cancel();
        tracker.close();
        tracing::info!(connections = tracker.len(), "listener closed; draining");
        let drain_timeout = gateway.config().server.drain_timeout;
        tokio::select! {
            _ = tracker.wait() => {}
            _ = tokio::time::sleep(drain_timeout) => {
                tracing::warn!(connections = tracker.len(), "drain_timeout reached: closing the rest");
            }
            _ = shutdown.force.cancelled() => {}
        }
        shutdown.force.cancel();
        let _ = tokio::time::timeout(FORCE_GRACE, tracker.wait()).await;
        stopped.cancel();
        let _ = background.await;
        tracing::info!("drained");
    }
}

/// The admin listener, limiter pruning, metric upkeep and reloads, until `stop`.
async fn background(
    gateway: Arc<Gateway>,
    metrics: PrometheusHandle,
    admin: TcpListener,
    hangup: Option<Signal>,
    stop: CancellationToken,
) {
    // The admin listener answers through the drain and stops when it is forced to end (the
    // deadline or a second signal): from then on it bounds its own close, so it never holds
    // up the exit.
    let admin_task = tokio::spawn(crate::admin::serve(
        admin,
        gateway.clone(),
        metrics.clone(),
        gateway.shutdown.force.clone(),
    ));
    let pruning = async {
        loop {
            // Read every time round: a reload may change it.
            let interval = gateway.config().limits.prune_interval;
            tokio::select! {
                _ = tokio::time::sleep(interval) => gateway.admission.prune(),
                _ = stop.cancelled() => return,
            }
        }
    };
    let upkeep = async {
        let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    crate::metrics::flush_security_log();
                    crate::logging::flush_suppressed();
                    metrics.run_upkeep();
                }
                _ = stop.cancelled() => return,
            }
        }
    };
    let reloads = crate::reload::watch(&gateway, hangup, stop.clone());
    let health = async {
        if let Some(upstream) = gateway.service.upstream() {
            upstream.check_health(stop.clone()).await;
        }
    };
    let cluster = async {
        if let Some(cluster) = gateway.cluster.clone() {
            crate::cluster::sync::run(cluster, &*gateway, stop.clone()).await;
        }
    };
    tokio::join!(pruning, upkeep, reloads, health, cluster);
    let _ = admin_task.await;
}

/// A listener with `SO_REUSEADDR` (restart while old connections sit in TIME_WAIT) and a
/// deep backlog. An IPv6 wildcard is dual-stack where the OS allows it.
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

async fn accept_loop(listener: &TcpListener, gateway: &Arc<Gateway>, tracker: &TaskTracker) {
    let mut backoff = ACCEPT_BACKOFF_MIN;
    let mut reserve = Reserve::new();
    let decision_time = crate::metrics::accept_duration();
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                backoff = ACCEPT_BACKOFF_MIN;
                let started = Instant::now();
                if let Some(accepted) = crate::session::accept(stream, peer, gateway) {
                    tracker.spawn(crate::session::run(accepted, gateway.clone()));
                }
                decision_time.record(started.elapsed());
            }
            Err(e) if is_per_connection(&e) => {
                tracing::debug!(error = %e, "accept: connection gone before it was accepted");
            }
            Err(e) if is_out_of_descriptors(&e) && refuse_with_reserve(listener, &mut reserve) => {
                tracing::warn!(error = %e, "accept failed: out of file descriptors; refusing new connections");
            }
            Err(e) => {
                // EMFILE, ENFILE, ENOBUFS, ENOMEM: waiting is the only cure; retrying at
                // once would spin on the same error.
                tracing::warn!(error = %e, backoff_ms = backoff.as_millis() as u64, "accept failed; backing off");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
            }
        }
    }
}

/// Out of descriptors: the reserve takes the connection waiting in the backlog, which is
/// refused (reset) rather than left there to time out. False when there was nothing to take
/// or no descriptor to take it with: the caller backs off.
fn refuse_with_reserve(listener: &TcpListener, reserve: &mut Reserve) -> bool {
    reserve.refuse_one(listener, |stream, peer| {
        crate::session::refuse_unaccepted(&stream, peer, RejectReason::MaxConnections);
    })
}

/// Errors about one connection that vanished during accept; the listener is fine.
fn is_per_connection(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock
    )
}
