//! Admission: the cheap checks a connection passes before any TLS work (SPEC section 1).
//!
//! Everything here is keyed by the *client key*: the client's IPv4 address, or its IPv6
//! address masked to `ipv6_prefix`, so that one host cannot escape its limits by rotating
//! addresses inside its own prefix. [`Admission::admit`] is the single place a connection is
//! admitted; it can be called again with the address a PROXY header carries.

use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::Config;
use crate::error::RejectReason;

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

/// Global admission state shared by every connection.
pub struct Admission {
    /// `max_connections`: a permit is held for a connection's whole life.
    connections: Arc<Semaphore>,
    /// Connections currently held, exact across every exit path (the guard's `Drop`).
    active: Arc<AtomicUsize>,
}

/// Held by an admitted connection; dropping it (on any exit path, panics included) gives
/// its place back.
pub struct ConnectionGuard {
    _permit: OwnedSemaphorePermit,
    active: Arc<AtomicUsize>,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let now = self.active.fetch_sub(1, Ordering::Relaxed) - 1;
        crate::metrics::connections_active(now);
    }
}

impl Admission {
    pub fn new(config: &Config) -> Self {
        Admission {
            connections: Arc::new(Semaphore::new(config.limits.max_connections)),
            active: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Admits a connection from `ip`, or says why not. Costs no allocation that depends on
    /// the peer.
    pub fn admit(&self, _ip: IpAddr) -> Result<ConnectionGuard, RejectReason> {
        let permit = self
            .connections
            .clone()
            .try_acquire_owned()
            .map_err(|_| RejectReason::MaxConnections)?;
        let now = self.active.fetch_add(1, Ordering::Relaxed) + 1;
        crate::metrics::connections_active(now);
        Ok(ConnectionGuard {
            _permit: permit,
            active: self.active.clone(),
        })
    }

    /// Connections currently held.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_ipv4_is_normalised() {
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(normalize_ip(mapped), "192.0.2.7".parse::<IpAddr>().unwrap());
        assert_eq!(
            client_key(mapped, 64),
            "192.0.2.7".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn ipv6_is_keyed_by_prefix() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(client_key(a, 64), client_key(b, 64));
        assert_ne!(client_key(a, 64), client_key(c, 64));
        assert_eq!(
            client_key(a, 64),
            "2001:db8:1:2::".parse::<IpAddr>().unwrap()
        );
        assert_eq!(client_key(a, 128), a);
        assert_eq!(client_key(a, 48), client_key(c, 48));
    }

    #[test]
    fn global_cap_refuses_then_frees() {
        let mut config = Config::default();
        config.limits.max_connections = 1;
        let admission = Admission::new(&config);
        let ip = "192.0.2.1".parse().unwrap();
        let guard = admission.admit(ip).unwrap();
        assert_eq!(
            admission.admit(ip).err(),
            Some(RejectReason::MaxConnections)
        );
        assert_eq!(admission.active(), 1);
        drop(guard);
        assert_eq!(admission.active(), 0);
        assert!(admission.admit(ip).is_ok());
    }
}
