//! The state every connection shares: configuration, TLS, tokens, admission, PROXY
//! settings, the command quota and the shutdown stages. It imports nothing above it in the
//! pipeline, so the accept loop ([`crate::server`]), a connection ([`crate::session`]), the
//! admin listener and reloads all reach it without importing each other.

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::admission::Admission;
use crate::auth::TokenStore;
use crate::config::Config;
use crate::proxy_protocol::ProxySettings;
use crate::shutdown::Shutdown;
use crate::tls::{TlsMaterial, TlsSettings, TlsState};
use crate::upstream::Upstream;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error(transparent)]
    Tokens(#[from] crate::auth::BadDigest),
    #[error(transparent)]
    Upstream(#[from] crate::upstream::UpstreamInitError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Everything a connection needs, shared by all of them.
pub struct Gateway {
    pub config: Config,
    pub tls: TlsState,
    /// Swapped whole on reload; a connection reads it per `AUTH`.
    pub tokens: ArcSwap<TokenStore>,
    pub admission: Admission,
    /// Which peers' PROXY headers are read, and how.
    pub proxy: ProxySettings,
    /// `commands_per_second` / `commands_burst`, for each connection's own limiter.
    pub command_quota: governor::Quota,
    /// What serves a connection once it is authenticated.
    pub service: Service,
    pub shutdown: Shutdown,
}

/// What serves an authenticated connection, chosen at start (SPEC section 6). Before
/// authentication the built-in commands always answer (PING, AUTH, HELP, QUIT); after it,
/// either they go on answering, or every message goes to the operator's own service.
pub enum Service {
    /// The built-in commands of SPEC section 2.2: `[upstream] servers` is empty.
    Commands,
    /// The upstream relay.
    Upstream(Arc<Upstream>),
}

impl Service {
    fn from_config(config: &Config) -> Result<Service, StartError> {
        Ok(match Upstream::from_config(config)? {
            Some(upstream) => Service::Upstream(Arc::new(upstream)),
            None => Service::Commands,
        })
    }

    /// The upstream, when one serves.
    pub fn upstream(&self) -> Option<&Upstream> {
        match self {
            Service::Commands => None,
            Service::Upstream(upstream) => Some(upstream),
        }
    }

    /// False while an upstream is configured and none of its servers is up (`/readyz`).
    pub fn is_ready(&self) -> bool {
        self.upstream().is_none_or(Upstream::any_up)
    }
}

impl Gateway {
    /// Loads TLS material and tokens; fails on anything the configuration got wrong.
    pub fn new(config: Config, shutdown: Shutdown) -> Result<Self, StartError> {
        let settings = TlsSettings::from_config(&config);
        let material = TlsMaterial::load(&settings)?;
        crate::metrics::cert_not_after(material.not_after);
        let tokens = TokenStore::from_entries(&config.auth.tokens)?;
        Ok(Gateway {
            tls: TlsState::new(settings, &material),
            tokens: ArcSwap::from_pointee(tokens),
            admission: Admission::new(&config),
            proxy: ProxySettings::new(&config.proxy_protocol),
            command_quota: crate::admission::per_second(
                config.limits.commands_per_second,
                config.limits.commands_burst,
            ),
            service: Service::from_config(&config)?,
            config,
            shutdown,
        })
    }
}

/// Why a reload failed; the old material stays in use.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Tokens(#[from] crate::auth::BadDigest),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

impl Gateway {
    /// Reloads the certificate, key, client CA and (when the configuration came from a
    /// file) the token list, all or nothing. Counted in `portcullis_cert_reloads_total`.
    pub fn reload(&self) -> Result<(), ReloadError> {
        let result = self.try_reload();
        crate::metrics::cert_reload(result.is_ok());
        match &result {
            Ok(()) => tracing::info!("reloaded certificate, client CA and tokens"),
            Err(e) => {
                tracing::error!(error = %e, "reload failed; still serving the previous material")
            }
        }
        result
    }

    fn try_reload(&self) -> Result<(), ReloadError> {
        let tokens = match &self.config.source {
            Some(path) => {
                let fresh = Config::load(Some(path), std::env::vars(), &Default::default())?;
                Some(TokenStore::from_entries(&fresh.auth.tokens)?)
            }
            None => None,
        };
        let material = self.tls.reload()?;
        crate::metrics::cert_not_after(material.not_after);
        tracing::info!(serial = %material.serial, "serving certificate");
        if let Some(tokens) = tokens {
            self.tokens.store(Arc::new(tokens));
        }
        Ok(())
    }
}
