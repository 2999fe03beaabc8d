//! The background task that keeps this replica's shared state fresh: every
//! `sync_interval`, one script call (see `sync.lua`) publishes the counts, learns the
//! totals and the new bans. Connection failures are retried with exponential backoff; the
//! state changes (up, down) are logged once each and exported as `portcullis_cluster_up`.

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Script};
use tokio_util::sync::CancellationToken;

use super::rate::BUCKETS;
use super::Cluster;
use crate::error::ClusterOp;
use crate::tickets::KEY_LEN;

/// Connecting, and any one exchange, may take this long before Redis counts as down: a
/// slow Redis then costs shared accuracy, never a connection's time.
const REDIS_TIMEOUT: Duration = Duration::from_secs(1);
/// Reconnection backoff bounds.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How often the session-ticket keys are read: a new rotation period is picked up within
/// this, far below any sensible `ticket_rotation`.
const TICKET_REFRESH: Duration = Duration::from_secs(1);

/// What the script returns: Redis' clock (ms), the replica count, the rate totals in batch
/// order, the ban members (`"<key> <until ms>"`) and the next ban cursor.
type SyncReply = (i64, u64, Vec<u64>, Vec<String>, i64);
/// What the ticket script returns: the rotation period, its key and the previous one (hex).
type TicketReply = (u64, String, String);

/// Why one sync failed.
#[derive(Debug, thiserror::Error)]
enum SyncError {
    #[error("{0}")]
    Redis(#[from] redis::RedisError),
    #[error("no answer within {REDIS_TIMEOUT:?}")]
    Timeout,
}

/// The sync loop; `ban` enforces a ban learnt from the cluster (key, until). Returns when
/// `stop` is cancelled.
pub async fn run(cluster: Arc<Cluster>, ban: impl Fn(IpAddr, Instant), stop: CancellationToken) {
    let script = Script::new(include_str!("sync.lua"));
    let tickets = Script::new(include_str!("tickets.lua"));
    let mut link = Link {
        cluster: &cluster,
        script: &script,
        tickets: &tickets,
        tickets_read: None,
        connection: None,
        cursor: 0,
        logged: None,
    };
    let mut backoff = BACKOFF_MIN;
    let mut tick = tokio::time::interval(cluster.settings().sync_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        match link.sync(&ban).await {
            Ok(()) => {
                backoff = BACKOFF_MIN;
                link.state(true, None);
            }
            Err((op, e)) => {
                crate::metrics::cluster_error(op);
                link.state(false, Some(&e));
                link.connection = None;
                link.forget_local();
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.cancelled() => return,
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// The connection and the sync's own state.
struct Link<'a> {
    cluster: &'a Cluster,
    script: &'a Script,
    tickets: &'a Script,
    /// When the ticket keys were last read.
    tickets_read: Option<Instant>,
    /// Dropped on any error, so the next sync reconnects.
    connection: Option<MultiplexedConnection>,
    /// Redis' time of the last ban read, 0 before the first: then all live bans are read.
    cursor: i64,
    /// The state last logged, so each change is logged once.
    logged: Option<bool>,
}

impl Link<'_> {
    async fn sync(&mut self, ban: &impl Fn(IpAddr, Instant)) -> Result<(), (ClusterOp, String)> {
        let connection = match self.connection.clone() {
            Some(c) => c,
            None => {
                let c = self
                    .connect()
                    .await
                    .map_err(|e| (ClusterOp::Connect, e.to_string()))?;
                self.connection = Some(c.clone());
                c
            }
        };
        let started = Instant::now();
        let batch = self.cluster.rate.take_batch();
        let failures = self.take_failures();
        match self.exchange(connection.clone(), &batch, &failures).await {
            Ok(reply) => {
                crate::metrics::cluster_sync(started.elapsed());
                self.apply(&batch, reply, ban);
                self.refresh_tickets(connection).await
            }
            Err(e) => {
                self.cluster.rate.abandon(&batch);
                Err((ClusterOp::Publish, e.to_string()))
            }
        }
    }

    async fn connect(&self) -> Result<MultiplexedConnection, redis::RedisError> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(REDIS_TIMEOUT))
            .set_response_timeout(Some(REDIS_TIMEOUT));
        self.cluster
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
    }

    /// The failures to publish, at most `max_failures + 1` per key (more add nothing).
    fn take_failures(&self) -> Vec<(IpAddr, u32)> {
        let cap = self.cluster.settings().max_failures.saturating_add(1);
        let keys: Vec<IpAddr> = self.cluster.failures.iter().map(|e| *e.key()).collect();
        keys.into_iter()
            .filter_map(|k| self.cluster.failures.remove(&k))
            .map(|(k, n)| (k, n.min(cap)))
            .collect()
    }

    /// Reads (or creates) the shared ticket keys, at most every [`TICKET_REFRESH`].
    async fn refresh_tickets(
        &mut self,
        mut connection: MultiplexedConnection,
    ) -> Result<(), (ClusterOp, String)> {
        if self
            .tickets_read
            .is_some_and(|at| at.elapsed() < TICKET_REFRESH)
        {
            return Ok(());
        }
        let s = self.cluster.settings();
        let rotation = s.ticket_rotation.as_secs().max(1);
        let ttl = millis(s.ticket_rotation * 2 + Duration::from_secs(60));
        let candidate = hex::encode(rand::random::<[u8; KEY_LEN]>());
        let mut call = self.tickets.prepare_invoke();
        call.arg(&s.prefix).arg(rotation).arg(candidate).arg(ttl);
        let reply: TicketReply =
            match tokio::time::timeout(REDIS_TIMEOUT, call.invoke_async(&mut connection)).await {
                Ok(Ok(reply)) => reply,
                Ok(Err(e)) => return Err((ClusterOp::Fetch, e.to_string())),
                Err(_) => return Err((ClusterOp::Fetch, SyncError::Timeout.to_string())),
            };
        self.tickets_read = Some(Instant::now());
        let (period, current, previous) = reply;
        let Some(current) = decode_key(&current) else {
            return Err((ClusterOp::Fetch, "malformed ticket key in Redis".into()));
        };
        let previous = decode_key(&previous);
        self.cluster
            .tickets
            .install_shared(period, &current, previous.as_ref());
        Ok(())
    }

    /// One script call.
    async fn exchange(
        &self,
        mut connection: MultiplexedConnection,
        batch: &[(IpAddr, u64)],
        failures: &[(IpAddr, u32)],
    ) -> Result<SyncReply, SyncError> {
        let s = self.cluster.settings();
        let prefix = &s.prefix;
        let mut call = self.script.prepare_invoke();
        call.key(format!("{prefix}replicas"))
            .key(format!("{prefix}bans"))
            .key(format!("{prefix}banlog"));
        for (key, _) in batch {
            call.key(format!("{prefix}rate:{key}"));
        }
        for (key, _) in failures {
            call.key(format!("{prefix}fail:{key}"));
        }
        call.arg(&self.cluster.replica_id)
            .arg(batch.len())
            .arg(failures.len())
            .arg(self.cursor)
            .arg(millis(s.failure_window))
            .arg(s.max_failures)
            .arg(millis(s.ban_duration).max(1))
            .arg(BUCKETS);
        for (_, count) in batch {
            call.arg(*count);
        }
        for (_, count) in failures {
            call.arg(*count);
        }
        for (key, _) in failures {
            call.arg(key.to_string());
        }
        match tokio::time::timeout(REDIS_TIMEOUT, call.invoke_async(&mut connection)).await {
            Ok(reply) => Ok(reply?),
            Err(_) => Err(SyncError::Timeout),
        }
    }

    fn apply(&mut self, batch: &[(IpAddr, u64)], reply: SyncReply, ban: &impl Fn(IpAddr, Instant)) {
        let (redis_now, replicas, totals, bans, cursor) = reply;
        self.cluster.rate.apply(batch, &totals, replicas);
        self.cursor = cursor;
        let now = Instant::now();
        for member in bans {
            let Some((key, until)) = parse_ban(&member) else {
                tracing::debug!(member, "ignoring a malformed ban entry");
                continue;
            };
            let left = until.saturating_sub(redis_now);
            if left > 0 {
                // `left` comes from Redis: a corrupt entry must not overflow the instant.
                ban(
                    key,
                    crate::deadline::after(now, Duration::from_millis(left as u64)),
                );
            }
        }
    }

    /// Records whether Redis answers; logs and exports each change once.
    fn state(&mut self, up: bool, error: Option<&str>) {
        self.cluster.up.store(up, Ordering::Relaxed);
        if self.logged == Some(up) {
            return;
        }
        self.logged = Some(up);
        crate::metrics::cluster_up(up);
        if up {
            tracing::info!("cluster: Redis answers; sharing limits, bans and ticket keys");
        } else {
            tracing::warn!(
                error = error.unwrap_or(""),
                "cluster: Redis unreachable; each replica enforces its own limits until it is back"
            );
        }
    }

    /// While Redis is down, nothing can be published: drop the failures waiting for it and
    /// the rate entries gone quiet, so that an outage grows no state.
    fn forget_local(&self) {
        self.cluster.failures.clear();
        self.cluster.failures.shrink_to_fit();
        self.cluster.rate.prune();
        self.cluster.rate.shrink();
    }
}

/// A ticket key as Redis holds it: hex.
fn decode_key(text: &str) -> Option<[u8; KEY_LEN]> {
    hex::decode(text).ok()?.try_into().ok()
}

/// `"<client key> <until ms>"`.
fn parse_ban(member: &str) -> Option<(IpAddr, i64)> {
    let (key, until) = member.rsplit_once(' ')?;
    Some((key.parse().ok()?, until.parse().ok()?))
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ban_members_parse_for_both_families() {
        assert_eq!(
            parse_ban("192.0.2.1 1700000000000"),
            Some(("192.0.2.1".parse().unwrap(), 1_700_000_000_000))
        );
        assert_eq!(
            parse_ban("2001:db8:1:2:: 5"),
            Some(("2001:db8:1:2::".parse().unwrap(), 5))
        );
        assert_eq!(parse_ban("garbage"), None);
    }
}
