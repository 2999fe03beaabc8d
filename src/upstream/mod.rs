//! The operator's own service behind the gateway (SPEC section 6).
//!
//! [`Upstream`] is built at start from `[upstream]`: the servers are resolved, their health
//! is tracked ([`pool`], [`health`]), and [`Upstream::open`] connects an authenticated
//! client to one of them, sending the PROXY v2 header ([`proxy_header`]) first. The
//! connection is then relayed message by message ([`relay`]) or byte for byte ([`stream`]).
//!
//! A reload ([`Upstream::reconfigure`]) puts a new [`Generation`] in place: its servers
//! (resolved again), balance, caps, timeouts and health settings serve the upstream
//! connections opened from then on, while those already open keep their server and the
//! settings they were opened under until they end. Whether the upstream serves at all and
//! its `mode` are fixed at start: they decide what a client speaks on the wire.

pub mod health;
pub mod pool;
pub mod proxy_header;
pub mod relay;
pub mod stream;

use std::net::ToSocketAddrs;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::{TcpStream, UnixStream};
use tokio::time::Instant;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, SendProxy, ServerAddress, UpstreamMode};
use crate::error::UpstreamError;
use crate::metrics::{self, ConnectResult};
pub use pool::Target;
use pool::{Pool, PoolSettings, Registry, Server, ServerSlot};
pub use proxy_header::ClientInfo;
pub use relay::{Link, LinkEvent};

/// A connection to an upstream server, over TCP or a Unix socket.
pub type UpstreamStream = Either<TcpStream, UnixStream>;

/// Why the upstream could not be set up at start (a reload sets up what it can: see
/// [`Upstream::resolve`]).
#[derive(Debug, thiserror::Error)]
pub enum UpstreamInitError {
    #[error("upstream.servers: {server:?} does not resolve: {source}")]
    Resolve {
        server: String,
        source: std::io::Error,
    },
    #[error("upstream.servers: {0}")]
    Invalid(String),
}

/// No server took the connection: the client gets `ERR UPSTREAM_UNAVAILABLE`.
#[derive(Debug, thiserror::Error)]
#[error("no upstream server could be reached")]
pub struct Unavailable;

/// The upstream servers and how connections reach them.
pub struct Upstream {
    /// Fixed at start: it decides what a client speaks once authenticated.
    mode: UpstreamMode,
    /// The servers and settings of the configuration in force, swapped whole by a reload.
    current: ArcSwap<Generation>,
    /// Every server still alive, for a reload to carry it over.
    registry: Registry,
}

/// `[upstream]` as one configuration has it. An upstream connection keeps the generation
/// it was opened under (its server, its reply and buffer caps) until it ends.
struct Generation {
    pool: Arc<Pool>,
    connect_timeout: Duration,
    send_proxy: SendProxy,
    max_reply_bytes: usize,
    /// The client's write-buffer cap for connections opened under this configuration
    /// (`limits.max_write_buffer_bytes`).
    write_cap: usize,
    health_interval: Duration,
    /// Cancelled when a reload replaces this generation: its health checks end.
    replaced: CancellationToken,
}

/// The configured servers, each with where it resolved to: what a reload checks before it
/// changes anything.
pub struct Resolved(Vec<(String, Target)>);

impl Resolved {
    /// Resolves every server of `config` (names through the system resolver): at start, a
    /// name that does not resolve is an error.
    pub fn from_config(config: &Config) -> Result<Resolved, UpstreamInitError> {
        let servers = config.upstream.servers.iter();
        servers
            .map(|server| Ok((server.clone(), resolve(server, None)?)))
            .collect::<Result<_, _>>()
            .map(Resolved)
    }
}

impl Generation {
    fn new(config: &Config, servers: Resolved, registry: &Registry) -> Generation {
        let u = &config.upstream;
        let settings = PoolSettings {
            balance: u.balance,
            max_per_server: u.max_connections_per_server,
            rise: u.rise,
            fall: u.fall,
            passive_only: u.health_interval.is_zero(),
        };
        let pool = Pool::new(servers.0, settings, registry);
        Generation {
            pool: Arc::new(pool),
            connect_timeout: u.connect_timeout,
            send_proxy: u.send_proxy,
            max_reply_bytes: u.max_reply_bytes,
            write_cap: config.limits.max_write_buffer_bytes,
            health_interval: u.health_interval,
            replaced: CancellationToken::new(),
        }
    }
}

impl Upstream {
    /// `None` when no server is configured: the built-in commands serve.
    pub fn from_config(config: &Config) -> Result<Option<Upstream>, UpstreamInitError> {
        if config.upstream.servers.is_empty() {
            return Ok(None);
        }
        let registry = Registry::default();
        let generation = Generation::new(config, Resolved::from_config(config)?, &registry);
        Ok(Some(Upstream {
            mode: config.upstream.mode,
            current: ArcSwap::from_pointee(generation),
            registry,
        }))
    }

    /// Puts `config`'s `[upstream]` in place for the upstream connections opened from now
    /// on (see [`pool`] for what a kept server keeps), and replaces the health checks. The
    /// caller has kept `mode` and whether any server is configured as they were.
    pub fn reconfigure(&self, config: &Config, servers: Resolved) {
        let next = Arc::new(Generation::new(config, servers, &self.registry));
        tracing::info!(servers = ?config.upstream.servers, "upstream servers for new connections");
        // Published before the servers it drops are retired: a connection opening in
        // between finds the new servers, never a pool with none in service.
        let previous = self.current.swap(Arc::clone(&next));
        previous.pool.retire_removed(&next.pool, &self.registry);
        previous.replaced.cancel();
    }

    /// Resolves `config`'s servers for a reload. A resolver failure never fails the reload
    /// (it would hold back a revoked token, a CRL, a denied address with it): a server the
    /// running pool has keeps the address it resolved to before; a new one is left out
    /// until a reload resolves it (logged; its `up` gauge reads 0).
    pub fn resolve(&self, config: &Config) -> Resolved {
        let current = self.current.load();
        let mut servers = Vec::with_capacity(config.upstream.servers.len());
        for server in &config.upstream.servers {
            let previous = current.pool.target_of(server);
            let error = match resolve(server, previous.as_ref()) {
                Ok(target) => {
                    servers.push((server.clone(), target));
                    continue;
                }
                Err(error) => error,
            };
            match previous {
                Some(target) => {
                    tracing::warn!(%error, ?target, "upstream server does not resolve; keeping its previous address");
                    servers.push((server.clone(), target));
                }
                None => {
                    tracing::warn!(%error, "new upstream server does not resolve; left out until a reload resolves it");
                    metrics::upstream_server_gauge(server).set(0.0);
                }
            }
        }
        Resolved(servers)
    }

    pub fn mode(&self) -> UpstreamMode {
        self.mode
    }

    /// True while at least one server is up (`/readyz`).
    pub fn any_up(&self) -> bool {
        self.current.load().pool.any_up()
    }

    /// Connects `client` to a server chosen by `balance`, retrying once on another; the
    /// PROXY header is queued first. Every failure is counted and marks its server.
    pub async fn open(&self, client: &ClientInfo) -> Result<Link, Unavailable> {
        // Both attempts, and the connection's whole life, under the settings in force now.
        let (generation, mut slot) = self.first_pick();
        let header = match generation.send_proxy {
            SendProxy::V2 => proxy_header::proxy_v2(client).map_err(|e| {
                tracing::warn!(error = %e, "PROXY header does not fit; not connecting");
                Unavailable
            })?,
            SendProxy::Off => Vec::new(),
        };
        for attempt in 0..2 {
            let Some(taken) = slot.take() else {
                break;
            };
            if let Some(io) = generation.connect(taken.server()).await {
                return Ok(Link::new(
                    io,
                    header,
                    generation.write_cap,
                    generation.max_reply_bytes,
                    taken,
                ));
            }
            if attempt == 0 {
                slot = generation.pool.pick(Some(taken.index()));
            }
        }
        metrics::upstream_error(UpstreamError::Unavailable);
        Err(Unavailable)
    }
}

impl Upstream {
    /// A connection's first pick, with the generation it was made under. A reload
    /// publishes its generation before it retires the servers it drops, so a pick that
    /// found none in service under a generation replaced meanwhile is made again under
    /// the new one: a reload replacing every server turns no client away.
    fn first_pick(&self) -> (Arc<Generation>, Option<ServerSlot>) {
        let generation = self.current.load_full();
        if let Some(slot) = generation.pool.pick(None) {
            return (generation, Some(slot));
        }
        let now = self.current.load_full();
        if Arc::ptr_eq(&now, &generation) {
            return (generation, None);
        }
        let slot = now.pool.pick(None);
        (now, slot)
    }
}

impl Generation {
    /// One connect under `connect_timeout`: timed, counted, and recorded as a check.
    async fn connect(&self, server: &Server) -> Option<UpstreamStream> {
        let result = self.connect_to(&server.target).await;
        self.pool.record(server, result.is_ok());
        result.ok()
    }

    async fn connect_to(&self, target: &Target) -> Result<UpstreamStream, ConnectResult> {
        let started = Instant::now();
        let result = tokio::time::timeout(self.connect_timeout, connect_target(target)).await;
        let outcome = match result {
            Ok(Ok(io)) => Ok(io),
            Ok(Err(e)) => {
                tracing::debug!(server = ?target, error = %e, "upstream connect failed");
                metrics::upstream_error(UpstreamError::ConnectFailed);
                Err(ConnectResult::Failed)
            }
            Err(_) => {
                metrics::upstream_error(UpstreamError::ConnectTimeout);
                Err(ConnectResult::Timeout)
            }
        };
        let label = outcome.as_ref().err().copied().unwrap_or(ConnectResult::Ok);
        metrics::upstream_connect(label, started.elapsed());
        outcome
    }
}

/// Opens a connection to `target`, without a timeout (the caller's).
async fn connect_target(target: &Target) -> std::io::Result<UpstreamStream> {
    Ok(match target {
        Target::Tcp(addr) => {
            let tcp = TcpStream::connect(addr).await?;
            // Frames are written whole; do not let Nagle hold a reply-sized one back.
            tcp.set_nodelay(true)?;
            Either::Left(tcp)
        }
        Target::Unix(path) => Either::Right(UnixStream::connect(path).await?),
    })
}

/// Resolves a configured server address (at start and at each reload) to its first
/// address, or to `prefer` while the name still lists it: round-robin DNS may list its
/// addresses in another order each time, and staying on the same one keeps the server
/// (its health, its count of open connections) across reloads.
fn resolve(server: &str, prefer: Option<&Target>) -> Result<Target, UpstreamInitError> {
    match ServerAddress::parse(server).map_err(UpstreamInitError::Invalid)? {
        ServerAddress::Unix(path) => Ok(Target::Unix(path)),
        ServerAddress::Tcp { host, port } => {
            let resolve_err = |source| UpstreamInitError::Resolve {
                server: server.to_string(),
                source,
            };
            let addrs = (host.as_str(), port)
                .to_socket_addrs()
                .map_err(resolve_err)?;
            choose(addrs.map(Target::Tcp), prefer)
                .ok_or_else(|| resolve_err(std::io::ErrorKind::NotFound.into()))
        }
    }
}

/// `prefer` if `targets` has it, else the first of them.
fn choose(mut targets: impl Iterator<Item = Target>, prefer: Option<&Target>) -> Option<Target> {
    let first = targets.next()?;
    let Some(prefer) = prefer else {
        return Some(first);
    };
    if first == *prefer || targets.any(|t| t == *prefer) {
        return Some(prefer.clone());
    }
    Some(first)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use super::*;

    #[test]
    fn a_reload_keeps_a_known_servers_address_and_leaves_out_a_new_one_that_does_not_resolve() {
        let kept = "no-such-host.invalid:7000";
        let before: Target = Target::Tcp("127.0.0.1:7000".parse().unwrap());
        let mut config = Config::default();
        config.upstream.servers = vec![kept.to_string()];
        let servers = Resolved(vec![(kept.to_string(), before.clone())]);
        let registry = Registry::default();
        let upstream = Upstream {
            mode: config.upstream.mode,
            current: ArcSwap::from_pointee(Generation::new(&config, servers, &registry)),
            registry,
        };
        config.upstream.servers = vec![
            kept.to_string(),
            "new-host.invalid:7001".to_string(),
            "unix:/run/app.sock".to_string(),
        ];
        let resolved = upstream.resolve(&config);
        assert_eq!(
            resolved.0,
            [
                (kept.to_string(), before),
                (
                    "unix:/run/app.sock".to_string(),
                    Target::Unix("/run/app.sock".into())
                ),
            ]
        );
    }

    #[test]
    fn a_name_listing_several_addresses_stays_on_the_one_it_had() {
        let t = |port: u16| Target::Tcp(([127, 0, 0, 1], port).into());
        let listed = || [t(1), t(2), t(3)].into_iter();
        assert_eq!(choose(listed(), None), Some(t(1)));
        assert_eq!(choose(listed(), Some(&t(3))), Some(t(3)));
        assert_eq!(choose(listed(), Some(&t(9))), Some(t(1)), "gone: the first");
        assert_eq!(choose(std::iter::empty(), Some(&t(1))), None);
    }

    #[test]
    fn a_connection_opening_during_a_reload_always_finds_a_server() {
        let server = |port: u16| {
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
            (addr.to_string(), Target::Tcp(addr))
        };
        let config = Config::default();
        let registry = Registry::default();
        let first = Resolved(vec![server(7000)]);
        let upstream = Upstream {
            mode: config.upstream.mode,
            current: ArcSwap::from_pointee(Generation::new(&config, first, &registry)),
            registry,
        };
        let done = AtomicBool::new(false);
        let picks = AtomicUsize::new(0);
        let misses = std::thread::scope(|scope| {
            let picker = scope.spawn(|| {
                let mut misses = 0;
                while !done.load(Ordering::Relaxed) {
                    misses += usize::from(upstream.first_pick().1.is_none());
                    picks.fetch_add(1, Ordering::Release);
                }
                misses
            });
            // Every reload replaces the whole list: [X] -> [Y] -> [X] ... One reload per
            // pick at most (as reloads seconds apart are): the next reload waits until a
            // pick begun after this one ended.
            for i in 0..5_000 {
                upstream.reconfigure(&config, Resolved(vec![server(7000 + i % 2)]));
                let seen = picks.load(Ordering::Acquire);
                while picks.load(Ordering::Acquire) < seen + 2 {
                    std::thread::yield_now();
                }
            }
            done.store(true, Ordering::Relaxed);
            picker.join().unwrap()
        });
        assert_eq!(misses, 0, "picks that found no server in service");
    }
}
