//! The state every connection shares: configuration, TLS, tokens, admission, PROXY
//! settings and the shutdown stages. It imports nothing above it in the pipeline, so the
//! accept loop ([`crate::server`]), a connection ([`crate::session`]), the admin listener
//! and reloads all reach it without importing each other.
//!
//! A reload ([`Gateway::reload`]) builds everything from the file first and swaps it in only
//! when all of it loaded, then tells open connections that the rules changed
//! ([`RulesChanged`]): each checks itself again and closes if its address is now denied or
//! banned, or its token or client certificate revoked.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

use crate::admission::Admission;
use crate::auth::TokenStore;
use crate::bans::NetBan;
use crate::cluster::admin::AdminBans;
use crate::cluster::{Cluster, Enforce};
use crate::config::Config;
use crate::proxy_protocol::ProxySettings;
use crate::shutdown::Shutdown;
use crate::tickets::Ticketer;
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
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
    #[error(transparent)]
    Tickets(#[from] crate::tickets::NoRandomness),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Everything a connection needs, shared by all of them.
pub struct Gateway {
    /// The configuration in force, swapped whole by a reload: read it with
    /// [`Gateway::config`].
    config: ArcSwap<Config>,
    pub tls: TlsState,
    /// Swapped whole on reload; a connection reads it per `AUTH`.
    pub tokens: ArcSwap<TokenStore>,
    pub admission: Admission,
    /// Cluster mode's link to Redis; `None` standalone.
    pub cluster: Option<Arc<Cluster>>,
    /// Which peers' PROXY headers are read, and how.
    pub proxy: ArcSwap<ProxySettings>,
    /// What serves a connection once it is authenticated.
    pub service: Service,
    /// Wakes open connections when who may stay connected changed.
    pub rules_changed: RulesChanged,
    pub shutdown: Shutdown,
    /// One reload at a time (SIGHUP, polling and callers of [`Gateway::apply`]).
    reloading: Mutex<()>,
}

/// What serves an authenticated connection, chosen at start (SPEC section 6). Before
/// authentication the built-in commands always answer (PING, AUTH, HELP, QUIT); after it,
/// either they go on answering, or every message goes to the operator's own service. Which
/// of the two needs a restart; the upstream's servers and settings reload.
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
        let ticketer = Arc::new(Ticketer::new(config.tls.ticket_rotation)?);
        let material = TlsMaterial::load(&settings, ticketer.clone())?;
        crate::metrics::cert_not_after(material.not_after);
        let tokens = TokenStore::from_entries(&config.auth.tokens)?;
        let cluster = Cluster::from_config(&config, ticketer.clone())?.map(Arc::new);
        Ok(Gateway {
            tls: TlsState::new(settings, material, ticketer),
            tokens: ArcSwap::from_pointee(tokens),
            admission: Admission::new(&config).with_cluster(cluster.clone()),
            cluster,
            proxy: ArcSwap::from_pointee(ProxySettings::new(&config.proxy_protocol)),
            service: Service::from_config(&config)?,
            rules_changed: RulesChanged::new(),
            config: ArcSwap::from_pointee(config),
            shutdown,
            reloading: Mutex::new(()),
        })
    }

    /// The configuration in force right now.
    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }
}

/// The sync task's view of this replica: what it learns from the cluster is enforced like
/// the same change made here (open connections check themselves through `rules_changed`).
impl AdminBans for Gateway {
    fn in_force(&self) -> Vec<NetBan> {
        self.admission.admin_bans()
    }

    fn replace(&self, bans: Vec<NetBan>) {
        if self.admission.replace_admin_bans(bans) {
            self.rules_changed.notify();
        }
    }

    fn lift_key_ban(&self, key: IpAddr) {
        self.admission.lift_key_ban(key);
    }
}

impl Enforce for Gateway {
    fn ban_key(&self, key: IpAddr, until: Instant) {
        self.admission.ban_until(key, until);
    }

    fn lift_key(&self, key: IpAddr) {
        self.admission.lift_key_ban(key);
    }
}

/// Tells open connections that the rules they were admitted under changed (a reload, an
/// admin ban), so that each checks itself again. One cancellation token per change: a
/// change cancels the current token and puts a fresh one in its place.
pub struct RulesChanged {
    current: ArcSwap<CancellationToken>,
}

impl RulesChanged {
    fn new() -> Self {
        RulesChanged {
            current: ArcSwap::from_pointee(CancellationToken::new()),
        }
    }

    /// The token the next change cancels. Taken before the rules are checked, so that a
    /// change in between is not missed.
    pub fn subscribe(&self) -> CancellationToken {
        CancellationToken::clone(&self.current.load())
    }

    /// Wakes every subscriber; called after the new rules are in place.
    pub fn notify(&self) {
        self.current
            .swap(Arc::new(CancellationToken::new()))
            .cancel();
    }
}

/// Why a reload failed; nothing of it was applied.
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
    /// Reads the configuration file and the environment again (with the same command-line
    /// flags) and applies the result whole, or nothing of it. Without a file, the files the
    /// configuration names (certificates, CRLs) are read again. Counted in
    /// `portcullis_config_reloads_total`.
    pub fn reload(&self) -> Result<(), ReloadError> {
        let running = self.config();
        let result = match &running.source {
            Some(path) => Config::load(Some(path), std::env::vars(), &running.flags)
                .map_err(ReloadError::from)
                .and_then(|fresh| self.apply(fresh)),
            None => self.apply(Config::clone(&running)),
        };
        crate::metrics::config_reload(result.is_ok());
        match &result {
            Ok(()) => tracing::info!("configuration reloaded"),
            Err(e) => {
                tracing::error!(error = %e, "reload failed; nothing changed, still serving the previous configuration")
            }
        }
        result
    }

    /// Applies a validated configuration: TLS material, CRLs, tokens, `[auth]`, `[access]`,
    /// `[limits]`, `[protocol]`, `[proxy_protocol]` and `[upstream]` (for new upstream
    /// connections), then wakes open connections to check themselves against it. Keys that need a new socket or process keep their running
    /// values (logged as needing a restart). All or nothing: every file is loaded before
    /// anything is swapped.
    pub fn apply(&self, mut fresh: Config) -> Result<(), ReloadError> {
        let _one_at_a_time = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
        let kept = keep_restart_keys(&self.config(), &mut fresh);
        if !kept.is_empty() {
            tracing::warn!(keys = ?kept, "changed keys need a restart; keeping their running values");
            // Running values next to new ones must still agree (e.g. the running
            // `max_reply_bytes` with a new, smaller `max_write_buffer_bytes`).
            fresh.validate()?;
        }
        let settings = TlsSettings::from_config(&fresh);
        let material = TlsMaterial::load(&settings, self.tls.ticketer())?;
        let tokens = TokenStore::from_entries(&fresh.auth.tokens)?;
        // Never fails: a name that does not resolve must not hold back the rest.
        let upstream = self
            .service
            .upstream()
            .map(|upstream| (upstream, upstream.resolve(&fresh)));
        // Everything is loaded: from here on nothing fails.
        crate::metrics::cert_not_after(material.not_after);
        tracing::info!(serial = %material.serial, "serving certificate");
        self.tls.install(settings, material);
        self.tokens.store(Arc::new(tokens));
        self.admission.reconfigure(&fresh);
        if let Some(cluster) = &self.cluster {
            cluster.reconfigure(&fresh);
        }
        self.proxy
            .store(Arc::new(ProxySettings::new(&fresh.proxy_protocol)));
        if let Some((upstream, servers)) = upstream {
            upstream.reconfigure(&fresh, servers);
        }
        self.config.store(Arc::new(fresh));
        self.rules_changed.notify();
        Ok(())
    }
}

/// Puts back in `fresh` the running value of every key that needs a new socket, a new
/// runtime or a new logger, and returns the names of those that had changed.
fn keep_restart_keys(running: &Config, fresh: &mut Config) -> Vec<&'static str> {
    fn keep<T: PartialEq + Clone>(
        key: &'static str,
        running: &T,
        fresh: &mut T,
        kept: &mut Vec<&'static str>,
    ) {
        if running != fresh {
            *fresh = running.clone();
            kept.push(key);
        }
    }
    let mut kept = Vec::new();
    let (r, f) = (running, fresh);
    keep(
        "server.listen",
        &r.server.listen,
        &mut f.server.listen,
        &mut kept,
    );
    keep(
        "server.workers",
        &r.server.workers,
        &mut f.server.workers,
        &mut kept,
    );
    keep(
        "admin.listen",
        &r.admin.listen,
        &mut f.admin.listen,
        &mut kept,
    );
    keep(
        "admin.max_connections",
        &r.admin.max_connections,
        &mut f.admin.max_connections,
        &mut kept,
    );
    keep(
        "admin.idle_timeout",
        &r.admin.idle_timeout,
        &mut f.admin.idle_timeout,
        &mut kept,
    );
    keep(
        "admin.header_timeout",
        &r.admin.header_timeout,
        &mut f.admin.header_timeout,
        &mut kept,
    );
    // Which service answers an authenticated client, and what it speaks on the wire, are
    // chosen at start; the servers themselves and every other upstream key reload.
    if r.upstream.servers.is_empty() != f.upstream.servers.is_empty() {
        f.upstream.servers = r.upstream.servers.clone();
        kept.push("upstream.servers (turning the upstream on or off)");
    }
    keep(
        "upstream.mode",
        &r.upstream.mode,
        &mut f.upstream.mode,
        &mut kept,
    );
    // The link to Redis and the ticketer are built once at start.
    keep("cluster", &r.cluster, &mut f.cluster, &mut kept);
    keep(
        "tls.ticket_rotation",
        &r.tls.ticket_rotation,
        &mut f.tls.ticket_rotation,
        &mut kept,
    );
    keep("log.format", &r.log.format, &mut f.log.format, &mut kept);
    keep("log.level", &r.log.level, &mut f.log.level, &mut kept);
    kept
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UpstreamMode;

    #[test]
    fn restart_keys_keep_their_running_values() {
        let running = Config::default();
        let mut fresh = Config::default();
        fresh.server.listen = "127.0.0.1:1".parse().unwrap();
        fresh.admin.listen = "127.0.0.1:2".parse().unwrap();
        fresh.server.workers = 3;
        fresh.limits.idle_timeout = std::time::Duration::from_secs(5);
        let kept = keep_restart_keys(&running, &mut fresh);
        assert_eq!(kept, ["server.listen", "server.workers", "admin.listen"]);
        assert_eq!(fresh.server.listen, running.server.listen);
        assert_eq!(fresh.admin.listen, running.admin.listen);
        assert_eq!(fresh.server.workers, 0);
        assert_eq!(
            fresh.limits.idle_timeout,
            std::time::Duration::from_secs(5),
            "reloadable keys take the new value"
        );
    }

    #[test]
    fn upstream_servers_and_settings_reload_but_on_off_and_mode_need_a_restart() {
        let mut running = Config::default();
        running.upstream.servers = vec!["127.0.0.1:7000".into()];
        let mut fresh = running.clone();
        fresh.upstream.servers = vec!["127.0.0.1:7001".into()];
        fresh.upstream.fall = 7;
        fresh.upstream.health_interval = std::time::Duration::from_millis(100);
        assert!(keep_restart_keys(&running, &mut fresh).is_empty());
        assert_eq!(fresh.upstream.servers, ["127.0.0.1:7001"]);
        assert_eq!(fresh.upstream.fall, 7);

        fresh.upstream.servers.clear();
        fresh.upstream.mode = UpstreamMode::Stream;
        let kept = keep_restart_keys(&running, &mut fresh);
        assert_eq!(
            kept,
            [
                "upstream.servers (turning the upstream on or off)",
                "upstream.mode"
            ]
        );
        assert_eq!(fresh.upstream.servers, running.upstream.servers);
        assert_eq!(fresh.upstream.mode, UpstreamMode::Messages);
        assert_eq!(fresh.upstream.fall, 7, "the other keys still reload");

        let mut turned_on = Config::default();
        turned_on.upstream.servers = vec!["127.0.0.1:7000".into()];
        let kept = keep_restart_keys(&Config::default(), &mut turned_on);
        assert_eq!(kept, ["upstream.servers (turning the upstream on or off)"]);
        assert!(turned_on.upstream.servers.is_empty());
    }

    #[test]
    fn a_change_wakes_subscribers_once() {
        let changed = RulesChanged::new();
        let before = changed.subscribe();
        changed.notify();
        assert!(before.is_cancelled());
        let after = changed.subscribe();
        assert!(
            !after.is_cancelled(),
            "a fresh token waits for the next change"
        );
    }
}
