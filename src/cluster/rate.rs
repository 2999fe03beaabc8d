//! This replica's view of the cluster-wide connection rate of each client key.
//!
//! Admission asks [`SharedRate::may_admit`] (a map lookup, never a network wait) and
//! reports each connection it admits with [`SharedRate::admitted`]. The sync task moves the
//! counts not yet published into a batch ([`SharedRate::take_batch`]), publishes them, and
//! writes back the cluster's totals ([`SharedRate::apply`]). The module docs of
//! [`crate::cluster`] explain why this keeps every 10 s window within SPEC 7's bound.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;

/// The window SPEC 7 bounds.
pub const WINDOW: Duration = Duration::from_secs(10);
/// One-second buckets summed per check: 11 of them cover every 10 s window, wherever it
/// starts, so that the last admission of any window saw all the others of that window.
pub const BUCKETS: u64 = 11;
/// The most keys published in one sync: one script call stays short even under a spray;
/// keys beyond it are published by the next syncs.
pub const MAX_KEYS_PER_SYNC: usize = 20_000;

/// One key's counts.
#[derive(Debug)]
struct Entry {
    /// The cluster's total over the last [`BUCKETS`] seconds, as of the last sync.
    seen: u64,
    /// Admitted here since the last batch was taken.
    pending: u64,
    /// Taken into the batch that is being published, not yet in `seen`.
    in_flight: u64,
    /// The last time this replica admitted the key: its entry is dropped once the key has
    /// been quiet here for longer than the window.
    last_admit: Instant,
}

impl Entry {
    /// Admissions of this replica that the cluster's total does not hold yet.
    fn unconfirmed(&self) -> u64 {
        self.pending + self.in_flight
    }
}

/// Shared-rate state: one entry per key this replica admitted within the window.
pub struct SharedRate {
    entries: DashMap<IpAddr, Entry>,
    /// `10 × connection_rate_per_ip + connection_burst_per_ip`: the cluster's budget per key
    /// and window (a reload may change it).
    budget: AtomicU64,
    /// How many admissions of one key this replica may make before the cluster has counted
    /// them: `budget / (8 × replicas)`, at least 1. Updated from each sync's replica count.
    unconfirmed_cap: AtomicU64,
}

impl SharedRate {
    pub fn new(rate_per_second: u32, burst: u32) -> Self {
        let shared = SharedRate {
            entries: DashMap::new(),
            budget: AtomicU64::new(0),
            unconfirmed_cap: AtomicU64::new(1),
        };
        shared.set_limits(rate_per_second, burst);
        shared
    }

    /// Sets the budget from the per-key rate and burst (at start and on reload).
    pub fn set_limits(&self, rate_per_second: u32, burst: u32) {
        let budget = WINDOW.as_secs() * u64::from(rate_per_second) + u64::from(burst);
        self.budget.store(budget, Ordering::Relaxed);
        self.set_replicas(1);
    }

    /// The cluster's budget per key and window.
    pub fn budget(&self) -> u64 {
        self.budget.load(Ordering::Relaxed)
    }

    /// Whether the cluster's budget allows one more connection from `key`, from what this
    /// replica knows now.
    pub fn may_admit(&self, key: IpAddr) -> bool {
        let Some(entry) = self.entries.get(&key) else {
            return true;
        };
        let cap = self.unconfirmed_cap.load(Ordering::Relaxed);
        entry.seen + entry.unconfirmed() < self.budget() && entry.unconfirmed() < cap
    }

    /// One connection from `key` was admitted here.
    pub fn admitted(&self, key: IpAddr) {
        let now = Instant::now();
        let mut entry = self.entries.entry(key).or_insert_with(|| Entry {
            seen: 0,
            pending: 0,
            in_flight: 0,
            last_admit: now,
        });
        entry.pending += 1;
        entry.last_admit = now;
    }

    /// Drops the keys that have been quiet here for longer than the window (the cluster's
    /// totals of those matter again only when they connect again, and then they start
    /// unconfirmed), and moves the pending counts of the others into the batch to publish:
    /// `(key, count)`, the count 0 for keys whose total is only fetched.
    pub fn take_batch(&self) -> Vec<(IpAddr, u64)> {
        self.prune();
        let mut batch = Vec::with_capacity(self.entries.len().min(MAX_KEYS_PER_SYNC));
        for mut entry in self.entries.iter_mut() {
            if batch.len() >= MAX_KEYS_PER_SYNC {
                break;
            }
            let pending = std::mem::take(&mut entry.pending);
            entry.in_flight += pending;
            batch.push((*entry.key(), pending));
        }
        batch
    }

    /// The batch was published: `totals` are the cluster's totals of its keys, in order,
    /// counts of the batch included; `replicas` is how many replicas synced lately.
    pub fn apply(&self, batch: &[(IpAddr, u64)], totals: &[u64], replicas: u64) {
        for ((key, _), total) in batch.iter().zip(totals) {
            if let Some(mut entry) = self.entries.get_mut(key) {
                entry.seen = *total;
                entry.in_flight = 0;
            }
        }
        self.set_replicas(replicas);
    }

    /// The batch was not published (Redis is down): its counts are forgotten, so that the
    /// unconfirmed count does not grow while nothing can confirm it.
    pub fn abandon(&self, batch: &[(IpAddr, u64)]) {
        for (key, _) in batch {
            if let Some(mut entry) = self.entries.get_mut(key) {
                entry.in_flight = 0;
            }
        }
    }

    /// Drops entries of keys not admitted here within the window (every sync: a cheap
    /// pass; the map's spare capacity is given back by [`SharedRate::shrink`]).
    pub fn prune(&self) {
        let now = Instant::now();
        self.entries.retain(|_, e| {
            now.saturating_duration_since(e.last_admit) <= WINDOW + Duration::from_secs(1)
        });
    }

    /// Gives the map's spare capacity back (after a spray, with the limiter pruning).
    pub fn shrink(&self) {
        self.entries.shrink_to_fit();
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn set_replicas(&self, replicas: u64) {
        let cap = (self.budget() / (8 * replicas.max(1))).max(1);
        self.unconfirmed_cap.store(cap, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, last])
    }

    #[test]
    fn a_key_over_the_cluster_budget_is_refused_until_its_total_drops() {
        // budget = 10 × 1 + 6 = 16; unconfirmed cap with 1 replica = 2.
        let rate = SharedRate::new(1, 6);
        assert_eq!(rate.budget(), 16);
        assert!(rate.may_admit(ip(1)));
        rate.admitted(ip(1));
        let batch = rate.take_batch();
        assert_eq!(batch, vec![(ip(1), 1)]);
        // Other replicas admitted 14 more: the cluster's total is 15.
        rate.apply(&batch, &[15], 1);
        assert!(rate.may_admit(ip(1)));
        rate.admitted(ip(1));
        assert!(
            !rate.may_admit(ip(1)),
            "15 seen + 1 unconfirmed = the budget"
        );
        assert!(rate.may_admit(ip(2)), "other keys are not affected");
        let batch = rate.take_batch();
        rate.apply(&batch, &[3], 1);
        assert!(
            rate.may_admit(ip(1)),
            "the window moved on: the total dropped"
        );
    }

    #[test]
    fn unconfirmed_admissions_are_capped_per_replica_count() {
        // budget 10 × 10 + 60 = 160: cap 20 with one replica, 10 with two.
        let rate = SharedRate::new(10, 60);
        for _ in 0..20 {
            assert!(rate.may_admit(ip(1)));
            rate.admitted(ip(1));
        }
        assert!(!rate.may_admit(ip(1)), "20 unconfirmed: wait for the sync");
        let batch = rate.take_batch();
        assert!(
            !rate.may_admit(ip(1)),
            "in flight still counts as unconfirmed"
        );
        rate.apply(&batch, &[20], 2);
        for _ in 0..10 {
            assert!(rate.may_admit(ip(1)));
            rate.admitted(ip(1));
        }
        assert!(!rate.may_admit(ip(1)), "two replicas: cap 10");
    }

    #[test]
    fn an_abandoned_batch_frees_its_unconfirmed_places() {
        let rate = SharedRate::new(1, 6);
        rate.admitted(ip(1));
        rate.admitted(ip(1));
        assert!(!rate.may_admit(ip(1)));
        let batch = rate.take_batch();
        rate.abandon(&batch);
        assert!(rate.may_admit(ip(1)));
    }
}
