//! The operator's own service behind the gateway (SPEC section 6).
//!
//! [`Upstream`] is built at start from `[upstream]`: the servers are resolved, their health
//! is tracked ([`pool`], [`health`]), and [`Upstream::open`] connects an authenticated
//! client to one of them, sending the PROXY v2 header ([`proxy_header`]) first. The
//! connection is then relayed message by message ([`relay`]) or byte for byte ([`stream`]).

pub mod health;
pub mod pool;
pub mod proxy_header;
pub mod relay;
pub mod stream;

use std::net::ToSocketAddrs;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpStream, UnixStream};
use tokio::time::Instant;
use tokio_util::either::Either;

use crate::config::{Config, SendProxy, ServerAddress, UpstreamMode};
use crate::error::UpstreamError;
use crate::metrics::{self, ConnectResult};
pub use pool::Target;
use pool::{Pool, PoolSettings, ServerSlot};
pub use proxy_header::ClientInfo;
pub use relay::{Link, LinkEvent};

/// A connection to an upstream server, over TCP or a Unix socket.
pub type UpstreamStream = Either<TcpStream, UnixStream>;

/// Why the upstream could not be set up at start.
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
    pool: Arc<Pool>,
    mode: UpstreamMode,
    connect_timeout: Duration,
    send_proxy: SendProxy,
    max_reply_bytes: usize,
    /// The cap on bytes queued towards the upstream (`limits.max_write_buffer_bytes`).
    out_cap: usize,
    health_interval: Duration,
}

impl Upstream {
    /// `None` when no server is configured: the built-in commands serve.
    pub fn from_config(config: &Config) -> Result<Option<Upstream>, UpstreamInitError> {
        let u = &config.upstream;
        if u.servers.is_empty() {
            return Ok(None);
        }
        let servers = u
            .servers
            .iter()
            .map(|server| Ok((server.clone(), resolve(server)?)))
            .collect::<Result<Vec<_>, UpstreamInitError>>()?;
        let pool = Pool::new(
            servers,
            PoolSettings {
                balance: u.balance,
                max_per_server: u.max_connections_per_server,
                rise: u.rise,
                fall: u.fall,
                passive_only: u.health_interval.is_zero(),
            },
        );
        Ok(Some(Upstream {
            pool: Arc::new(pool),
            mode: u.mode,
            connect_timeout: u.connect_timeout,
            send_proxy: u.send_proxy,
            max_reply_bytes: u.max_reply_bytes,
            out_cap: config.limits.max_write_buffer_bytes,
            health_interval: u.health_interval,
        }))
    }

    pub fn mode(&self) -> UpstreamMode {
        self.mode
    }

    /// True while at least one server is up (`/readyz`).
    pub fn any_up(&self) -> bool {
        self.pool.any_up()
    }

    /// Connects `client` to a server chosen by `balance`, retrying once on another; the
    /// PROXY header is queued first. Every failure is counted and marks its server.
    pub async fn open(&self, client: &ClientInfo) -> Result<Link, Unavailable> {
        let header = match self.send_proxy {
            SendProxy::V2 => proxy_header::proxy_v2(client).map_err(|e| {
                tracing::warn!(error = %e, "PROXY header does not fit; not connecting");
                Unavailable
            })?,
            SendProxy::Off => Vec::new(),
        };
        let mut tried = None;
        for _ in 0..2 {
            let Some(slot) = self.pool.pick(tried) else {
                break;
            };
            tried = Some(slot.index());
            if let Some(io) = self.connect(&slot).await {
                return Ok(Link::new(
                    io,
                    header,
                    self.out_cap,
                    self.max_reply_bytes,
                    slot,
                ));
            }
        }
        metrics::upstream_error(UpstreamError::Unavailable);
        Err(Unavailable)
    }

    /// One connect under `connect_timeout`: timed, counted, and recorded as a check.
    async fn connect(&self, slot: &ServerSlot) -> Option<UpstreamStream> {
        let index = slot.index();
        let result = self.connect_to(index).await;
        self.pool.record(index, result.is_ok());
        result.ok()
    }

    async fn connect_to(&self, index: usize) -> Result<UpstreamStream, ConnectResult> {
        let started = Instant::now();
        let target = &self.pool.servers[index].target;
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

/// Resolves a configured server address (once, at start).
fn resolve(server: &str) -> Result<Target, UpstreamInitError> {
    match ServerAddress::parse(server).map_err(UpstreamInitError::Invalid)? {
        ServerAddress::Unix(path) => Ok(Target::Unix(path)),
        ServerAddress::Tcp { host, port } => {
            let resolve_err = |source| UpstreamInitError::Resolve {
                server: server.to_string(),
                source,
            };
            (host.as_str(), port)
                .to_socket_addrs()
                .map_err(resolve_err)?
                .next()
                .map(Target::Tcp)
                .ok_or_else(|| resolve_err(std::io::ErrorKind::NotFound.into()))
        }
    }
}
