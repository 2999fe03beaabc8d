//! Active health checks: every `health_interval`, each server gets a TCP connect (and,
//! with `send_proxy = "v2"`, a PROXY v2 LOCAL header, so that it knows the connection
//! carries no client), under `connect_timeout`. Results feed the same rise/fall state as
//! the passive failures of real connects. With `health_interval = "0s"` there are no
//! active checks: a down server is retried by a real connection every 10 s instead.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::pool::Pool;
use super::{connect_target, proxy_header, Upstream};
use crate::config::SendProxy;

impl Upstream {
    /// Checks every server every `health_interval` until `stop` (the first at once).
    pub async fn check_health(&self, stop: CancellationToken) {
        if self.health_interval.is_zero() {
            return;
        }
        let mut checks = JoinSet::new();
        for index in 0..self.pool.servers.len() {
            checks.spawn(check_loop(
                self.pool.clone(),
                index,
                self.health_interval,
                self.connect_timeout,
                self.send_proxy,
                stop.clone(),
            ));
        }
        while checks.join_next().await.is_some() {}
    }
}

async fn check_loop(
    pool: Arc<Pool>,
    index: usize,
    every: Duration,
    timeout: Duration,
    send_proxy: SendProxy,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let ok = tokio::select! {
            ok = tokio::time::timeout(timeout, check(&pool, index, send_proxy)) => {
                matches!(ok, Ok(Ok(())))
            }
            _ = stop.cancelled() => return,
        };
        pool.record(index, ok);
    }
}

async fn check(pool: &Pool, index: usize, send_proxy: SendProxy) -> std::io::Result<()> {
    let mut io = connect_target(&pool.servers[index].target).await?;
    if send_proxy == SendProxy::V2 {
        io.write_all(&proxy_header::local_v2()).await?;
    }
    io.shutdown().await
}
