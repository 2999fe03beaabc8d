//! Active health checks: every `health_interval`, each server gets a TCP connect (and,
//! with `send_proxy = "v2"`, a PROXY v2 LOCAL header, so that it knows the connection
//! carries no client), under `connect_timeout`. Results feed the same rise/fall state as
//! the passive failures of real connects. With `health_interval = "0s"` there are no
//! active checks: a down server is retried by a real connection every 10 s instead.
//!
//! The checks follow the configuration in force: a reload ends those of the generation it
//! replaces (a removed server is checked no more) and starts the new generation's, with
//! its interval, on its servers.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::pool::{Pool, Server};
use super::{connect_target, proxy_header, Generation, Upstream};
use crate::config::SendProxy;

impl Upstream {
    /// Checks every server every `health_interval` until `stop` (the first at once, and
    /// again at once after each reload).
    pub async fn check_health(&self, stop: CancellationToken) {
        while !stop.is_cancelled() {
            let generation = self.current.load_full();
            // Dropping the checks' future aborts their tasks (the JoinSet's drop).
            tokio::select! {
                () = check_all(&generation) => {}
                () = generation.replaced.cancelled() => {}
                () = stop.cancelled() => {}
            }
        }
    }
}

/// Runs the checks of one generation. Never returns: they end when this future is
/// dropped.
async fn check_all(generation: &Generation) {
    if generation.health_interval.is_zero() {
        return std::future::pending().await;
    }
    let mut checks = JoinSet::new();
    for server in &generation.pool.servers {
        checks.spawn(check_loop(
            generation.pool.clone(),
            server.clone(),
            generation.health_interval,
            generation.connect_timeout,
            generation.send_proxy,
        ));
    }
    while checks.join_next().await.is_some() {}
    std::future::pending().await
}

async fn check_loop(
    pool: Arc<Pool>,
    server: Arc<Server>,
    every: Duration,
    timeout: Duration,
    send_proxy: SendProxy,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let ok = tokio::time::timeout(timeout, check(&server, send_proxy)).await;
        pool.record(&server, matches!(ok, Ok(Ok(()))));
    }
}

async fn check(server: &Server, send_proxy: SendProxy) -> std::io::Result<()> {
    let mut io = connect_target(&server.target).await?;
    if send_proxy == SendProxy::V2 {
        io.write_all(&proxy_header::local_v2()).await?;
    }
    io.shutdown().await
}
