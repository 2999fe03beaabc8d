//! File descriptors (SPEC section 9, "Start-up checks the machine"): every connection is a
//! descriptor, so the soft `RLIMIT_NOFILE` is raised to the hard limit at start and a
//! configuration that cannot fit is named in a warning. Under `EMFILE` a connection waits
//! in the listen backlog, where no timeout of ours reaches it; a [`Reserve`]d descriptor
//! lets the accept loop take it anyway and refuse it at once.

use std::io;
use std::net::SocketAddr;
use std::task::Poll;

use tokio::net::{TcpListener, TcpStream};

use crate::config::Config;

/// Descriptors the process needs besides its client connections: the listeners, the
/// runtime's epoll and wake-up descriptors, standard streams, certificate and
/// configuration files being read, the reserve, logging.
const BASE_DESCRIPTORS: u64 = 64;

/// The soft and hard `RLIMIT_NOFILE` after start-up raised the soft one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NofileLimit {
    pub soft: u64,
    pub hard: u64,
    /// The soft limit before it was raised, when it was.
    pub raised_from: Option<u64>,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit.
pub fn raise_nofile_limit() -> io::Result<NofileLimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own and has no other effect.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let before = limit.rlim_cur;
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: setrlimit reads the struct we own; raising the soft limit up to the hard
        // one needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(NofileLimit {
        soft: limit.rlim_cur,
        hard: limit.rlim_max,
        raised_from: (limit.rlim_cur != before).then_some(before),
    })
}

/// Descriptors a configuration may use at once: every client connection, its upstream
/// connection when an upstream is configured, the admin connections, and the base.
pub fn descriptors_needed(config: &Config) -> u64 {
    let clients = config.limits.max_connections as u64;
    let upstream = if config.upstream.servers.is_empty() {
        0
    } else {
        clients
    };
    clients + upstream + config.admin.max_connections as u64 + BASE_DESCRIPTORS
}

/// Raises the limit and logs what start-up found: a warning naming both numbers when the
/// configuration needs more descriptors than the limit allows.
pub fn check_at_start(config: &Config) {
    let needed = descriptors_needed(config);
    match raise_nofile_limit() {
        Ok(limit) => {
            if let Some(before) = limit.raised_from {
                tracing::info!(
                    from = before,
                    to = limit.soft,
                    "raised the open-file limit (RLIMIT_NOFILE)"
                );
            }
            if needed > limit.soft {
                tracing::warn!(
                    limit = limit.soft,
                    needed,
                    max_connections = config.limits.max_connections,
                    "the open-file limit (RLIMIT_NOFILE) is {} but max_connections = {} needs about {needed} descriptors: connections beyond the limit are refused; raise the hard limit (ulimit -n, Docker ulimits, systemd LimitNOFILE) or lower limits.max_connections",
                    limit.soft,
                    config.limits.max_connections,
                );
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read or raise the open-file limit (RLIMIT_NOFILE)")
        }
    }
}

/// One descriptor held back (an open `/dev/null`) for the moment the process runs out:
/// given up to accept the connection waiting in the backlog, which is then reset, and taken
/// again.
pub struct Reserve(Option<std::fs::File>);

impl Reserve {
    pub fn new() -> Reserve {
        Reserve(open_reserve())
    }

    /// After `accept` failed with `EMFILE`/`ENFILE`: frees the reserve, takes the waiting
    /// connection off the backlog without waiting for one, hands it to `refuse` (which
    /// closes it), and takes the reserve again. False when there was no connection waiting
    /// or even the freed descriptor did not suffice.
    pub fn refuse_one(
        &mut self,
        listener: &TcpListener,
        refuse: impl FnOnce(TcpStream, SocketAddr),
    ) -> bool {
        if self.0.is_none() {
            // Taken again only now that the last refused connection is closed.
            self.0 = open_reserve();
        }
        if self.0.take().is_none() {
            return false;
        }
        let accepted = accept_now(listener);
        let refused = accepted.is_some();
        if let Some((stream, peer)) = accepted {
            refuse(stream, peer);
        }
        self.0 = open_reserve();
        refused
    }
}

impl Default for Reserve {
    fn default() -> Self {
        Reserve::new()
    }
}

fn open_reserve() -> Option<std::fs::File> {
    std::fs::File::open("/dev/null").ok()
}

/// One non-blocking attempt to accept.
fn accept_now(listener: &TcpListener) -> Option<(TcpStream, SocketAddr)> {
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    match listener.poll_accept(&mut cx) {
        Poll::Ready(Ok(accepted)) => Some(accepted),
        Poll::Ready(Err(_)) | Poll::Pending => None,
    }
}

/// Whether an `accept` error means the process (or the system) is out of descriptors.
pub fn is_out_of_descriptors(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_is_raised_to_the_hard_one() {
        let limit = raise_nofile_limit().unwrap();
        assert_eq!(limit.soft, limit.hard);
    }

    #[test]
    fn needed_descriptors_count_clients_upstream_and_admin() {
        let mut config = Config::default();
        config.limits.max_connections = 1000;
        config.admin.max_connections = 10;
        assert_eq!(descriptors_needed(&config), 1000 + 10 + BASE_DESCRIPTORS);
        config.upstream.servers = vec!["127.0.0.1:9000".into()];
        assert_eq!(descriptors_needed(&config), 2000 + 10 + BASE_DESCRIPTORS);
    }
}
