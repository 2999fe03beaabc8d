//! Cluster mode (SPEC 7): replicas behind one balancer share bans, authentication failures,
//! connection rates and TLS ticket keys through Redis (or Valkey).
//!
//! # Admission never waits on Redis
//!
//! The accept loop decides from local state only: [`Cluster::may_admit`] is a map lookup.
//! A background task ([`sync`]) makes one round trip per `sync_interval`, whatever the
//! number of connections: one Lua script call (EVALSHA, atomic) that publishes this
//! replica's counts, learns the cluster's totals for the keys active here, records the
//! authentication failures (banning keys over `max_failures`) and returns the bans made
//! since the last sync. When Redis does not answer, [`Cluster::may_admit`] says yes and
//! the local limits (the per-replica GCRA limiter, bans and failure windows of
//! [`crate::admission`]) go on alone: never refusing everyone, never admitting without
//! limits. One log line per change of state, `portcullis_cluster_up`, and reconnection
//! with backoff.
//!
//! # Connection rate: the algorithm and its bound
//!
//! Budget per key: `L = 10 × connection_rate_per_ip + connection_burst_per_ip`. Each
//! replica keeps its local GCRA limiter and, in addition, per key: `seen`, the cluster's
//! total over the last 11 one-second buckets as of its last sync, and `unconfirmed`, its own
//! admissions since then. It admits a connection only while `seen + unconfirmed < L` and
//! `unconfirmed < a`, with `a = max(1, L / (8 N))`, `N` the replicas that synced in the last
//! 5 s. Redis holds one hash per second (field: client key, value: count; twelve hashes
//! used in turn) and one of totals (field: client key). A second that left the 11-second
//! window is drained out of the totals, oldest first, at most 4,000 fields per sync call
//! (so that no call's work grows with an address spray or the number of replicas: each call
//! adds at most 2,000); until then its counts still count, which only refuses earlier.
//! Should draining fall a whole window behind (replicas scaled down right after a spray
//! over many), the second to be written still holds an old one: it becomes the new second
//! with what is left of the old in it, so those counts leave the totals 11 s later (again:
//! refusing earlier, never admitting more). A sync costs Redis a few multi-field commands (`HMGET`, `HSET`) whatever the
//! batch's size; a per-key hash of seconds, summed by the script, cost several commands per
//! key fetched and took Redis 0.11 core for one replica at 5,000 handshakes/s over 3,200
//! keys (`benches/cluster.sh`).
//!
//! Why any 10 s window stays within `1.25 × L`: a 10 s window lies inside 11 consecutive
//! one-second buckets, so the last admission of the window, made by some replica `R`,
//! was checked against a total that covered the whole window, except the admissions the
//! other replicas had not yet confirmed to Redis when `R` last synced, plus those they
//! made since. Neither `R`'s view nor theirs is older than one sync cycle (publish and
//! fetch are the same atomic call), and within one cycle a replica makes at most `a`
//! unconfirmed admissions of a key; with `R`'s cycle and another's out of phase that is at
//! most two cycles, `2a` per other replica. So the window holds at most
//! `L + (N − 1) × 2a ≤ L + L/4`. Keys a replica has not admitted for 11 s are dropped from
//! its map; it then starts them at `seen = 0`, which is again at most `a` unconfirmed
//! admissions before their total is known. A replica that joins is counted in `N` from
//! its first sync. The local GCRA limiter still applies on each replica, so one replica
//! never admits more than standalone.
//!
//! "Not older than one sync cycle" holds while the keys a replica tracks fit in one sync
//! ([`rate::MAX_KEYS_PER_SYNC`]): all of them go in every batch. Beyond that, keys without
//! new admissions are fetched in turns, so a replica's view of such a key can be `k` cycles
//! old, `k` the number of syncs its turns take. An admission after such a pause is checked
//! against that older total, and the other replicas may have made `(k + 1) a` admissions
//! each since then. The window then holds at most `L + (N − 1)(k + 1) a < L (1 + (k + 1)/8)`,
//! which is `1.375 L` with up to two syncs' worth of keys.
//!
//! # Bans and failures
//!
//! Each failure is published with the next sync and counted per key in a sliding window
//! (a sorted set scored by Redis' clock); more than `max_failures` within `failure_window`
//! bans the key for `ban_duration` everywhere. Bans are a sorted set (one member per client
//! key, scored by expiry, so an operator's lift is one `ZREM` however large an address spray
//! grew the set), plus a log scored by creation that replicas read incrementally (a replica
//! that starts, or that was cut off for over 60 s, reads all live bans, one page of
//! [`rate::MAX_KEYS_PER_SYNC`] per sync, so no sync's script work grows with the set).
//! Expiry times are converted
//! through Redis' clock, so replicas' clocks need not agree. A ban is enforced everywhere
//! within two sync intervals plus a round trip, and closes the key's open connections on
//! every replica. The local failure window also bans on its own, as standalone.
//!
//! # Admin bans
//!
//! Bans made through the admin API (`POST /bans`) and their lifts (`DELETE /bans/...`) are
//! cluster-wide too, through the same script call: see [`admin`]. A change wakes the sync
//! at once, so every replica applies it within `sync_interval` plus a round trip; lifting
//! an address also lifts its client key's authentication-failure ban on every replica.
//!
//! # Session-ticket keys
//!
//! Every second (not every sync) a second script returns the keys of the current and
//! previous rotation periods (`tls.ticket_rotation`, counted on Redis' clock), creating the
//! current one with SET NX when this replica is the first to need it; the sync task installs
//! them in the process's [`Ticketer`], which encrypts with the current and still decrypts
//! with the previous. Until Redis first answers, tickets are encrypted with a local key and
//! resume on this replica only.
//!
//! # What is not shared
//!
//! `max_connections_per_ip`, `max_connections`, handshake capacity and the command rate
//! stay per replica (SPEC 7). The keys live in one Redis (a primary, not Redis Cluster:
//! the script builds no key names, but the sync touches keys of many slots at once).
//!
//! # Every key has a TTL
//!
//! The script sets a TTL on every key in the same atomic call that writes it: the rate
//! totals 61 s (every sync refreshes it; longer than any second's hash, so that no second
//! is drained from totals that no longer hold it), each second's hash 60 s (it is drained
//! well before: its counts would otherwise stay in the totals, so Redis must not evict
//! keys; after 12 s without any sync, the first one drops all rate hashes at once), failure
//! sets `failure_window`, bans the longest live ban, the ban log 60 s, the replica set 5 s,
//! the admin ban set and its version the longest admin ban (at most 365 days; at most
//! `admin.max_bans` members); ticket keys two rotation periods and a minute. Rates are a
//! fixed set of 13 keys whatever the number of client keys (a spray adds fields, drained
//! once out of the window); failure sets are bounded by what a spray writes in
//! `failure_window` (each failure costs a TLS handshake).

pub mod admin;
pub mod rate;
pub mod sync;

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use dashmap::DashMap;

use crate::config::Config;
use crate::tickets::Ticketer;
use admin::{AdminBans, AdminOp, AdminQueue, Ticket};
use rate::SharedRate;

/// The most keys whose failures wait for the next sync: beyond it a failure is counted
/// locally only (the local window still bans).
const MAX_PENDING_FAILURE_KEYS: usize = 10_000;

/// Why cluster mode could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cluster.redis: {0}")]
    Url(#[from] redis::RedisError),
}

/// What the sync task needs to know, from the configuration.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    pub prefix: String,
    pub sync_interval: Duration,
    pub failure_window: Duration,
    pub max_failures: u32,
    pub ban_duration: Duration,
    pub ticket_rotation: Duration,
    /// The most admin bans the shared list may hold (`admin.max_bans`).
    pub max_bans: usize,
}

impl ClusterSettings {
    fn new(config: &Config) -> Self {
        ClusterSettings {
            prefix: config.cluster.key_prefix.clone(),
            sync_interval: config.cluster.sync_interval,
            failure_window: config.auth.failure_window,
            max_failures: config.auth.max_failures,
            ban_duration: config.auth.ban_duration,
            ticket_rotation: config.tls.ticket_rotation,
            max_bans: config.admin.max_bans,
        }
    }
}

/// This replica's side of the shared state.
pub struct Cluster {
    client: redis::Client,
    /// Swapped by a reload (the `[auth]` limits); the sync reads it each time.
    settings: ArcSwap<ClusterSettings>,
    /// Random, per process: the member of the replica set, and part of failure members.
    replica_id: String,
    rate: SharedRate,
    /// Failures per key since the last sync, to publish.
    failures: DashMap<IpAddr, u32>,
    /// Whether the last sync succeeded: while false, only local limits apply.
    up: AtomicBool,
    /// The process's session-ticket keys, which the sync replaces with the shared ones.
    tickets: Arc<Ticketer>,
    /// Admin-API changes waiting to be published.
    admin: AdminQueue,
    /// Wakes the sync task before its next tick (an admin change waits for it).
    nudge: tokio::sync::Notify,
}

/// What the sync task applies on this replica: what it learns from the cluster.
pub trait Enforce: AdminBans {
    /// The cluster banned `key` (authentication failures) until `until`: refuse it and
    /// close its open connections.
    fn ban_key(&self, key: IpAddr, until: Instant);
    /// An operator lifted `key`'s ban on some replica.
    fn lift_key(&self, key: IpAddr);
}

impl Cluster {
    /// The cluster link when `[cluster] redis` is set; `None` standalone. Does not connect:
    /// the sync task does, in the background.
    pub fn from_config(
        config: &Config,
        tickets: Arc<Ticketer>,
    ) -> Result<Option<Cluster>, ClusterError> {
        let Some(url) = config.cluster.redis() else {
            return Ok(None);
        };
        let client = redis::Client::open(url)?;
        crate::metrics::cluster_enabled();
        let limits = &config.limits;
        Ok(Some(Cluster {
            client,
            settings: ArcSwap::from_pointee(ClusterSettings::new(config)),
            replica_id: hex::encode(rand::random::<[u8; 8]>()),
            rate: SharedRate::new(
                limits.connection_rate_per_ip,
                limits.connection_burst_per_ip,
            ),
            failures: DashMap::new(),
            up: AtomicBool::new(false),
            tickets,
            admin: AdminQueue::default(),
            nudge: tokio::sync::Notify::new(),
        }))
    }

    /// Whether the cluster's rate budget allows a connection from `key` (always, while
    /// Redis is down: the local limits decide alone).
    pub fn may_admit(&self, key: IpAddr) -> bool {
        !self.is_up() || self.rate.may_admit(key)
    }

    /// A connection from `key` was admitted.
    pub fn admitted(&self, key: IpAddr) {
        self.rate.admitted(key);
    }

    /// `key` failed to authenticate: published with the next sync.
    pub fn auth_failed(&self, key: IpAddr) {
        if let Some(mut count) = self.failures.get_mut(&key) {
            *count = count.saturating_add(1);
            return;
        }
        if self.failures.len() < MAX_PENDING_FAILURE_KEYS {
            *self.failures.entry(key).or_insert(0) += 1;
        }
    }

    /// An admin-API change: `change` applies it here and says what to publish (refused
    /// once `cap` changes wait for Redis); the sync is woken to publish it now. The ticket
    /// tells the request what Redis made of it.
    pub fn admin_change<E: From<admin::Backlog>>(
        &self,
        cap: usize,
        change: impl FnOnce() -> Result<Vec<AdminOp>, E>,
    ) -> Result<Ticket, E> {
        let ticket = self.admin.record(cap, self.is_up(), change)?;
        self.nudge.notify_one();
        Ok(ticket)
    }

    /// Whether Redis answered the last sync.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    pub fn settings(&self) -> Arc<ClusterSettings> {
        self.settings.load_full()
    }

    /// Takes a reloaded configuration's rate and `[auth]` limits (`[cluster]` itself needs
    /// a restart).
    pub fn reconfigure(&self, config: &Config) {
        let l = &config.limits;
        self.rate
            .set_limits(l.connection_rate_per_ip, l.connection_burst_per_ip);
        self.settings.store(Arc::new(ClusterSettings::new(config)));
    }

    /// Gives the shared-rate map's spare capacity back; run with the limiters' pruning.
    pub fn shrink(&self) {
        self.rate.shrink();
    }

    /// Keys of this replica's shared-rate map (for tests and the key gauge).
    pub fn rate_keys(&self) -> usize {
        self.rate.len()
    }
}
