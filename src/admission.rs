//! Admission: the cheap checks a connection passes before any TLS work (SPEC section 1).
//!
//! Everything here is keyed by the *client key*: the client's IPv4 address, or its IPv6
//! address masked to `ipv6_prefix`, so that one host cannot escape its limits by rotating
//! addresses inside its own prefix. The checks run in the SPEC's order — global cap, then
//! access lists, ban list, per-key rate and per-key concurrency, then, once the client's
//! first byte arrives, handshake capacity — and each costs a few map lookups: a refused peer
//! costs an accept and a close.
//!
//! [`Admission::admit_client`] is the one place a client address is admitted; it can be
//! called with the address a trusted PROXY header carries. [`Admission::still_admitted`]
//! asks the same of an open connection after a reload changed the rules.
//! [`Admission::handshake_slot`] is the one place a handshake is admitted.
//!
//! The limits and lists are swapped whole by a reload ([`Admission::reconfigure`]) while the
//! per-key state (open connections, bans, failures) stays: a reload never lets a banned key
//! in or forgets who holds a connection. Only a changed connection rate starts every key's
//! bucket afresh (governor cannot change the quota of a live limiter).
//!
//! # State and its cost
//!
//! Every per-key map is bounded by pruning (`prune_interval`): rate-limiter entries are
//! dropped once their bucket is full again (`retain_recent`), ban and failure entries once
//! they expire, concurrency entries when a key's last connection closes. A rate-limiter key
//! costs about 70 bytes (measured over a million keys by `cargo bench --bench limiter`); a
//! concurrency entry (key, count, cancellation token) about 150 bytes while the key has a
//! connection; a ban entry about 50 bytes and a failure log about 50 bytes plus 16 per
//! recent failure (at most `max_failures` + 1), only for keys that failed to authenticate.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use dashmap::DashMap;
use governor::clock::QuantaClock;
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use ipnet::IpNet;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::bans::{BansFull, NetBan, NetBans};
use crate::cluster::admin::{AdminOp, Backlog, Ticket};
use crate::cluster::Cluster;
use crate::config::Config;
use crate::error::RejectReason;
use crate::metrics::LimiterKeys;

/// The client's address as reported: IPv4-mapped IPv6 (`::ffff:a.b.c.d`, as a dual-stack
/// socket reports IPv4 peers) becomes IPv4.
pub fn normalize_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// The key every per-client limit uses: the normalised IPv4 address, or the IPv6 address
/// with all but its first `ipv6_prefix` bits cleared.
pub fn client_key(ip: IpAddr, ipv6_prefix: u8) -> IpAddr {
    match normalize_ip(ip) {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let prefix = u32::from(ipv6_prefix.min(128));
            let mask = u128::MAX.checked_shl(128 - prefix).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(bits & mask))
        }
        v4 => v4,
    }
}

/// The times of one key's authentication failures within the last `failure_window`,
/// oldest first: a sliding window, so that no window of that length, wherever it starts,
/// holds more than `max_failures` failures without a ban. At most `max_failures` + 1 long.
struct FailureLog(VecDeque<Instant>);

impl FailureLog {
    /// Forgets failures older than `window` before `now`.
    fn expire(&mut self, now: Instant, window: Duration) {
        while self
            .0
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= window)
        {
            self.0.pop_front();
        }
    }
}

/// The open connections of one key.
struct KeyEntry {
    connections: usize,
    /// Of those, the ones between their first byte and the end of their TLS handshake.
    handshakes: usize,
    /// Cancelled when the key is banned: its open connections close.
    banned: CancellationToken,
}

/// The limits and lists a reload may change, swapped whole.
struct Rules {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
    ipv6_prefix: u8,
    /// `max_connections`, checked against the exact count of held connections.
    max_connections: usize,
    max_per_key: usize,
    /// `max_handshakes_per_ip`: handshakes in flight per key, counted in [`KeyEntry`].
    max_handshakes_per_key: usize,
    max_failures: u32,
    failure_window: Duration,
    ban_duration: Duration,
}

impl Rules {
    fn new(config: &Config) -> Self {
        let l = &config.limits;
        let a = &config.auth;
        Rules {
            allow: config.access.allow.clone(),
            deny: config.access.deny.clone(),
            ipv6_prefix: l.ipv6_prefix,
            max_connections: l.max_connections,
            max_per_key: l.max_connections_per_ip,
            max_handshakes_per_key: l.max_handshakes_per_ip,
            max_failures: a.max_failures,
            failure_window: a.failure_window,
            ban_duration: a.ban_duration,
        }
    }

    /// The access lists' verdict on a client address.
    fn denies(&self, ip: IpAddr) -> bool {
        self.deny.iter().any(|net| net.contains(&ip))
            || (!self.allow.is_empty() && !self.allow.iter().any(|net| net.contains(&ip)))
    }
}

/// The per-key connection-rate limiter and the quota it was built with.
struct RateLimit {
    quota: Quota,
    limiter: DefaultKeyedRateLimiter<IpAddr>,
}

impl RateLimit {
    fn new(config: &Config) -> Self {
        let l = &config.limits;
        let quota = per_second(l.connection_rate_per_ip, l.connection_burst_per_ip);
        RateLimit {
            quota,
            limiter: RateLimiter::keyed(quota),
        }
    }
}

/// Global admission state shared by every connection.
pub struct Admission {
    rules: ArcSwap<Rules>,
    /// Connections currently held, exact across every exit path (the guard's `Drop`); the
    /// global cap is checked against it.
    active: Arc<AtomicUsize>,
    /// `max_handshakes_in_flight`: a permit is taken at a connection's first byte and held
    /// until its handshake ends. Waited for, in arrival order (tokio's semaphore is fair).
    handshakes: Arc<Semaphore>,
    /// The number of permits `handshakes` is meant to hold, for resizing it on reload.
    handshake_slots: Mutex<usize>,
    /// New connections per second per key (GCRA, governor).
    rate: ArcSwap<RateLimit>,
    /// Open connections per key; an entry lives while its key has a connection.
    per_key: Arc<DashMap<IpAddr, KeyEntry>>,
    /// Ban expiry per key.
    bans: DashMap<IpAddr, Instant>,
    /// Networks banned through the admin API.
    net_bans: NetBans,
    /// Recent authentication failures per key; an entry lives while it holds one.
    failures: DashMap<IpAddr, FailureLog>,
    /// Cluster mode: the shared connection rate and failure counts (SPEC 7).
    cluster: Option<Arc<Cluster>>,
    /// The clock of every connection's command limiter, made once: making one (what
    /// `RateLimiter::direct` does) queries the CPU's features (`cpuid`) each time, which
    /// cost about a tenth of a full handshake's server CPU when done per connection.
    clock: QuantaClock,
}

/// Why an admin-API change was not made.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AdminRefusal {
    #[error(transparent)]
    Full(#[from] BansFull),
    #[error("no such ban")]
    NoSuchBan,
    #[error(transparent)]
    Backlog(#[from] Backlog),
}

/// Why a ban is in force, as `GET /bans` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BanReason {
    /// Set through the admin API.
    Admin,
    /// More than `auth.max_failures` failed authentications.
    AuthFailures,
}

impl BanReason {
    pub fn as_str(self) -> &'static str {
        match self {
            BanReason::Admin => "admin",
            BanReason::AuthFailures => "auth_failures",
        }
    }
}

/// One ban in force: a network (admin API, shown as a CIDR) or a client key
/// (authentication failures, shown as an address).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ban {
    pub key: String,
    pub until: Instant,
    pub reason: BanReason,
}

/// Held by a connection for its whole life; gives its global place back on drop (every exit
/// path, panics included).
pub struct ConnectionGuard {
    active: Arc<AtomicUsize>,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let now = self.active.fetch_sub(1, Ordering::Relaxed) - 1;
        crate::metrics::connections_active(now);
    }
}

/// Held by an admitted client connection; gives its per-key place back on drop.
pub struct ClientGuard {
    key: IpAddr,
    per_key: Arc<DashMap<IpAddr, KeyEntry>>,
    /// Cancelled if the client's key is banned while the connection is open.
    pub banned: CancellationToken,
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        self.per_key.remove_if_mut(&self.key, |_, entry| {
            entry.connections -= 1;
            entry.connections == 0
        });
    }
}

/// A handshake in flight: its key's place among `max_handshakes_per_ip` and, once
/// [`Admission::handshake_slot`] is done, a place among `max_handshakes_in_flight`. Both are
/// given back on drop: when the handshake ends, times out or its task is cancelled.
pub struct HandshakeSlot {
    _key: KeyHandshake,
    _global: OwnedSemaphorePermit,
}

/// A key's place among `max_handshakes_per_ip`.
struct KeyHandshake {
    key: IpAddr,
    per_key: Arc<DashMap<IpAddr, KeyEntry>>,
}

impl Drop for KeyHandshake {
    fn drop(&mut self) {
        if let Some(mut entry) = self.per_key.get_mut(&self.key) {
            entry.handshakes = entry.handshakes.saturating_sub(1);
        }
    }
}

/// A GCRA quota of `rate` per second with bursts of `burst` (both at least 1).
pub fn per_second(rate: u32, burst: u32) -> Quota {
    let rate = NonZeroU32::new(rate).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
    Quota::per_second(rate).allow_burst(burst)
}

impl Admission {
    pub fn new(config: &Config) -> Self {
        let slots = config.limits.max_handshakes_in_flight;
        Admission {
            rules: ArcSwap::from_pointee(Rules::new(config)),
            active: Arc::new(AtomicUsize::new(0)),
            handshakes: Arc::new(Semaphore::new(slots)),
            handshake_slots: Mutex::new(slots),
            rate: ArcSwap::from_pointee(RateLimit::new(config)),
            per_key: Arc::new(DashMap::new()),
            bans: DashMap::new(),
            net_bans: NetBans::default(),
            failures: DashMap::new(),
            cluster: None,
            clock: QuantaClock::default(),
        }
    }

    /// A connection's own limiter of `commands_per_second` with bursts of `commands_burst`,
    /// on the clock every connection shares.
    pub fn command_limiter(&self, rate: u32, burst: u32) -> DefaultDirectRateLimiter {
        RateLimiter::direct_with_clock(per_second(rate, burst), self.clock.clone())
    }

    /// Shares the connection rate and authentication failures with the cluster.
    pub fn with_cluster(mut self, cluster: Option<Arc<Cluster>>) -> Self {
        self.cluster = cluster;
        self
    }

    /// Applies a reloaded configuration's limits and lists to new admissions, keeping every
    /// key's state. Open connections are checked again by [`Admission::still_admitted`].
    pub fn reconfigure(&self, config: &Config) {
        self.rules.store(Arc::new(Rules::new(config)));
        let fresh = RateLimit::new(config);
        if fresh.quota != self.rate.load().quota {
            self.rate.store(Arc::new(fresh));
        }
        self.resize_handshakes(config.limits.max_handshakes_in_flight);
    }

    /// Gives `handshakes` `slots` permits: added at once, or taken away as handshakes in
    /// flight finish (a background task waits for the permits that are held right now).
    fn resize_handshakes(&self, slots: usize) {
        let Ok(mut current) = self.handshake_slots.lock() else {
            return;
        };
        if slots > *current {
            self.handshakes.add_permits(slots - *current);
        } else if slots < *current {
            let excess = *current - slots;
            let pending = excess - self.handshakes.forget_permits(excess);
            if pending > 0 {
                let handshakes = self.handshakes.clone();
                let pending = u32::try_from(pending).unwrap_or(u32::MAX);
                tokio::spawn(async move {
                    if let Ok(permits) = handshakes.acquire_many_owned(pending).await {
                        permits.forget();
                    }
                });
            }
        }
        *current = slots;
    }

    /// The global cap, checked first, right after accept.
    pub fn admit_connection(&self) -> Result<ConnectionGuard, RejectReason> {
        let max = self.rules.load().max_connections;
        let now = self
            .active
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .map_err(|_| RejectReason::MaxConnections)?
            + 1;
        crate::metrics::connections_active(now);
        Ok(ConnectionGuard {
            active: self.active.clone(),
        })
    }

    /// Access lists, ban list, per-key rate and per-key concurrency, in that order, for the
    /// client address `ip` (already normalised).
    pub fn admit_client(&self, ip: IpAddr) -> Result<ClientGuard, RejectReason> {
        let rules = self.rules.load();
        if rules.denies(ip) {
            return Err(RejectReason::Denied);
        }
        let key = client_key(ip, rules.ipv6_prefix);
        if self.is_banned(key) || self.net_bans.covers(ip) {
            return Err(RejectReason::Banned);
        }
        if self.cluster.as_ref().is_some_and(|c| !c.may_admit(key))
            || self.rate.load().limiter.check_key(&key).is_err()
        {
            return Err(RejectReason::RateLimited);
        }
        let mut entry = self.per_key.entry(key).or_insert_with(|| KeyEntry {
            connections: 0,
            handshakes: 0,
            banned: CancellationToken::new(),
        });
        if entry.connections >= rules.max_per_key {
            return Err(RejectReason::PerIpCap);
        }
        if entry.banned.is_cancelled() {
            // A ban that has since expired: the connections it closed kept the old token.
            entry.banned = CancellationToken::new();
        }
        entry.connections += 1;
        if let Some(cluster) = &self.cluster {
            cluster.admitted(key);
        }
        Ok(ClientGuard {
            key,
            per_key: self.per_key.clone(),
            banned: entry.banned.clone(),
        })
    }

    /// Whether an open connection from `ip` would still be admitted by the access lists and
    /// bans in force (the per-key rate and caps only bind new connections).
    pub fn still_admitted(&self, ip: IpAddr) -> Result<(), RejectReason> {
        let rules = self.rules.load();
        if rules.denies(ip) {
            return Err(RejectReason::Denied);
        }
        if self.is_banned(client_key(ip, rules.ipv6_prefix)) || self.net_bans.covers(ip) {
            return Err(RejectReason::Banned);
        }
        Ok(())
    }

    /// Bans `net` for `duration` (admin API): new connections from it are refused at once;
    /// the caller wakes open ones to check themselves. Refused when `max` bans are in
    /// force. In cluster mode the ban is also published to every replica (refused once
    /// `max` changes wait for Redis); the ticket says what became of that.
    pub fn ban_network(
        &self,
        net: IpNet,
        duration: Duration,
        max: usize,
    ) -> Result<Ticket, AdminRefusal> {
        let until = crate::deadline::after(Instant::now(), duration);
        let net = net.trunc();
        let ban = || {
            self.net_bans.insert(net, until, max)?;
            Ok(vec![AdminOp::Ban { net, until }])
        };
        self.admin_change(max, ban)
    }

    /// Lifts the admin ban of exactly `net` (on every replica, in cluster mode).
    pub fn lift_network_ban(&self, net: IpNet, max: usize) -> Result<Ticket, AdminRefusal> {
        let net = net.trunc();
        let lift = || {
            if self.net_bans.remove(net) {
                Ok(vec![AdminOp::Lift(net)])
            } else {
                Err(AdminRefusal::NoSuchBan)
            }
        };
        self.admin_change(max, lift)
    }

    /// Lifts the bans of one address: an admin ban of that address alone and the ban of its
    /// client key (authentication failures), on every replica in cluster mode.
    /// [`AdminRefusal::NoSuchBan`] when neither was in force here.
    pub fn lift_address_ban(&self, ip: IpAddr, max: usize) -> Result<Ticket, AdminRefusal> {
        let ip = normalize_ip(ip);
        let lift = || {
            let mut lifted = Vec::new();
            let net = IpNet::from(ip);
            if self.net_bans.remove(net) {
                lifted.push(AdminOp::Lift(net));
            }
            let key = client_key(ip, self.rules.load().ipv6_prefix);
            if self.bans.remove(&key).is_some() {
                lifted.push(AdminOp::LiftKey(key));
            }
            if lifted.is_empty() {
                Err(AdminRefusal::NoSuchBan)
            } else {
                Ok(lifted)
            }
        };
        self.admin_change(max, lift)
    }

    /// Runs an admin change here, and queues it for the cluster in cluster mode.
    fn admin_change(
        &self,
        max: usize,
        change: impl FnOnce() -> Result<Vec<AdminOp>, AdminRefusal>,
    ) -> Result<Ticket, AdminRefusal> {
        match &self.cluster {
            Some(cluster) => cluster.admin_change(max, change),
            None => change().map(|_| Ticket::standalone()),
        }
    }

    /// The cluster lifted `key`'s ban (an operator, on some replica).
    pub fn lift_key_ban(&self, key: IpAddr) {
        self.bans.remove(&key);
    }

    /// The admin bans in force.
    pub fn admin_bans(&self) -> Vec<NetBan> {
        self.net_bans.in_force()
    }

    /// The cluster's admin bans replace this replica's. True when a network is banned that
    /// was not before: its open connections must check themselves.
    pub fn replace_admin_bans(&self, bans: Vec<NetBan>) -> bool {
        self.net_bans.replace(bans)
    }

    /// Every ban in force: the admin API's networks, then the keys banned after
    /// authentication failures (at most `limit` in all).
    pub fn bans(&self, limit: usize) -> Vec<Ban> {
        let now = Instant::now();
        let nets = self.net_bans.in_force().into_iter().map(|ban| Ban {
            key: ban.net.to_string(),
            until: ban.until,
            reason: BanReason::Admin,
        });
        let keys = self
            .bans
            .iter()
            .filter(|entry| *entry.value() > now)
            .map(|entry| Ban {
                key: entry.key().to_string(),
                until: *entry.value(),
                reason: BanReason::AuthFailures,
            });
        nets.chain(keys).take(limit).collect()
    }

    /// A handshake slot for a client whose first byte has arrived (a silent connection holds
    /// none, so silence cannot hoard them). Its key's place among `max_handshakes_per_ip` is
    /// taken at once, or the connection is refused; then a place among
    /// `max_handshakes_in_flight` is waited for rather than refused, so a full pool delays a
    /// handshake instead of resetting it. The caller bounds the wait (`handshake_timeout`);
    /// a wait cut short gives the key's place back.
    pub async fn handshake_slot(
        &self,
        client: &ClientGuard,
    ) -> Result<HandshakeSlot, RejectReason> {
        let key = {
            let max = self.rules.load().max_handshakes_per_key;
            let mut entry = self
                .per_key
                .get_mut(&client.key)
                .ok_or(RejectReason::HandshakeCapacity)?;
            if entry.handshakes >= max {
                return Err(RejectReason::HandshakeCapacity);
            }
            entry.handshakes += 1;
            KeyHandshake {
                key: client.key,
                per_key: self.per_key.clone(),
            }
        };
        // The semaphore is never closed, so the wait ends only with a permit (or with the
        // caller's deadline).
        let global = self
            .handshakes
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| RejectReason::HandshakeCapacity)?;
        Ok(HandshakeSlot {
            _key: key,
            _global: global,
        })
    }

    /// Places of `max_handshakes_in_flight` currently taken.
    pub fn handshakes_in_flight(&self) -> usize {
        let slots = self.handshake_slots.lock().map_or(0, |slots| *slots);
        slots.saturating_sub(self.handshakes.available_permits())
    }

    fn is_banned(&self, key: IpAddr) -> bool {
        let now = Instant::now();
        match self.bans.get(&key).map(|expiry| *expiry) {
            Some(expiry) if expiry > now => true,
            Some(_) => {
                self.bans.remove_if(&key, |_, expiry| *expiry <= now);
                false
            }
            None => false,
        }
    }

    /// Records a failed authentication from `ip`. More than `max_failures` within any
    /// `failure_window` (a sliding window, not fixed slots) bans the key for `ban_duration` and closes its open connections;
    /// returns true when this failure caused the ban.
    pub fn record_auth_failure(&self, ip: IpAddr) -> bool {
        let rules = self.rules.load();
        let key = client_key(ip, rules.ipv6_prefix);
        if let Some(cluster) = &self.cluster {
            cluster.auth_failed(key);
        }
        let now = Instant::now();
        let exceeded = {
            let mut log = self
                .failures
                .entry(key)
                .or_insert_with(|| FailureLog(VecDeque::new()));
            log.expire(now, rules.failure_window);
            log.0.push_back(now);
            log.0.len() > rules.max_failures as usize
        };
        if !exceeded {
            return false;
        }
        self.failures.remove(&key);
        self.ban_until(key, crate::deadline::after(now, rules.ban_duration));
        true
    }

    /// Bans `key` until `until` (or longer, if it already is) and closes its open
    /// connections: a local ban, or one the cluster made.
    pub fn ban_until(&self, key: IpAddr, until: Instant) {
        let mut expiry = self.bans.entry(key).or_insert(until);
        *expiry = (*expiry).max(until);
        drop(expiry);
        if let Some(entry) = self.per_key.get(&key) {
            entry.banned.cancel();
        }
    }

    /// Drops state that no longer limits anyone: full rate buckets, expired bans and
    /// failure windows; gives the maps' spare capacity back.
    pub fn prune(&self) {
        let now = Instant::now();
        let rate = self.rate.load();
        rate.limiter.retain_recent();
        rate.limiter.shrink_to_fit();
        self.bans.retain(|_, expiry| *expiry > now);
        self.bans.shrink_to_fit();
        self.net_bans.prune();
        let window = self.rules.load().failure_window;
        self.failures.retain(|_, log| {
            log.expire(now, window);
            !log.0.is_empty()
        });
        self.failures.shrink_to_fit();
        self.per_key.shrink_to_fit();
        if let Some(cluster) = &self.cluster {
            cluster.shrink();
        }
    }

    pub fn keys(&self) -> LimiterKeys {
        LimiterKeys {
            connection_rate: self.rate.load().limiter.len(),
            concurrency: self.per_key.len(),
            auth_failures: self.failures.len(),
            bans: self.bans.len() + self.net_bans.len(),
        }
    }

    /// Connections currently held.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn admission(edit: impl FnOnce(&mut Config)) -> Admission {
        let mut config = Config::default();
        edit(&mut config);
        Admission::new(&config)
    }

    /// The limiters share a clock, not a budget: one connection's commands do not use up
    /// another's.
    #[test]
    fn each_command_limiter_has_its_own_budget() {
        let admission = admission(|_| {});
        let first = admission.command_limiter(1, 2);
        let second = admission.command_limiter(1, 2);
        assert!(first.check().is_ok());
        assert!(first.check().is_ok());
        assert!(first.check().is_err(), "a burst of 2, then refused");
        assert!(
            second.check().is_ok(),
            "the other connection's budget is whole"
        );
        assert!(second.check().is_ok());
        assert!(second.check().is_err());
    }

    #[test]
    fn mapped_ipv4_is_normalised() {
        let mapped = ip("::ffff:192.0.2.7");
        assert_eq!(normalize_ip(mapped), ip("192.0.2.7"));
        assert_eq!(client_key(mapped, 64), ip("192.0.2.7"));
    }

    #[test]
    fn ipv6_is_keyed_by_prefix() {
        let a = ip("2001:db8:1:2:aaaa::1");
        let b = ip("2001:db8:1:2:ffff::9");
        let c = ip("2001:db8:1:3::1");
        assert_eq!(client_key(a, 64), client_key(b, 64));
        assert_ne!(client_key(a, 64), client_key(c, 64));
        assert_eq!(client_key(a, 64), ip("2001:db8:1:2::"));
        assert_eq!(client_key(a, 128), a);
        assert_eq!(client_key(a, 48), client_key(c, 48));
        assert_eq!(client_key(a, 1), ip("::"));
    }

    #[test]
    fn ipv6_hosts_in_one_prefix_share_limits() {
        let adm = admission(|c| c.limits.max_connections_per_ip = 2);
        let _a = adm.admit_client(ip("2001:db8::1")).unwrap();
        let _b = adm.admit_client(ip("2001:db8::2")).unwrap();
        assert_eq!(
            adm.admit_client(ip("2001:db8::ffff")).err(),
            Some(RejectReason::PerIpCap)
        );
        assert!(adm.admit_client(ip("2001:db8:0:1::1")).is_ok());
    }

    #[test]
    fn global_cap_refuses_then_frees() {
        let adm = admission(|c| c.limits.max_connections = 1);
        let guard = adm.admit_connection().unwrap();
        assert_eq!(
            adm.admit_connection().err(),
            Some(RejectReason::MaxConnections)
        );
        assert_eq!(adm.active(), 1);
        drop(guard);
        assert_eq!(adm.active(), 0);
        assert!(adm.admit_connection().is_ok());
    }

    #[test]
    fn access_lists() {
        let adm = admission(|c| {
            c.access.allow = vec!["10.0.0.0/8".parse().unwrap()];
            c.access.deny = vec!["10.1.0.0/16".parse().unwrap()];
        });
        assert!(adm.admit_client(ip("10.2.3.4")).is_ok());
        assert_eq!(
            adm.admit_client(ip("10.1.3.4")).err(),
            Some(RejectReason::Denied)
        );
        assert_eq!(
            adm.admit_client(ip("192.0.2.1")).err(),
            Some(RejectReason::Denied)
        );
    }

    #[test]
    fn rate_limit_triggers_at_the_burst_and_not_before() {
        let adm = admission(|c| {
            c.limits.connection_rate_per_ip = 1;
            c.limits.connection_burst_per_ip = 3;
        });
        for _ in 0..3 {
            assert!(adm.admit_client(ip("192.0.2.1")).is_ok());
        }
        assert_eq!(
            adm.admit_client(ip("192.0.2.1")).err(),
            Some(RejectReason::RateLimited)
        );
        assert!(adm.admit_client(ip("192.0.2.2")).is_ok());
    }

    #[test]
    fn concurrency_guard_releases_on_drop_and_panic() {
        let adm = Arc::new(admission(|c| c.limits.max_connections_per_ip = 1));
        let g = adm.admit_client(ip("192.0.2.1")).unwrap();
        assert_eq!(
            adm.admit_client(ip("192.0.2.1")).err(),
            Some(RejectReason::PerIpCap)
        );
        drop(g);
        assert_eq!(adm.keys().concurrency, 0);
        let adm2 = adm.clone();
        let r = std::thread::spawn(move || {
            let _g = adm2.admit_client(ip("192.0.2.1")).unwrap();
            panic!("connection task panics");
        })
        .join();
        assert!(r.is_err());
        assert!(
            adm.admit_client(ip("192.0.2.1")).is_ok(),
            "the panic released its place"
        );
    }

    #[test]
    fn bans_after_more_than_max_failures_and_expire() {
        let adm = admission(|c| {
            c.auth.max_failures = 2;
            c.auth.ban_duration = Duration::from_millis(50);
        });
        let open = adm.admit_client(ip("192.0.2.1")).unwrap();
        assert!(!adm.record_auth_failure(ip("192.0.2.1")));
        assert!(!adm.record_auth_failure(ip("192.0.2.1")));
        assert!(adm.record_auth_failure(ip("192.0.2.1")));
        assert!(open.banned.is_cancelled(), "open connections are told");
        assert_eq!(
            adm.admit_client(ip("192.0.2.1")).err(),
            Some(RejectReason::Banned)
        );
        assert!(adm.admit_client(ip("192.0.2.9")).is_ok());
        std::thread::sleep(Duration::from_millis(60));
        let again = adm.admit_client(ip("192.0.2.1")).unwrap();
        assert!(!again.banned.is_cancelled());
        adm.prune();
        assert_eq!(adm.keys().bans, 0);
    }

    #[test]
    fn no_window_holds_more_than_max_failures_around_an_edge() {
        // A fixed window let 2 × max_failures - 1 guesses through: max_failures - 1 just
        // before its edge and max_failures just after. A sliding one bans the first guess
        // past max_failures within any window.
        let adm = admission(|c| {
            c.auth.max_failures = 3;
            c.auth.failure_window = Duration::from_millis(1000);
        });
        for _ in 0..2 {
            assert!(!adm.record_auth_failure(ip("192.0.2.1")));
        }
        std::thread::sleep(Duration::from_millis(600));
        assert!(!adm.record_auth_failure(ip("192.0.2.1")));
        // 600 ms later: the first two are outside the window (a fixed one would start
        // afresh here), the third is not.
        std::thread::sleep(Duration::from_millis(600));
        assert!(!adm.record_auth_failure(ip("192.0.2.1")));
        assert!(!adm.record_auth_failure(ip("192.0.2.1")));
        assert!(
            adm.record_auth_failure(ip("192.0.2.1")),
            "the 4th failure within one window bans"
        );
    }

    #[test]
    fn failure_entries_are_pruned_once_outside_the_window() {
        let adm = admission(|c| c.auth.failure_window = Duration::from_millis(30));
        assert!(!adm.record_auth_failure(ip("192.0.2.1")));
        assert_eq!(adm.keys().auth_failures, 1);
        std::thread::sleep(Duration::from_millis(40));
        adm.prune();
        assert_eq!(adm.keys().auth_failures, 0);
    }

    #[test]
    fn reconfigure_changes_limits_and_keeps_per_key_state() {
        let adm = admission(|c| c.limits.max_connections_per_ip = 2);
        let held = adm.admit_client(ip("192.0.2.1")).unwrap();
        let mut config = Config::default();
        config.limits.max_connections_per_ip = 1;
        config.limits.max_connections = 1;
        config.access.deny = vec!["192.0.2.7/32".parse().unwrap()];
        adm.reconfigure(&config);
        assert_eq!(
            adm.admit_client(ip("192.0.2.1")).err(),
            Some(RejectReason::PerIpCap),
            "the open connection still counts under the new cap"
        );
        assert_eq!(
            adm.still_admitted(ip("192.0.2.7")),
            Err(RejectReason::Denied)
        );
        assert_eq!(adm.still_admitted(ip("192.0.2.1")), Ok(()));
        let one = adm.admit_connection().unwrap();
        assert_eq!(
            adm.admit_connection().err(),
            Some(RejectReason::MaxConnections)
        );
        drop((one, held));
        assert!(adm.admit_client(ip("192.0.2.1")).is_ok());
    }

    /// A handshake slot for `client` if one is free right now, else `None` (it would wait).
    async fn slot_now(adm: &Admission, client: &ClientGuard) -> Option<HandshakeSlot> {
        let slot = tokio::time::timeout(Duration::ZERO, adm.handshake_slot(client)).await;
        slot.ok().map(|r| r.expect("not refused per key"))
    }

    #[tokio::test]
    async fn handshake_slots_resize_with_held_permits() {
        let adm = admission(|c| c.limits.max_handshakes_in_flight = 2);
        let clients: Vec<_> = (1..=4)
            .map(|i| adm.admit_client(ip(&format!("192.0.2.{i}"))).unwrap())
            .collect();
        let a = slot_now(&adm, &clients[0]).await.unwrap();
        let b = slot_now(&adm, &clients[1]).await.unwrap();
        let mut config = Config::default();
        config.limits.max_handshakes_in_flight = 1;
        adm.reconfigure(&config);
        drop((a, b));
        // The permit still owed is taken by a background task as soon as one is free.
        tokio::task::yield_now().await;
        let only = slot_now(&adm, &clients[0]).await.unwrap();
        assert!(slot_now(&adm, &clients[1]).await.is_none());
        drop(only);
        config.limits.max_handshakes_in_flight = 3;
        adm.reconfigure(&config);
        let mut held = Vec::new();
        for client in &clients[..3] {
            held.push(slot_now(&adm, client).await.unwrap());
        }
        assert_eq!(adm.handshakes_in_flight(), 3);
        assert!(slot_now(&adm, &clients[3]).await.is_none());
    }

    #[tokio::test]
    async fn handshake_slots_are_refused_per_key_and_waited_for_globally() {
        let adm = admission(|c| {
            c.limits.max_handshakes_in_flight = 2;
            c.limits.max_handshakes_per_ip = 1;
        });
        let a = adm.admit_client(ip("192.0.2.1")).unwrap();
        let a2 = adm.admit_client(ip("192.0.2.1")).unwrap();
        let b = adm.admit_client(ip("192.0.2.2")).unwrap();
        let c = adm.admit_client(ip("192.0.2.3")).unwrap();
        let slot_a = adm.handshake_slot(&a).await.unwrap();
        assert_eq!(
            adm.handshake_slot(&a2).await.err(),
            Some(RejectReason::HandshakeCapacity),
            "one handshake in flight per key"
        );
        let _slot_b = adm.handshake_slot(&b).await.unwrap();
        assert_eq!(adm.handshakes_in_flight(), 2);
        // The pool is full: another key waits instead of being refused...
        let waited = tokio::time::timeout(Duration::from_millis(50), adm.handshake_slot(&c)).await;
        assert!(waited.is_err(), "waits while the pool is full");
        // ...and gets the place a finished handshake gives back.
        let waiting = adm.handshake_slot(&c);
        drop(slot_a);
        let _slot_c = tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("a freed place is handed on")
            .unwrap();
        // (The cancelled wait above gave c's key place back, else c would have been refused.)
        assert_eq!(adm.handshakes_in_flight(), 2);
        // a's handshake ended, so its key's place is free: a2 now waits for a global place
        // rather than being refused.
        let a2_waits =
            tokio::time::timeout(Duration::from_millis(50), adm.handshake_slot(&a2)).await;
        assert!(a2_waits.is_err());
    }

    #[test]
    fn failures_outside_the_window_do_not_add_up() {
        let adm = admission(|c| {
            c.auth.max_failures = 1;
            c.auth.failure_window = Duration::from_millis(30);
        });
        assert!(!adm.record_auth_failure(ip("192.0.2.1")));
        std::thread::sleep(Duration::from_millis(40));
        assert!(!adm.record_auth_failure(ip("192.0.2.1")));
        assert!(adm.record_auth_failure(ip("192.0.2.1")));
    }
}
