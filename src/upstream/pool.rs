//! The configured servers, their health (rise/fall) and the choice of a server by
//! `balance` among those up.
//!
//! A reload builds a new [`Pool`] from the new `[upstream]`; a server still alive (the same
//! configured address, resolved to the same place) is carried over as the same [`Server`],
//! with its up/down state and its count of open connections, so that a reload neither
//! resets health nor lets `max_connections_per_server` be passed. A server the new pool
//! drops is retired: its open connections go on (their [`ServerSlot`] holds it), but it is
//! never chosen again, its checks stop, and its `up` gauge reads 0. The [`Registry`]
//! remembers it while a connection holds it, and until the next reload in any case, so that
//! a later reload listing it again (an operator rolling back) brings back that same server,
//! not a fresh one with no connections and no failures.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::Balance;

/// With passive checks only, a server that is down gets one real connection attempt this
/// often; that attempt counts as its check (SPEC section 6).
pub(super) const PASSIVE_RETRY: Duration = Duration::from_secs(10);

/// Where a server listens, resolved.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// One configured server, shared by every pool that lists it and by the connections open
/// to it.
pub(super) struct Server {
    /// The address as configured: the `server` label of its gauge, and (with `target`)
    /// what a reload recognises it by.
    label: String,
    pub(super) target: Target,
    /// Relayed connections open to it, for `least_conn` and `max_connections_per_server`.
    active: AtomicUsize,
    health: Mutex<Health>,
    /// `portcullis_upstream_server_up{server}`, labelled with the configured address.
    up_gauge: metrics::Gauge,
}

/// The rise/fall state of one server.
#[derive(Debug)]
struct Health {
    up: bool,
    /// Consecutive successes while down.
    successes: u32,
    /// Consecutive failures while up.
    failures: u32,
    /// Passive mode: when a down server may be tried again.
    retry_at: Instant,
    /// A reload removed it: it is not chosen, and what its last connects and checks find
    /// no longer counts (nor shows in the gauge, which a server of the same address may
    /// own now). `up` keeps the state it was retired in, for a reload that lists it again.
    retired: bool,
}

impl Server {
    /// A server starts up, so that the first clients are served while the first checks run.
    fn new(label: String, target: Target) -> Server {
        let up_gauge = crate::metrics::upstream_server_gauge(&label);
        up_gauge.set(1.0);
        Server {
            label,
            target,
            active: AtomicUsize::new(0),
            health: Mutex::new(Health {
                up: true,
                successes: 0,
                failures: 0,
                retry_at: Instant::now(),
                retired: false,
            }),
            up_gauge,
        }
    }

    fn is_up(&self) -> bool {
        self.health
            .lock()
            .map(|h| h.up && !h.retired)
            .unwrap_or(false)
    }

    /// Taken out of service by a reload: not chosen while retired. Its gauge reads 0
    /// unless `label_kept` (the new pool has a server of the same address, which owns it).
    fn retire(&self, label_kept: bool) {
        let mut health = self.health.lock().unwrap_or_else(|e| e.into_inner());
        health.retired = true;
        if !label_kept {
            self.up_gauge.set(0.0);
        }
    }

    /// Listed again by a reload: back in service in the state it was retired in.
    fn reinstate(&self) {
        let mut health = self.health.lock().unwrap_or_else(|e| e.into_inner());
        health.retired = false;
        self.up_gauge.set(if health.up { 1.0 } else { 0.0 });
    }
}

/// Every server still alive (in a pool, or retired with connections still open), by
/// configured address and resolved target. Bounded: an entry goes with the last
/// reference to its server, and dead entries are dropped at each reload.
#[derive(Default)]
pub(super) struct Registry {
    servers: Mutex<HashMap<(String, Target), Weak<Server>>>,
    /// The servers the last reload retired, kept alive until the next one, so that a
    /// rollback finds a down server down even when no connection held it.
    just_retired: Mutex<Vec<Arc<Server>>>,
}

impl Registry {
    /// The live server for `label` at `target`, back in service, or a new one.
    fn server(
        map: &mut HashMap<(String, Target), Weak<Server>>,
        label: String,
        target: Target,
    ) -> Arc<Server> {
        let key = (label, target);
        if let Some(server) = map.get(&key).and_then(Weak::upgrade) {
            server.reinstate();
            return server;
        }
        let server = Arc::new(Server::new(key.0.clone(), key.1.clone()));
        map.insert(key, Arc::downgrade(&server));
        server
    }
}

/// The servers and the settings that choose among them.
pub(super) struct Pool {
    pub(super) servers: Vec<Arc<Server>>,
    balance: Balance,
    max_per_server: usize,
    rise: u32,
    fall: u32,
    /// No active checks: down servers are retried by real connections.
    passive_only: bool,
    /// The round-robin cursor (also breaks `least_conn` ties, so they rotate).
    next: AtomicUsize,
}

/// Settings of a [`Pool`].
pub(super) struct PoolSettings {
    pub balance: Balance,
    pub max_per_server: usize,
    pub rise: u32,
    pub fall: u32,
    pub passive_only: bool,
}

/// A place on one server, held for the life of a relayed connection, whatever reloads
/// happen meanwhile.
pub struct ServerSlot {
    server: Arc<Server>,
    /// The server's place in the pool it was chosen from (to retry on another one).
    index: usize,
}

impl Drop for ServerSlot {
    fn drop(&mut self) {
        self.server.active.fetch_sub(1, Ordering::Relaxed);
        crate::metrics::upstream_connections(-1.0);
    }
}

impl ServerSlot {
    pub(super) fn index(&self) -> usize {
        self.index
    }

    pub(super) fn server(&self) -> &Server {
        &self.server
    }
}

impl Pool {
    /// The pool of `servers` (configured address, resolved target). A server `registry`
    /// still has alive (in the running pool, or retired with connections open) is carried
    /// over with its health and open connections; the others are new, and start up.
    pub(super) fn new(
        servers: Vec<(String, Target)>,
        settings: PoolSettings,
        registry: &Registry,
    ) -> Pool {
        let mut map = registry.servers.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, server| server.strong_count() > 0);
        let servers = servers
            .into_iter()
            .map(|(label, target)| Registry::server(&mut map, label, target))
            .collect();
        Pool {
            servers,
            balance: settings.balance,
            max_per_server: settings.max_per_server,
            rise: settings.rise,
            fall: settings.fall,
            passive_only: settings.passive_only,
            next: AtomicUsize::new(0),
        }
    }

    /// Retires the servers of this pool that `next` no longer has; `registry` keeps them
    /// until the next reload.
    pub(super) fn retire_removed(&self, next: &Pool, registry: &Registry) {
        let mut retired = Vec::new();
        for server in &self.servers {
            if !next.servers.iter().any(|s| Arc::ptr_eq(s, server)) {
                let label_kept = next.servers.iter().any(|s| s.label == server.label);
                server.retire(label_kept);
                retired.push(server.clone());
            }
        }
        *registry
            .just_retired
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = retired;
    }

    /// Where the server configured as `label` resolved to, if this pool has it.
    pub(super) fn target_of(&self, label: &str) -> Option<Target> {
        let server = self.servers.iter().find(|s| s.label == label)?;
        Some(server.target.clone())
    }

    pub(super) fn any_up(&self) -> bool {
        self.servers.iter().any(|s| s.is_up())
    }

    /// Chooses a server other than `exclude`: by `balance` among those up with room, else
    /// (passive mode) a down server whose retry time has come. Its slot is taken.
    pub(super) fn pick(&self, exclude: Option<usize>) -> Option<ServerSlot> {
        self.pick_at(exclude, Instant::now())
    }

    fn pick_at(&self, exclude: Option<usize>, now: Instant) -> Option<ServerSlot> {
        let n = self.servers.len();
        // A retry goes on from where its connection's first pick left the cursor, so that
        // each connection advances round-robin by one whether or not it needed a retry.
        let start = match exclude {
            None => self.next.fetch_add(1, Ordering::Relaxed),
            Some(_) => self.next.load(Ordering::Relaxed),
        };
        let order = (0..n)
            .map(|k| (start + k) % n)
            .filter(|&i| Some(i) != exclude);
        let up: Vec<usize> = order.clone().filter(|&i| self.servers[i].is_up()).collect();
        let chosen = match self.balance {
            Balance::RoundRobin => up.iter().copied().find(|&i| self.has_room(i)),
            Balance::LeastConn => up
                .iter()
                .copied()
                .filter(|&i| self.has_room(i))
                .min_by_key(|&i| self.servers[i].active.load(Ordering::Relaxed)),
        };
        let chosen = chosen.or_else(|| {
            let mut candidates = order.filter(|&i| self.has_room(i));
            candidates.find(|&i| self.passive_only && self.claim_retry(i, now))
        })?;
        // Chosen by a plain read: the place is taken only if it is still free now, so that
        // connections picking at the same moment never pass `max_connections_per_server`.
        let server = &self.servers[chosen];
        server
            .active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_per_server).then_some(n + 1)
            })
            .ok()?;
        crate::metrics::upstream_connections(1.0);
        Some(ServerSlot {
            server: server.clone(),
            index: chosen,
        })
    }

    fn has_room(&self, i: usize) -> bool {
        self.servers[i].active.load(Ordering::Relaxed) < self.max_per_server
    }

    /// True (once per [`PASSIVE_RETRY`]) when a down server may be tried by a real
    /// connection.
    fn claim_retry(&self, i: usize, now: Instant) -> bool {
        let Ok(mut health) = self.servers[i].health.lock() else {
            return false;
        };
        if health.up || health.retired || now < health.retry_at {
            return false;
        }
        health.retry_at = now + PASSIVE_RETRY;
        true
    }

    /// Records the result of a check or a connect on `server`; `rise` consecutive
    /// successes mark it up, `fall` consecutive failures down. A retired server's results
    /// no longer count.
    pub(super) fn record(&self, server: &Server, ok: bool) {
        let Ok(mut health) = server.health.lock() else {
            return;
        };
        if health.retired {
            return;
        }
        let was_up = health.up;
        if ok {
            health.failures = 0;
            if !health.up {
                health.successes += 1;
                if health.successes >= self.rise {
                    health.up = true;
                }
            }
        } else {
            health.successes = 0;
            if health.up {
                health.failures += 1;
                if health.failures >= self.fall {
                    health.up = false;
                    health.retry_at = crate::deadline::from_now(PASSIVE_RETRY);
                }
            }
        }
        if health.up != was_up {
            server.up_gauge.set(if health.up { 1.0 } else { 0.0 });
            tracing::warn!(server = ?server.target, up = health.up, "upstream server changed state");
            health.failures = 0;
            health.successes = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(n: usize, balance: Balance, passive_only: bool) -> Arc<Pool> {
        let servers = (0..n)
            .map(|i| {
                let addr: SocketAddr = format!("127.0.0.1:{}", 7000 + i).parse().unwrap();
                (addr.to_string(), Target::Tcp(addr))
            })
            .collect();
        Arc::new(Pool::new(
            servers,
            PoolSettings {
                balance,
                max_per_server: 2,
                rise: 2,
                fall: 3,
                passive_only,
            },
            &Registry::default(),
        ))
    }

    #[test]
    fn round_robin_takes_each_server_in_turn() {
        let p = pool(3, Balance::RoundRobin, false);
        let picked: Vec<usize> = (0..6).map(|_| p.pick(None).unwrap().index()).collect();
        assert_eq!(picked, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn least_conn_prefers_the_emptiest_and_respects_the_cap() {
        let p = pool(2, Balance::LeastConn, false);
        let a = p.pick(None).unwrap();
        let b = p.pick(None).unwrap();
        assert_ne!(a.index(), b.index());
        let c = p.pick(None).unwrap();
        let d = p.pick(None).unwrap();
        assert_ne!(c.index(), d.index());
        assert!(
            p.pick(None).is_none(),
            "both servers at max_connections_per_server"
        );
        drop(a);
        assert_eq!(p.pick(None).unwrap().index(), 0);
    }

    #[test]
    fn fall_marks_down_rise_marks_up() {
        let p = pool(2, Balance::RoundRobin, false);
        p.record(&p.servers[0], false);
        p.record(&p.servers[0], false);
        assert!(p.servers[0].is_up());
        p.record(&p.servers[0], false);
        assert!(!p.servers[0].is_up());
        for _ in 0..4 {
            assert_eq!(p.pick(None).unwrap().index(), 1, "a down server is skipped");
        }
        assert!(p.pick(Some(1)).is_none(), "no retry on a down server");
        p.record(&p.servers[0], true);
        assert!(!p.servers[0].is_up());
        p.record(&p.servers[0], true);
        assert!(p.servers[0].is_up());
        assert!(p.any_up());
    }

    #[test]
    fn passive_mode_retries_a_down_server_once_per_period() {
        let p = pool(1, Balance::RoundRobin, true);
        for _ in 0..3 {
            p.record(&p.servers[0], false);
        }
        assert!(!p.any_up());
        assert!(p.pick(None).is_none(), "not before PASSIVE_RETRY");
        let later = Instant::now() + PASSIVE_RETRY;
        assert!(p.pick_at(None, later).is_some(), "one real attempt");
        assert!(p.pick_at(None, later).is_none(), "only one per period");
        let active = pool(1, Balance::RoundRobin, false);
        for _ in 0..3 {
            active.record(&active.servers[0], false);
        }
        assert!(
            active.pick_at(None, later).is_none(),
            "active checks bring it back"
        );
    }

    fn settings(max_per_server: usize, fall: u32) -> PoolSettings {
        PoolSettings {
            balance: Balance::LeastConn,
            max_per_server,
            rise: 2,
            fall,
            passive_only: false,
        }
    }

    fn tcp(port: u16) -> (String, Target) {
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        (addr.to_string(), Target::Tcp(addr))
    }

    #[test]
    fn a_reload_keeps_a_kept_servers_health_and_connections_and_retires_the_rest() {
        let registry = Registry::default();
        let old = Pool::new(vec![tcp(7000), tcp(7001)], settings(1, 1), &registry);
        let held = old.pick(None).unwrap();
        let kept = held.index();
        let gone = 1 - kept;
        old.record(&old.servers[kept], false);
        assert!(!old.servers[kept].is_up());
        old.record(&old.servers[kept], true);
        let removed = old.servers[gone].clone();
        let servers = vec![
            (
                old.servers[kept].label.clone(),
                old.servers[kept].target.clone(),
            ),
            tcp(7002),
        ];
        let new = Pool::new(servers, settings(1, 5), &registry);
        old.retire_removed(&new, &registry);
        assert!(Arc::ptr_eq(&new.servers[0], &old.servers[kept]));
        assert!(!new.servers[0].is_up(), "still down: one success of rise 2");
        new.record(&new.servers[0], true);
        assert!(new.servers[0].is_up(), "its success count survived too");
        assert!(new.servers[1].is_up(), "a new server starts up");
        assert!(removed.health.lock().unwrap().retired);
        old.record(&removed, true);
        assert!(
            !removed.is_up(),
            "a retired server's results no longer count"
        );
        // The kept server's open connection still counts against the new cap.
        let other = new.pick(None).unwrap();
        assert_eq!(other.index(), 1);
        assert!(
            new.pick(None).is_none(),
            "both at max_connections_per_server"
        );
        drop(held);
        assert_eq!(new.servers[0].active.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn the_same_address_resolved_elsewhere_is_a_new_server() {
        let registry = Registry::default();
        let old = Pool::new(vec![tcp(7000)], settings(1, 1), &registry);
        old.record(&old.servers[0], false);
        let label = old.servers[0].label.clone();
        let elsewhere = Target::Tcp("127.0.0.2:7000".parse().unwrap());
        let new = Pool::new(vec![(label, elsewhere)], settings(1, 1), &registry);
        assert!(!Arc::ptr_eq(&new.servers[0], &old.servers[0]));
        assert!(new.servers[0].is_up());
    }

    #[test]
    fn a_server_listed_again_comes_back_with_its_connections_and_its_health() {
        let registry = Registry::default();
        let x = Pool::new(vec![tcp(7000), tcp(7001)], settings(1, 1), &registry);
        let held = x.pick(None).unwrap();
        let (open, down) = (held.index(), 1 - held.index());
        x.record(&x.servers[down], false);
        let y = Pool::new(vec![tcp(7002)], settings(1, 1), &registry);
        x.retire_removed(&y, &registry);
        assert!(!x.servers[open].is_up(), "retired: not chosen");
        let back = Pool::new(vec![tcp(7000), tcp(7001)], settings(1, 1), &registry);
        y.retire_removed(&back, &registry);
        assert!(Arc::ptr_eq(&back.servers[open], &x.servers[open]));
        assert!(back.servers[open].is_up(), "back in service");
        assert!(!back.servers[down].is_up(), "a down server stays down");
        assert!(
            back.pick(None).is_none(),
            "the open connection still counts against max_connections_per_server"
        );
        drop((held, x));
        // Even with no connection on it, the down server is still down at a rollback.
        let z = Pool::new(vec![tcp(7003)], settings(1, 1), &registry);
        back.retire_removed(&z, &registry);
        drop(back);
        let again = Pool::new(vec![tcp(7000 + down as u16)], settings(1, 1), &registry);
        assert!(!again.servers[0].is_up(), "a down server stays down");
        z.retire_removed(&again, &registry);
        drop((y, z, again));
        // Neither a connection nor the last reload holds it any more: it is forgotten.
        let fresh = Pool::new(vec![tcp(7000 + open as u16)], settings(1, 1), &registry);
        assert!(fresh.servers[0].is_up(), "a new server");
        let alive = registry.servers.lock().unwrap().len();
        assert_eq!(
            alive, 2,
            "the fresh one and the one the last reload retired"
        );
    }
}
