//! Admin bans shared through Redis (SPEC 9: `POST /bans` holds "with `[cluster]`, on every
//! replica"; an operator expects `DELETE /bans/...` to be cluster-wide too).
//!
//! # The model
//!
//! Redis holds the cluster's admin bans: one sorted set (member: the network, score: its
//! expiry on Redis' clock) and a *version*, `"<counter> <nonce>"`, whose counter grows at
//! every change (above the highest the writing replica has seen) and whose nonce tells two
//! histories apart. Each
//! replica's list (the one admission reads) mirrors that set: the sync script, in the same
//! call and round trip as the rest of the sync, applies this replica's queued changes and
//! returns the whole set only when the version differs from the one this replica last saw,
//! so a quiet sync costs one `GET`. A replica that starts reads the whole set at its
//! first sync.
//!
//! An admin request applies its change here at once (new connections are refused, open
//! ones closed, before the response) and queues it with [`AdminQueue::record`]; the sync
//! task is woken and publishes it, and the request waits at most [`CONFIRM_WAIT`] for
//! Redis' word. It never waits on a Redis that is down: the change holds here and stays
//! queued. Lifting an address also lifts its client key's authentication-failure ban
//! everywhere: the script removes the key's entries from the shared ban set and logs the
//! lift, which the other replicas read with the new bans.
//!
//! # While Redis is down, and after
//!
//! Changes made while Redis is unreachable hold on the replica that received them and are
//! published, in order, when Redis answers again: a ban with what is left of its duration
//! (one that expired meanwhile is dropped), a lift as a lift. Changes other replicas made
//! meanwhile stand unless this replica changed the same network; then the later
//! publication wins. Once `admin.max_bans` changes wait, a further one is refused (507)
//! rather than made here alone: the cluster's list, read when Redis is back, would undo it.
//!
//! If Redis comes back *empty* (restarted without persistence), the version is gone while
//! replicas still hold bans; if it comes back *stale* (restarted from an older snapshot, or
//! failed over to a lagging replica), the version is older than (or beside) the one the
//! replicas saw. Either way the script reports it (logged once per event) and applies none
//! of that sync's changes, and each such replica publishes every admin ban it holds (then
//! its queued changes) at its next sync under a higher version, so the bans survive a Redis
//! restart and bans made since the snapshot do not silently disappear. (Republishing adds:
//! a ban lifted since the snapshot comes back until lifted again. That is the safe
//! direction: letting the first republisher replace the set was tried and deletes bans
//! made on a replica that was not cut off during a failover, or, from a replica that keeps
//! only part of a long list, the longest bans.) The version
//! key lives as long as the longest ban it ever covered (never longer), so it is absent
//! only when Redis lost it or when every ban it covered has expired anyway.
//!
//! # Bounds
//!
//! The set never holds more than the writer's `admin.max_bans` (a ban beyond it is refused:
//! the request answers 507 and the ban is undone here), expired members are pruned at every
//! sync, and both keys expire with the longest ban (at most 365 days).
//!
//! # What is trusted
//!
//! Nothing read from Redis is taken as it comes (whoever can write to Redis writes it): each
//! network of the list passes the checks of a `POST /bans` body (a network or an address,
//! truncated to its network; a duration above 0 and at most 365 days), and a replica keeps
//! at most its own `admin.max_bans` of them (logged once when Redis holds more), since
//! admission scans the list on every accept.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use tokio::sync::oneshot;

use crate::bans::NetBan;

/// How long an admin request waits for Redis to confirm its change: the sync is woken at
/// once, so this covers one exchange already in flight and one carrying the change, each
/// bounded by the sync's own Redis timeout (1 s).
pub const CONFIRM_WAIT: Duration = Duration::from_secs(2);

/// One change an operator made through the admin API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminOp {
    /// Ban a network until then.
    Ban { net: IpNet, until: Instant },
    /// Lift the admin ban of exactly this network.
    Lift(IpNet),
    /// Lift the authentication-failure ban of this client key.
    LiftKey(IpAddr),
}

impl AdminOp {
    /// What the change is about: a later change to the same thing replaces it in the queue.
    fn target(&self) -> Target {
        match self {
            AdminOp::Ban { net, .. } | AdminOp::Lift(net) => Target::Net(*net),
            AdminOp::LiftKey(key) => Target::Key(*key),
        }
    }

    /// The network this change bans, if it is a ban.
    pub fn banned_net(&self) -> Option<IpNet> {
        match self {
            AdminOp::Ban { net, .. } => Some(*net),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Target {
    Net(IpNet),
    Key(IpAddr),
}

/// What Redis made of one queued change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Confirmed {
    Shared,
    /// The cluster holds `admin.max_bans` bans already.
    Refused,
}

/// What became of an admin change, for the response and the log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharing {
    /// Cluster mode is off: the change is this replica's.
    Standalone,
    /// In Redis: every replica applies it within `sync_interval`.
    Shared,
    /// The cluster holds `admin.max_bans` bans already: the ban was undone here too.
    Refused,
    /// Redis is unreachable or has not answered yet: in force here, published when it does.
    Later,
}

impl Sharing {
    /// How the response and the log put it.
    pub fn describe(self) -> &'static str {
        match self {
            Sharing::Standalone => "standalone",
            Sharing::Shared => "shared with every replica",
            Sharing::Refused => "refused: the cluster holds admin.max_bans bans already",
            Sharing::Later => {
                "in force on this replica; Redis has not confirmed it yet (unreachable?), \
                 it is shared when Redis answers"
            }
        }
    }
}

/// Too many admin changes wait for Redis: a new one is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0} changes wait for Redis already (admin.max_bans); try again once it answers")]
pub struct Backlog(pub usize);

/// Handed to the admin request that made a change: awaits Redis' word on it.
pub struct Ticket {
    waits: Vec<oneshot::Receiver<Confirmed>>,
    standalone: bool,
    /// Whether Redis answered the last sync when the change was made.
    up: bool,
}

impl Ticket {
    pub fn standalone() -> Ticket {
        Ticket {
            waits: Vec::new(),
            standalone: true,
            up: false,
        }
    }

    /// Redis' word, waited for at most [`CONFIRM_WAIT`] and not at all while Redis is down.
    pub async fn outcome(self) -> Sharing {
        if self.standalone {
            return Sharing::Standalone;
        }
        if !self.up {
            return Sharing::Later;
        }
        let all = futures_join(self.waits);
        match tokio::time::timeout(CONFIRM_WAIT, all).await {
            Ok(Some(results)) if results.contains(&Confirmed::Refused) => Sharing::Refused,
            Ok(Some(_)) => Sharing::Shared,
            // Replaced by a later change to the same ban, or the wait ran out.
            Ok(None) | Err(_) => Sharing::Later,
        }
    }
}

/// Every confirmation, in order; `None` if one was dropped unanswered.
async fn futures_join(waits: Vec<oneshot::Receiver<Confirmed>>) -> Option<Vec<Confirmed>> {
    let mut results = Vec::with_capacity(waits.len());
    for wait in waits {
        results.push(wait.await.ok()?);
    }
    Some(results)
}

/// A queued change and the request waiting for it.
struct Pending {
    seq: u64,
    op: AdminOp,
    done: Option<oneshot::Sender<Confirmed>>,
}

/// What one sync publishes.
#[derive(Debug, Default)]
pub struct AdminBatch {
    pub ops: Vec<AdminOp>,
    /// The last queued change included: those up to it are settled by the reply.
    through: u64,
    /// Whether the batch republishes every ban held here (Redis lost them).
    reseed: bool,
}

impl AdminBatch {
    /// Whether the batch republishes every ban held here (then Redis takes it whatever its
    /// version).
    pub fn republishes(&self) -> bool {
        self.reseed
    }
}

/// How this replica's admission list is read and written by the sync.
pub trait AdminBans {
    /// The admin bans in force here.
    fn in_force(&self) -> Vec<NetBan>;
    /// The cluster's list replaces this replica's (open connections are checked again).
    fn replace(&self, bans: Vec<NetBan>);
    /// Lifts `key`'s authentication-failure ban here (a queued lift on top of the bans
    /// just read).
    fn lift_key_ban(&self, key: IpAddr);
}

/// The changes still queued, on top of a list just read, in one pass: each network is
/// queued at most once ([`AdminQueue::record`] replaces an earlier change to it).
fn overlay(list: &mut Vec<NetBan>, pending: &[Pending], local: &impl AdminBans) {
    let touched: HashSet<IpNet> = pending
        .iter()
        .filter_map(|p| match p.op {
            AdminOp::Ban { net, .. } | AdminOp::Lift(net) => Some(net),
            AdminOp::LiftKey(_) => None,
        })
        .collect();
    list.retain(|b| !touched.contains(&b.net));
    for p in pending {
        match p.op {
            AdminOp::Ban { net, until } => list.push(NetBan { net, until }),
            AdminOp::Lift(_) => {}
            AdminOp::LiftKey(key) => local.lift_key_ban(key),
        }
    }
}

/// The admin changes waiting for Redis.
#[derive(Default)]
pub struct AdminQueue {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    pending: Vec<Pending>,
    next_seq: u64,
    reseed: bool,
}

impl AdminQueue {
    /// Runs `change` (which applies a change here and says what to publish, or fails) and
    /// queues what it returns, both under the queue's lock, so that a sync replacing this
    /// replica's list in between cannot drop the change. Refused, before `change` runs,
    /// once `cap` changes wait (one change queues at most two, so at most `cap` + 1 wait).
    pub fn record<E: From<Backlog>>(
        &self,
        cap: usize,
        up: bool,
        change: impl FnOnce() -> Result<Vec<AdminOp>, E>,
    ) -> Result<Ticket, E> {
        let mut inner = self.lock();
        if inner.pending.len() >= cap {
            return Err(Backlog(inner.pending.len()).into());
        }
        let ops = change()?;
        let mut ticket = Ticket {
            waits: Vec::new(),
            standalone: false,
            up,
        };
        for op in ops {
            let target = op.target();
            inner.pending.retain(|p| p.op.target() != target);
            let (done, wait) = oneshot::channel();
            inner.next_seq += 1;
            let seq = inner.next_seq;
            inner.pending.push(Pending {
                seq,
                op,
                done: Some(done),
            });
            ticket.waits.push(wait);
        }
        Ok(ticket)
    }

    /// The changes to publish now (every ban held here too, after Redis lost them).
    pub fn batch(&self, local: &impl AdminBans) -> AdminBatch {
        let inner = self.lock();
        let mut ops: Vec<AdminOp> = Vec::new();
        if inner.reseed {
            ops.extend(local.in_force().into_iter().map(|ban| AdminOp::Ban {
                net: ban.net,
                until: ban.until,
            }));
        }
        ops.extend(inner.pending.iter().map(|p| p.op));
        AdminBatch {
            ops,
            through: inner.pending.last().map_or(0, |p| p.seq),
            reseed: inner.reseed,
        }
    }

    /// Redis applied `batch`: its changes are settled (`refused` bans are undone here), and
    /// `fresh`, the cluster's list when it changed, replaces this replica's, with the
    /// changes queued since the batch was taken applied on top.
    pub fn settle(
        &self,
        batch: &AdminBatch,
        refused: &[IpNet],
        fresh: Option<Vec<NetBan>>,
        local: &impl AdminBans,
    ) {
        let mut inner = self.lock();
        if batch.reseed {
            inner.reseed = false;
        }
        let (done, waiting): (Vec<Pending>, Vec<Pending>) = std::mem::take(&mut inner.pending)
            .into_iter()
            .partition(|p| p.seq <= batch.through);
        inner.pending = waiting;
        // A refused ban is undone here unless a later change to it waits.
        let queued: HashSet<Target> = inner.pending.iter().map(|p| p.op.target()).collect();
        let undo: HashSet<IpNet> = refused
            .iter()
            .copied()
            .filter(|net| !queued.contains(&Target::Net(*net)))
            .collect();
        // The new list is built once and replaces this replica's once (the lock is held
        // for O(list + queue), not a copy of the list per queued change).
        if fresh.is_some() || !undo.is_empty() {
            let list = match fresh {
                Some(mut list) => {
                    overlay(&mut list, &inner.pending, local);
                    list
                }
                None => local.in_force(),
            };
            local.replace(
                list.into_iter()
                    .filter(|b| !undo.contains(&b.net))
                    .collect(),
            );
        }
        // Told last, so that a request hears of a refusal once the ban is undone.
        for p in done {
            let refused_here = p.op.banned_net().is_some_and(|net| refused.contains(&net));
            let word = if refused_here {
                Confirmed::Refused
            } else {
                Confirmed::Shared
            };
            if let Some(done) = p.done {
                // The request may have stopped waiting.
                let _ = done.send(word);
            }
        }
    }

    /// Redis lost (or rolled back) the admin bans: the next batch republishes every one
    /// held here.
    pub fn reseed(&self) {
        self.lock().reseed = true;
    }

    /// Changes waiting for Redis.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().pending.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex as StdMutex;

    /// A replica's list, as a plain vector, and how many times the sync replaced it.
    #[derive(Default)]
    struct List(StdMutex<Vec<NetBan>>, std::sync::atomic::AtomicUsize);

    impl AdminBans for List {
        fn in_force(&self) -> Vec<NetBan> {
            self.0.lock().unwrap().clone()
        }
        fn replace(&self, bans: Vec<NetBan>) {
            self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            *self.0.lock().unwrap() = bans;
        }
        fn lift_key_ban(&self, _: IpAddr) {}
    }

    impl List {
        /// An API change made here.
        fn apply(&self, op: AdminOp) {
            let mut list = self.0.lock().unwrap();
            match op {
                AdminOp::Ban { net, until } => {
                    list.retain(|b| b.net != net);
                    list.push(NetBan { net, until });
                }
                AdminOp::Lift(net) => list.retain(|b| b.net != net),
                AdminOp::LiftKey(_) => {}
            }
        }
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ban(list: &List, queue: &AdminQueue, s: &str, cap: usize) -> Result<Ticket, Backlog> {
        let op = AdminOp::Ban {
            net: net(s),
            until: Instant::now() + Duration::from_secs(60),
        };
        queue.record(cap, true, || {
            list.apply(op);
            Ok(vec![op])
        })
    }

    #[tokio::test]
    async fn a_change_queued_during_a_sync_survives_the_list_that_sync_reads() {
        let (list, queue) = (List::default(), AdminQueue::default());
        let first = ban(&list, &queue, "192.0.2.0/24", 8).unwrap();
        let batch = queue.batch(&list);
        assert_eq!(batch.ops.len(), 1);
        // Queued while the batch is with Redis: not in the list Redis returns.
        let _second = ban(&list, &queue, "198.51.100.0/24", 8).unwrap();
        let from_redis = vec![NetBan {
            net: net("192.0.2.0/24"),
            until: Instant::now() + Duration::from_secs(60),
        }];
        queue.settle(&batch, &[], Some(from_redis), &list);
        let nets: Vec<IpNet> = list.in_force().iter().map(|b| b.net).collect();
        assert_eq!(nets, [net("192.0.2.0/24"), net("198.51.100.0/24")]);
        assert_eq!(queue.len(), 1, "the second still waits");
        assert_eq!(first.outcome().await, Sharing::Shared);
    }

    #[tokio::test]
    async fn a_refused_ban_is_undone_and_reported() {
        let (list, queue) = (List::default(), AdminQueue::default());
        let ticket = ban(&list, &queue, "192.0.2.0/24", 8).unwrap();
        let batch = queue.batch(&list);
        queue.settle(&batch, &[net("192.0.2.0/24")], None, &list);
        assert!(list.in_force().is_empty());
        assert_eq!(ticket.outcome().await, Sharing::Refused);
    }

    #[tokio::test]
    async fn the_queue_is_capped_and_a_repeat_replaces() {
        let (list, queue) = (List::default(), AdminQueue::default());
        ban(&list, &queue, "192.0.2.0/24", 2).unwrap();
        ban(&list, &queue, "192.0.2.0/24", 2).unwrap();
        assert_eq!(queue.len(), 1);
        ban(&list, &queue, "198.51.100.0/24", 2).unwrap();
        assert_eq!(
            ban(&list, &queue, "203.0.113.0/24", 2).err(),
            Some(Backlog(2))
        );
        assert_eq!(
            list.in_force().len(),
            2,
            "a refused change is not made here"
        );
    }

    #[test]
    fn settling_a_long_queue_replaces_the_list_once() {
        let (list, queue) = (List::default(), AdminQueue::default());
        ban(&list, &queue, "192.0.2.0/24", 4096).unwrap();
        let batch = queue.batch(&list);
        // 1,000 changes queued while the batch is with Redis, one of them lifting a network
        // the cluster's list holds.
        for i in 0..1000u32 {
            ban(
                &list,
                &queue,
                &format!("10.{}.{}.0/24", i >> 8, i & 255),
                4096,
            )
            .unwrap();
        }
        let lift = AdminOp::Lift(net("198.51.100.0/24"));
        queue
            .record(4096, true, || Ok::<_, Backlog>(vec![lift]))
            .unwrap();
        let until = Instant::now() + Duration::from_secs(60);
        let from_redis = ["192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24"]
            .iter()
            .map(|s| NetBan { net: net(s), until })
            .collect();
        queue.settle(&batch, &[], Some(from_redis), &list);
        assert_eq!(list.1.load(std::sync::atomic::Ordering::Relaxed), 1);
        let nets: Vec<IpNet> = list.in_force().iter().map(|b| b.net).collect();
        assert_eq!(
            nets.len(),
            1002,
            "the cluster's two, and the 1,000 queued bans"
        );
        assert!(
            !nets.contains(&net("198.51.100.0/24")),
            "the queued lift holds"
        );
        assert!(nets.contains(&net("203.0.113.0/24")) && nets.contains(&net("10.3.231.0/24")));
    }

    #[test]
    fn after_redis_lost_its_bans_the_next_batch_republishes_them() {
        let (list, queue) = (List::default(), AdminQueue::default());
        ban(&list, &queue, "192.0.2.0/24", 8).unwrap();
        let batch = queue.batch(&list);
        queue.settle(&batch, &[], None, &list);
        assert!(queue.batch(&list).ops.is_empty());
        queue.reseed();
        let batch = queue.batch(&list);
        assert_eq!(batch.ops.len(), 1);
        queue.settle(&batch, &[], None, &list);
        assert!(queue.batch(&list).ops.is_empty(), "once");
    }
}
