//! This replica's view of the cluster-wide connection rate of each client key.
//!
//! Admission asks [`SharedRate::may_admit`] (a map lookup, never a network wait) and
//! reports each connection it admits with [`SharedRate::admitted`]. The sync task moves the
//! counts not yet published into a batch ([`SharedRate::take_batch`]), publishes them, and
//! writes back the cluster's totals ([`SharedRate::apply`]). The module docs of
//! [`crate::cluster`] explain why this keeps every 10 s window within SPEC 7's bound.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;

/// The window SPEC 7 bounds.
pub const WINDOW: Duration = Duration::from_secs(10);
/// One-second buckets summed per check: 11 of them cover every 10 s window, wherever it
/// starts, so that the last admission of any window saw all the others of that window.
pub const BUCKETS: u64 = 11;
/// The most keys in one sync, so that an address spray cannot make one script call long
/// enough to push replicas past their Redis timeout and into standalone mode (20,000 keys
/// once took a call ~330 ms). Keys with new admissions go first (their counts must reach
/// the cluster); the room left goes to keys that only fetch the cluster's total, in turns.
pub const MAX_KEYS_PER_SYNC: usize = 2_000;

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
    /// Where the next sync's slice of fetch-only keys starts.
    fetch_cursor: AtomicUsize,
}

impl SharedRate {
    pub fn new(rate_per_second: u32, burst: u32) -> Self {
        let shared = SharedRate {
            entries: DashMap::new(),
            budget: AtomicU64::new(0),
            unconfirmed_cap: AtomicU64::new(1),
            fetch_cursor: AtomicUsize::new(0),
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
    /// unconfirmed), and moves pending counts into the batch to publish: `(key, count)`,
    /// the count 0 for keys whose total is only fetched. At most [`MAX_KEYS_PER_SYNC`]:
    /// keys with new admissions first (those left out keep their counts for the next
    /// sync), then fetch-only keys, a different slice of them each sync (the sync sends
    /// counts only for the keys before the first 0).
    pub fn take_batch(&self) -> Vec<(IpAddr, u64)> {
        self.prune();
        let mut batch = Vec::with_capacity(self.entries.len().min(MAX_KEYS_PER_SYNC));
        let mut fetch_only = Vec::new();
        for mut entry in self.entries.iter_mut() {
            if entry.pending == 0 {
                fetch_only.push(*entry.key());
                continue;
            }
            if batch.len() >= MAX_KEYS_PER_SYNC {
                continue;
            }
            let pending = std::mem::take(&mut entry.pending);
            entry.in_flight += pending;
            batch.push((*entry.key(), pending));
        }
        let room = MAX_KEYS_PER_SYNC - batch.len();
        if !fetch_only.is_empty() && room > 0 {
            let start = self.fetch_cursor.fetch_add(room, Ordering::Relaxed) % fetch_only.len();
            let turn = fetch_only.iter().cycle().skip(start);
            batch.extend(turn.take(room.min(fetch_only.len())).map(|&key| (key, 0)));
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

    #[test]
    fn a_spray_fills_each_sync_with_new_counts_first_then_takes_turns_fetching() {
        let rate = SharedRate::new(20, 40);
        let key = |i: usize| IpAddr::from([10, (i >> 16) as u8, (i >> 8) as u8, i as u8]);
        for i in 0..MAX_KEYS_PER_SYNC + 500 {
            rate.admitted(key(i));
        }
        let first = rate.take_batch();
        assert_eq!(first.len(), MAX_KEYS_PER_SYNC);
        assert!(first.iter().all(|(_, n)| *n == 1), "new counts go first");
        rate.apply(&first, &vec![1; first.len()], 1);
        let second = rate.take_batch();
        assert_eq!(
            second.iter().filter(|(_, n)| *n == 1).count(),
            500,
            "the keys left out are published by the next sync"
        );
        assert_eq!(
            second.len(),
            MAX_KEYS_PER_SYNC,
            "the rest of the room fetches"
        );
        rate.apply(&second, &vec![1; second.len()], 1);
        let mut fetched = std::collections::HashSet::new();
        for _ in 0..3 {
            let batch = rate.take_batch();
            assert!(batch.len() <= MAX_KEYS_PER_SYNC);
            fetched.extend(batch.iter().map(|(k, _)| *k));
            rate.apply(&batch, &vec![1; batch.len()], 1);
        }
        assert_eq!(
            fetched.len(),
            MAX_KEYS_PER_SYNC + 500,
            "every key's total is fetched in turn"
        );
    }
}
