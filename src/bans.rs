//! Bans an operator sets through the admin API (SPEC section 9): whole networks, each until
//! an expiry, at most `admin.max_bans` at once. Read on every admission and written rarely,
//! so the list is copied on write and read without a lock; an empty list costs one load.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::ArcSwap;
use ipnet::{IpNet, Ipv4Net};

/// One network banned until `until`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetBan {
    pub net: IpNet,
    pub until: Instant,
}

/// The ban list is at its cap: refused rather than grown.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0} bans are in force already (admin.max_bans)")]
pub struct BansFull(pub usize);

/// A network as an operator (or the cluster's shared list) writes it: a CIDR or a single
/// address, truncated to its network (`203.0.113.9/24` is `203.0.113.0/24`), so that a
/// `DELETE` of the network always matches the ban. An IPv4-mapped network
/// (`::ffff:203.0.113.0/120`) is the IPv4 one (`203.0.113.0/24`): clients are normalised to
/// IPv4, so the mapped form would never match anyone. `None` when it is neither.
pub fn parse_net(text: &str) -> Option<IpNet> {
    let net = match text.parse::<IpNet>() {
        Ok(net) => net,
        Err(_) => IpNet::from(text.parse::<IpAddr>().ok()?),
    };
    Some(unmap(net).trunc())
}

/// The IPv4 network of an IPv4-mapped one (prefix of at least 96); others as they are.
fn unmap(net: IpNet) -> IpNet {
    let IpNet::V6(v6) = net else {
        return net;
    };
    match (v6.addr().to_ipv4_mapped(), v6.prefix_len().checked_sub(96)) {
        (Some(v4), Some(prefix)) => Ipv4Net::new(v4, prefix).map_or(net, IpNet::V4),
        _ => net,
    }
}

/// The networks banned through the admin API.
pub struct NetBans {
    list: ArcSwap<Vec<NetBan>>,
    /// Serialises writers, so that none loses another's change.
    write: Mutex<()>,
}

impl Default for NetBans {
    fn default() -> Self {
        NetBans {
            list: ArcSwap::from_pointee(Vec::new()),
            write: Mutex::new(()),
        }
    }
}

impl NetBans {
    /// Whether a ban in force covers `ip`.
    pub fn covers(&self, ip: IpAddr) -> bool {
        let list = self.list.load();
        if list.is_empty() {
            return false;
        }
        let now = Instant::now();
        list.iter()
            .any(|ban| ban.until > now && ban.net.contains(&ip))
    }

    /// Bans `net` until `until`, replacing a ban of the same network. Expired bans are
    /// dropped first; refused when `max` others are still in force.
    pub fn insert(&self, net: IpNet, until: Instant, max: usize) -> Result<(), BansFull> {
        let net = net.trunc();
        self.update(|list| {
            let now = Instant::now();
            list.retain(|ban| ban.until > now && ban.net != net);
            if list.len() >= max {
                return Err(BansFull(list.len()));
            }
            list.push(NetBan { net, until });
            Ok(())
        })
    }

    /// Replaces the whole list (the cluster's, already validated and capped by the sync).
    /// True when it bans a network the old list did not.
    pub fn replace(&self, mut bans: Vec<NetBan>) -> bool {
        for ban in &mut bans {
            ban.net = ban.net.trunc();
        }
        self.update(|list| {
            let now = Instant::now();
            let before: HashSet<IpNet> = list
                .iter()
                .filter(|old| old.until > now)
                .map(|old| old.net)
                .collect();
            let grew = bans
                .iter()
                .any(|new| new.until > now && !before.contains(&new.net));
            *list = bans;
            grew
        })
    }

    /// Lifts the ban of exactly `net`; false when there was none.
    pub fn remove(&self, net: IpNet) -> bool {
        let net = net.trunc();
        self.update(|list| {
            let before = list.len();
            list.retain(|ban| ban.net != net);
            list.len() != before
        })
    }

    /// The bans in force, oldest first.
    pub fn in_force(&self) -> Vec<NetBan> {
        let now = Instant::now();
        self.list
            .load()
            .iter()
            .filter(|ban| ban.until > now)
            .cloned()
            .collect()
    }

    /// Drops expired bans.
    pub fn prune(&self) {
        let now = Instant::now();
        if self.list.load().iter().all(|ban| ban.until > now) {
            return;
        }
        self.update(|list| list.retain(|ban| ban.until > now));
    }

    pub fn len(&self) -> usize {
        self.list.load().len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.load().is_empty()
    }

    /// Applies `change` to a copy of the list and publishes it.
    fn update<T>(&self, change: impl FnOnce(&mut Vec<NetBan>) -> T) -> T {
        let _writer = self.write.lock().unwrap_or_else(|e| e.into_inner());
        let mut list = Vec::clone(&self.list.load());
        let result = change(&mut list);
        self.list.store(Arc::new(list));
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn covers_its_network_until_it_expires() {
        let bans = NetBans::default();
        let later = Instant::now() + Duration::from_secs(60);
        bans.insert(net("203.0.113.9/24"), later, 4).unwrap();
        assert!(bans.covers("203.0.113.200".parse().unwrap()));
        assert!(!bans.covers("203.0.114.1".parse().unwrap()));
        assert_eq!(
            bans.in_force()[0].net,
            net("203.0.113.0/24"),
            "stored truncated"
        );
        assert!(bans.remove(net("203.0.113.0/24")));
        assert!(!bans.covers("203.0.113.200".parse().unwrap()));
        assert!(!bans.remove(net("203.0.113.0/24")));

        bans.insert(net("198.51.100.0/24"), Instant::now(), 4)
            .unwrap();
        assert!(!bans.covers("198.51.100.1".parse().unwrap()), "expired");
        bans.prune();
        assert!(bans.is_empty());
    }

    #[test]
    fn networks_parse_truncated_and_addresses_as_single_hosts() {
        assert_eq!(parse_net("203.0.113.9/24"), Some(net("203.0.113.0/24")));
        assert_eq!(parse_net("2001:db8::1"), Some(net("2001:db8::1/128")));
        assert_eq!(parse_net("192.0.2.1"), Some(net("192.0.2.1/32")));
        // IPv4-mapped: the IPv4 network, as clients are normalised.
        assert_eq!(parse_net("::ffff:192.0.2.9/120"), Some(net("192.0.2.0/24")));
        assert_eq!(parse_net("::ffff:192.0.2.9"), Some(net("192.0.2.9/32")));
        assert_eq!(parse_net("::ffff:0.0.0.0/96"), Some(net("0.0.0.0/0")));
        assert_eq!(parse_net("::ffff:0:0/80"), Some(net("::/80")), "not mapped");
        for bad in ["", "nope", "10.0.0.0/33", "10.0.0.0/8 ", "2001:db8::/129"] {
            assert_eq!(parse_net(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_list_is_capped_and_a_repeat_replaces() {
        let bans = NetBans::default();
        let later = Instant::now() + Duration::from_secs(60);
        bans.insert(net("10.0.0.0/8"), later, 2).unwrap();
        bans.insert(net("10.0.0.0/8"), later, 2).unwrap();
        bans.insert(net("192.0.2.0/24"), later, 2).unwrap();
        assert_eq!(bans.len(), 2);
        assert_eq!(
            bans.insert(net("198.51.100.0/24"), later, 2),
            Err(BansFull(2))
        );
        bans.insert(net("192.0.2.0/24"), later, 2).unwrap();
    }
}
