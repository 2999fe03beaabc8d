//! The configured servers, their health (rise/fall) and the choice of a server by
//! `balance` among those up.
//!
//! A reload builds a new [`Pool`] from the new `[upstream]`; a server the old pool also had
//! (the same configured address, resolved to the same place) is carried over as the same
//! [`Server`], with its up/down state and its count of open connections, so that a reload
//! neither resets health nor lets `max_connections_per_server` be passed. A server the new
//! pool drops is retired: its open connections go on (their [`ServerSlot`] holds it), but it
//! is never chosen again, its checks stop, and its `up` gauge reads 0.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::Balance;

/// With passive checks only, a server that is down gets one real connection attempt this
/// often; that attempt counts as its check (SPEC section 6).
pub(super) const PASSIVE_RETRY: Duration = Duration::from_secs(10);

/// Where a server listens, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
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
    /// A reload removed it: what its last connects and checks find no longer counts (nor
    /// shows in the gauge, which a server of the same address may own now).
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
        self.health.lock().map(|h| h.up).unwrap_or(false)
    }

    /// Taken out of service by a reload: never chosen again, its gauge reads 0.
    fn retire(&self) {
        let mut health = self.health.lock().unwrap_or_else(|e| e.into_inner());
        health.retired = true;
        health.up = false;
        self.up_gauge.set(0.0);
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
    /// The pool of `servers` (configured address, resolved target). Those `previous` also
    /// had are carried over with their health and open connections; the rest of
    /// `previous` is retired first, so that a server re-created under the same address
    /// owns its gauge from then on.
    pub(super) fn new(
        servers: Vec<(String, Target)>,
        settings: PoolSettings,
        previous: Option<&Pool>,
    ) -> Pool {
        let old = previous.map_or(&[][..], |p| p.servers.as_slice());
        let same =
            |s: &Server, label: &str, target: &Target| s.label == label && s.target == *target;
        for server in old {
            if !servers.iter().any(|(l, t)| same(server, l, t)) {
                server.retire();
            }
        }
        let servers = servers
            .into_iter()
            .map(|(label, target)| {
                old.iter()
                    .find(|s| same(s, &label, &target))
                    .cloned()
                    .unwrap_or_else(|| Arc::new(Server::new(label, target)))
            })
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
            None,
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
        let old = Pool::new(vec![tcp(7000), tcp(7001)], settings(1, 1), None);
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
        let new = Pool::new(servers, settings(1, 5), Some(&old));
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
        let old = Pool::new(vec![tcp(7000)], settings(1, 1), None);
        old.record(&old.servers[0], false);
        let label = old.servers[0].label.clone();
        let elsewhere = Target::Tcp("127.0.0.2:7000".parse().unwrap());
        let new = Pool::new(vec![(label, elsewhere)], settings(1, 1), Some(&old));
        assert!(!Arc::ptr_eq(&new.servers[0], &old.servers[0]));
        assert!(new.servers[0].is_up());
    }
}
