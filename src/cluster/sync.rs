//! The background task that keeps this replica's shared state fresh: every
//! `sync_interval`, one script call (see `sync.lua`) publishes the counts, learns the
//! totals and the new bans. Connection failures are retried with exponential backoff; the
//! state changes (up, down) are logged once each and exported as `portcullis_cluster_up`.
//! An admin change wakes the task at once, so that it reaches Redis without waiting for
//! the next tick.

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Script};
use tokio_util::sync::CancellationToken;

use super::admin::{AdminBatch, AdminOp};
use super::rate::{BUCKETS, MAX_KEYS_PER_SYNC};
use super::{Cluster, Enforce};
use crate::bans::NetBan;
use crate::config::MAX_DURATION;
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
/// order, the ban log members (`"<key> <until ms>"`, `"lift <key> <ms>"`, and one page of
/// the live bans while loading them), the next ban cursor, the load's position (score, -1
/// when not loading, and rank among equal scores), then the admin bans' version, whether Redis lost the version this replica knew,
/// the admin list (`network, until ms, ...`, only when the version changed) and the
/// networks refused for `admin.max_bans`.
type SyncReply = (
    i64,
    u64,
    Vec<u64>,
    Vec<String>,
    i64,
    i64,
    u64,
    String,
    u8,
    Vec<String>,
    Vec<String>,
);
/// The admin part of the script's reply (see [`SyncReply`]).
struct AdminReply {
    version: String,
    lost: bool,
    list: Vec<String>,
    refused: Vec<String>,
}

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

/// The sync loop; `enforce` applies what is learnt from the cluster. Returns when `stop` is
/// cancelled.
pub async fn run(cluster: Arc<Cluster>, enforce: &impl Enforce, stop: CancellationToken) {
    let script = Script::new(include_str!("sync.lua"));
    let tickets = Script::new(include_str!("tickets.lua"));
    let mut link = Link {
        cluster: &cluster,
        script: &script,
        tickets: &tickets,
        tickets_read: None,
        connection: None,
        cursor: 0,
        load: None,
        admin_version: None,
        logged: None,
        admin_over_cap: false,
    };
    let mut backoff = BACKOFF_MIN;
    let mut tick = tokio::time::interval(cluster.settings().sync_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = cluster.nudge.notified() => {}
            _ = stop.cancelled() => return,
        }
        match link.sync(enforce).await {
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
    /// Where the read of all live bans goes on at the next sync (expiry score, rank among
    /// equal scores), `None` when not loading. One page of [`MAX_KEYS_PER_SYNC`] per sync.
    load: Option<(i64, u64)>,
    /// The version of the admin bans this replica's list mirrors (the highest it has seen:
    /// a lower one means Redis lost or rolled back the bans); `None` before the first read.
    admin_version: Option<String>,
    /// The state last logged, so each change is logged once.
    logged: Option<bool>,
    /// Whether the last admin list read was over `admin.max_bans` (logged once).
    admin_over_cap: bool,
}

impl Link<'_> {
    async fn sync(&mut self, enforce: &impl Enforce) -> Result<(), (ClusterOp, String)> {
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
        let admin = self.cluster.admin.batch(enforce);
        match self
            .exchange(connection.clone(), &batch, &failures, &admin)
            .await
        {
            Ok(reply) => {
                crate::metrics::cluster_sync(started.elapsed());
                self.apply(&batch, &admin, reply, enforce);
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

    /// The failures to publish, at most `max_failures + 1` per key (more add nothing) and at
    /// most [`MAX_KEYS_PER_SYNC`] keys (the others wait for the next sync).
    fn take_failures(&self) -> Vec<(IpAddr, u32)> {
        let cap = self.cluster.settings().max_failures.saturating_add(1);
        let keys: Vec<IpAddr> = self
            .cluster
            .failures
            .iter()
            .take(MAX_KEYS_PER_SYNC)
            .map(|e| *e.key())
            .collect();
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
        admin: &AdminBatch,
    ) -> Result<SyncReply, SyncError> {
        let s = self.cluster.settings();
        let prefix = &s.prefix;
        let mut call = self.script.prepare_invoke();
        call.key(format!("{prefix}replicas"))
            .key(format!("{prefix}bans"))
            .key(format!("{prefix}banlog"))
            .key(format!("{prefix}adminbans"))
            .key(format!("{prefix}adminbans:version"))
            .key(format!("{prefix}rates"));
        for slot in 0..=BUCKETS {
            call.key(format!("{prefix}rates:second:{slot}"));
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
            .arg(BUCKETS)
            .arg(self.load.map_or(-1, |(score, _)| score))
            .arg(self.load.map_or(0, |(_, skip)| skip))
            .arg(MAX_KEYS_PER_SYNC);
        // The keys with new admissions come first in a batch; the others only fetch their
        // totals, and their counts (0) are not sent.
        let adding = batch.partition_point(|(_, count)| *count > 0);
        call.arg(adding);
        for (_, count) in &batch[..adding] {
            call.arg(*count);
        }
        for (key, _) in batch {
            call.arg(key.to_string());
        }
        for (_, count) in failures {
            call.arg(*count);
        }
        for (key, _) in failures {
            call.arg(key.to_string());
        }
        let ops = admin_args(&admin.ops, Instant::now());
        call.arg(self.admin_version.as_deref().unwrap_or(""))
            .arg(s.max_bans)
            .arg(hex::encode(rand::random::<[u8; 8]>()))
            .arg(u8::from(admin.republishes()))
            .arg(ops.len());
        for (kind, target, ms) in ops {
            call.arg(kind).arg(target).arg(ms);
        }
        match tokio::time::timeout(REDIS_TIMEOUT, call.invoke_async(&mut connection)).await {
            Ok(reply) => Ok(reply?),
            Err(_) => Err(SyncError::Timeout),
        }
    }

    fn apply(
        &mut self,
        batch: &[(IpAddr, u64)],
        admin: &AdminBatch,
        reply: SyncReply,
        enforce: &impl Enforce,
    ) {
        let (redis_now, replicas, totals, bans, cursor, load, skip, version, lost, list, refused) =
            reply;
        self.cluster.rate.apply(batch, &totals, replicas);
        self.cursor = cursor;
        self.load = (load >= 0).then_some((load, skip));
        let now = Instant::now();
        for member in bans {
            match parse_log(&member) {
                Some(Logged::Ban(key, until)) => {
                    if let Some(until) = local_instant(until, redis_now, now) {
                        enforce.ban_key(key, until);
                    }
                }
                Some(Logged::Lift(key)) => enforce.lift_key(key),
                None => tracing::debug!(member, "ignoring a malformed ban entry"),
            }
        }
        let reply = AdminReply {
            version,
            lost: lost != 0,
            list,
            refused,
        };
        self.apply_admin(admin, reply, (redis_now, now), enforce);
    }

    /// Settles the admin changes just published and takes the cluster's list when its
    /// version changed.
    fn apply_admin(
        &mut self,
        admin: &AdminBatch,
        reply: AdminReply,
        (redis_now, now): (i64, Instant),
        enforce: &impl Enforce,
    ) {
        let AdminReply {
            version,
            lost,
            list,
            refused,
        } = reply;
        let refused: Vec<_> = refused.iter().filter_map(|n| n.parse().ok()).collect();
        for net in &refused {
            tracing::warn!(%net, "cluster: admin ban refused: the cluster holds admin.max_bans bans already");
        }
        if lost {
            // The script applied none of the batch: it waits for the next sync, after the
            // bans held here are published again.
            // The version known here is kept: the republished list gets a higher one.
            tracing::warn!(
                known = self.admin_version.as_deref().unwrap_or(""),
                redis = version,
                "cluster: Redis lost or rolled back the admin bans (restarted empty or from an older snapshot, or failed over?); this replica publishes those it holds"
            );
            self.cluster.admin.reseed();
            return;
        }
        let fresh = if self.admin_version.as_deref() != Some(version.as_str()) {
            self.admin_version = Some(version);
            let max = self.cluster.settings().max_bans;
            let (list, over) = parse_admin_list(&list, redis_now, now, max);
            self.log_over_cap(over, max);
            Some(list)
        } else {
            None
        };
        self.cluster.admin.settle(admin, &refused, fresh, enforce);
    }

    /// Logs once (until the list fits again) that Redis held more admin bans than this
    /// replica keeps.
    fn log_over_cap(&mut self, over: usize, max: usize) {
        if over > 0 && !self.admin_over_cap {
            tracing::warn!(
                left_out = over,
                max_bans = max,
                "cluster: Redis holds more admin bans than admin.max_bans; this replica keeps the first"
            );
        }
        self.admin_over_cap = over > 0;
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

/// A ban log entry.
#[derive(Debug, PartialEq, Eq)]
enum Logged {
    /// `"<client key> <until ms>"`.
    Ban(IpAddr, i64),
    /// `"lift <client key> <ms>"`: an operator lifted the key's ban.
    Lift(IpAddr),
}

fn parse_log(member: &str) -> Option<Logged> {
    if let Some(lift) = member.strip_prefix("lift ") {
        let (key, _) = lift.rsplit_once(' ')?;
        return Some(Logged::Lift(key.parse().ok()?));
    }
    let (key, until) = member.rsplit_once(' ')?;
    Some(Logged::Ban(key.parse().ok()?, until.parse().ok()?))
}

/// The local instant of `until` (Redis' clock, ms), or `None` if it has passed. Untrusted:
/// the value comes from Redis, so a corrupt entry bans for at most 365 days.
fn local_instant(until: i64, redis_now: i64, now: Instant) -> Option<Instant> {
    let left = until.saturating_sub(redis_now);
    let left = Duration::from_millis(u64::try_from(left).ok()?).min(MAX_DURATION);
    (!left.is_zero()).then(|| crate::deadline::after(now, left))
}

/// The admin list as the script returns it: network, until (ms), and so on. Untrusted
/// input (whoever can write to Redis writes it): each entry passes the checks a `POST
/// /bans` body passes (a network or an address, stored truncated; a duration above 0 and
/// at most 365 days), others are left out, as are expired ones, and at most `max` are
/// kept (this replica's `admin.max_bans`, which bounds what admission scans on every
/// accept). Returns the list and how many valid entries were left out beyond `max`.
fn parse_admin_list(
    flat: &[String],
    redis_now: i64,
    now: Instant,
    max: usize,
) -> (Vec<NetBan>, usize) {
    let mut list: Vec<NetBan> = Vec::with_capacity((flat.len() / 2).min(max));
    let mut over = 0;
    for pair in flat.chunks_exact(2) {
        let Some(ban) = parse_admin_entry(&pair[0], &pair[1], redis_now, now) else {
            continue;
        };
        if list.iter().any(|b| b.net == ban.net) {
            continue;
        }
        if list.len() < max {
            list.push(ban);
        } else {
            over += 1;
        }
    }
    (list, over)
}

/// One entry of the admin list, or `None` when it is malformed, expired or too long.
fn parse_admin_entry(net: &str, until: &str, redis_now: i64, now: Instant) -> Option<NetBan> {
    let net = crate::bans::parse_net(net)?;
    // Redis renders a score as a double.
    let until = until.parse::<f64>().ok()?;
    if !until.is_finite() {
        return None;
    }
    let left = (until as i64).saturating_sub(redis_now);
    let left = Duration::from_millis(u64::try_from(left).ok()?);
    if !crate::admin_bans::ban_duration_valid(left) {
        return None;
    }
    Some(NetBan {
        net,
        until: crate::deadline::after(now, left),
    })
}

/// The script's arguments for admin changes: kind, target, milliseconds left. A ban that
/// has expired meanwhile is left out.
fn admin_args(ops: &[AdminOp], now: Instant) -> Vec<(&'static str, String, u64)> {
    ops.iter()
        .filter_map(|op| match op {
            AdminOp::Ban { net, until } => {
                let left = millis(until.saturating_duration_since(now));
                (left > 0).then(|| ("ban", net.to_string(), left))
            }
            AdminOp::Lift(net) => Some(("lift", net.to_string(), 0)),
            AdminOp::LiftKey(key) => Some(("key", key.to_string(), 0)),
        })
        .collect()
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
            parse_log("192.0.2.1 1700000000000"),
            Some(Logged::Ban("192.0.2.1".parse().unwrap(), 1_700_000_000_000))
        );
        assert_eq!(
            parse_log("2001:db8:1:2:: 5"),
            Some(Logged::Ban("2001:db8:1:2::".parse().unwrap(), 5))
        );
        assert_eq!(
            parse_log("lift 2001:db8:1:2:: 5"),
            Some(Logged::Lift("2001:db8:1:2::".parse().unwrap()))
        );
        assert_eq!(parse_log("garbage"), None);
        assert_eq!(parse_log("lift garbage 5"), None);
    }

    #[test]
    fn the_admin_list_converts_to_local_instants() {
        let now = Instant::now();
        let flat: Vec<String> = [
            "192.0.2.0/24",
            "1.5e3",
            "bad",
            "9",
            "198.51.100.0/24",
            "500",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let (list, over) = parse_admin_list(&flat, 1000, now, 8);
        assert_eq!(list.len(), 1, "malformed and expired entries are left out");
        assert_eq!(over, 0);
        assert_eq!(list[0].net, "192.0.2.0/24".parse::<ipnet::IpNet>().unwrap());
        assert_eq!(list[0].until, now + Duration::from_millis(500));
    }

    #[test]
    fn the_admin_list_from_redis_is_checked_like_a_post_body_and_capped() {
        let now = Instant::now();
        let year = 365 * 86_400 * 1000_i64;
        let flat: Vec<String> = [
            ("192.0.2.9/24", 2000_i64.to_string()),
            ("192.0.2.0/24", 3000.to_string()),
            ("198.51.100.7", 2000.to_string()),
            ("203.0.113.0/24", (1000 + year + 1).to_string()),
            ("2001:db8::/32", "inf".to_string()),
            ("2001:db8::/48", "nan".to_string()),
            ("10.0.0.0/8", 2000.to_string()),
            ("10.1.0.0/16", 2000.to_string()),
        ]
        .iter()
        .flat_map(|(n, u)| [n.to_string(), u.clone()])
        .collect();
        let (list, over) = parse_admin_list(&flat, 1000, now, 3);
        let nets: Vec<String> = list.iter().map(|b| b.net.to_string()).collect();
        assert_eq!(
            nets,
            ["192.0.2.0/24", "198.51.100.7/32", "10.0.0.0/8"],
            "truncated, deduplicated, durations of at most 365 days, the first 3"
        );
        assert_eq!(over, 1);
    }
}
