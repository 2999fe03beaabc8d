//! Typed, validated configuration (SPEC section 3).
//!
//! Loading goes file → environment → flags → typed structs → validation, so every error
//! names the key it is about: unknown keys and type errors carry their TOML path (through
//! `serde_path_to_error`), and validation errors carry the dotted key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

mod env;
mod validate;

pub use validate::MAX_DURATION;

use env::apply_env;

/// The largest `max_frame_bytes` allowed: 16 MiB - 1, which keeps the first byte of every
/// valid binary frame at `0x00` so that framing can be auto-detected from it.
pub const MAX_FRAME_CAP: usize = (1 << 24) - 1;
/// The largest `max_line_bytes` allowed; a line is a human's command, not a payload.
pub const MAX_LINE_CAP: usize = 1 << 20;
/// The environment variable prefix of overrides.
const ENV_PREFIX: &str = "PORTCULLIS_";
/// The configuration file used when no `--config` is given and it exists.
pub const DEFAULT_CONFIG_FILE: &str = "portcullis.toml";

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The reason is part of the message and deliberately not a `source`: printed with
    /// its chain (`{:#}`), it would otherwise be said twice.
    #[error("cannot read {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{key}: {message}")]
    Key { key: String, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    #[error("{flag}: {message}")]
    Flag { flag: &'static str, message: String },
}

impl ConfigError {
    fn key(key: &str, message: impl Into<String>) -> Self {
        ConfigError::Key {
            key: key.to_string(),
            message: message.into(),
        }
    }
}

/// The whole configuration. Every section and key has the default of SPEC section 3.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerSection,
    pub tls: TlsSection,
    pub protocol: ProtocolSection,
    pub limits: LimitsSection,
    pub auth: AuthSection,
    pub access: AccessSection,
    pub proxy_protocol: ProxyProtocolSection,
    pub admin: AdminSection,
    pub log: LogSection,
    pub upstream: UpstreamSection,
    pub cluster: ClusterSection,
    /// The file this configuration was read from: a reload reads it again.
    #[serde(skip)]
    pub source: Option<PathBuf>,
    /// `PORTCULLIS_*` variables that name no key: ignored, and reported once at start
    /// ([`Config::unknown_env_warning`]) rather than refused, because orchestrators set
    /// such variables themselves (Kubernetes service links: `PORTCULLIS_PORT`, …).
    #[serde(skip)]
    pub unknown_env: Vec<String>,
    /// The command-line overrides it was loaded with: a reload applies them again, so a
    /// flag keeps winning over the file.
    #[serde(skip)]
    pub flags: FlagOverrides,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    /// Where the gateway listens; the default is dual-stack.
    pub listen: SocketAddr,
    /// Runtime worker threads; 0 means one per core.
    pub workers: usize,
    /// How long in-flight connections may finish after SIGTERM.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// How long the listener keeps accepting after SIGTERM, while `/readyz` says 503.
    #[serde(with = "humantime_serde")]
    pub shutdown_delay: Duration,
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            listen: "[::]:8443".parse().expect("constant address"),
            workers: 0,
            drain_timeout: Duration::from_secs(30),
            shutdown_delay: Duration::ZERO,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TlsVersion {
    #[serde(rename = "1.2")]
    V1_2,
    #[serde(rename = "1.3")]
    V1_3,
}

/// Whose cipher-suite order decides: testssl flags "no server cipher order" otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CipherPreference {
    /// The server's order (strongest first) wins.
    Server,
    /// The client's order wins (a client that prefers ChaCha20 on hardware without AES).
    Client,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSection {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key: PKCS#8, SEC1 or PKCS#1.
    pub key: PathBuf,
    /// PEM CA bundle for client certificates; empty disables mTLS.
    pub client_ca: PathBuf,
    /// Certificate revocation lists (PEM or DER) for client certificates: a revoked
    /// certificate fails the handshake. Reloaded with the certificates.
    pub client_crl: Vec<PathBuf>,
    pub min_version: TlsVersion,
    /// ALPN protocols offered, in preference order.
    pub alpn: Vec<String>,
    /// Whose cipher-suite order picks the suite.
    pub cipher_preference: CipherPreference,
    /// When > 0, the configuration file and the certificate files are polled this often and
    /// the whole configuration is reloaded when one changed.
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
    /// How long one session-ticket key encrypts new tickets; the previous key still
    /// decrypts, so a ticket resumes for at most twice this long.
    #[serde(with = "humantime_serde")]
    pub ticket_rotation: Duration,
}

impl TlsSection {
    /// The client CA path, when mTLS is enabled.
    pub fn client_ca(&self) -> Option<&Path> {
        (!self.client_ca.as_os_str().is_empty()).then_some(self.client_ca.as_path())
    }
}

impl Default for TlsSection {
    fn default() -> Self {
        TlsSection {
            cert: "certs/server.pem".into(),
            key: "certs/server.key".into(),
            client_ca: PathBuf::new(),
            client_crl: Vec::new(),
            min_version: TlsVersion::V1_2,
            alpn: Vec::new(),
            cipher_preference: CipherPreference::Server,
            reload_interval: Duration::ZERO,
            ticket_rotation: Duration::from_secs(12 * 3600),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FramingMode {
    Auto,
    Binary,
    Text,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProtocolSection {
    pub framing: FramingMode,
    pub max_frame_bytes: usize,
    pub max_line_bytes: usize,
    /// The cap on any message before the connection authenticates, so that an
    /// unauthenticated client cannot make the gateway reserve a full frame.
    pub max_preauth_bytes: usize,
}

impl Default for ProtocolSection {
    fn default() -> Self {
        ProtocolSection {
            framing: FramingMode::Auto,
            max_frame_bytes: 65536,
            max_line_bytes: 4096,
            max_preauth_bytes: 1024,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub connection_rate_per_ip: u32,
    pub connection_burst_per_ip: u32,
    pub ipv6_prefix: u8,
    /// TLS handshakes in flight at once, counted from a connection's first byte; a new one
    /// waits for a place (within `handshake_timeout`) rather than being refused.
    pub max_handshakes_in_flight: usize,
    /// Handshakes in flight at once per client key; over it a connection is refused, so a
    /// few keys cannot take every place of `max_handshakes_in_flight`.
    pub max_handshakes_per_ip: usize,
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    pub commands_per_second: u32,
    pub commands_burst: u32,
    pub max_write_buffer_bytes: usize,
    /// SO_SNDBUF of each client socket (Linux reserves twice this): bounds the kernel's
    /// queue for a client that does not read, on top of `max_write_buffer_bytes`.
    pub socket_send_buffer: usize,
    #[serde(with = "humantime_serde")]
    pub prune_interval: Duration,
    /// Any connection is closed gracefully after this long, so that no credential outlives
    /// its revocation by more than this; 0 means no limit.
    #[serde(with = "humantime_serde")]
    pub max_connection_lifetime: Duration,
}

impl Default for LimitsSection {
    fn default() -> Self {
        LimitsSection {
            max_connections: 10000,
            max_connections_per_ip: 64,
            connection_rate_per_ip: 20,
            connection_burst_per_ip: 40,
            ipv6_prefix: 64,
            max_handshakes_in_flight: 1024,
            max_handshakes_per_ip: 8,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            commands_per_second: 100,
            commands_burst: 200,
            max_write_buffer_bytes: 262144,
            socket_send_buffer: 65536,
            prune_interval: Duration::from_secs(10),
            max_connection_lifetime: Duration::ZERO,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// A verified client certificate or a token.
    Any,
    /// Only `AUTH <token>`.
    Token,
    /// Only a client certificate.
    Mtls,
    /// Every command is served unauthenticated.
    None,
}

/// One accepted token: its name (the identity) and the SHA-256 of the token, in hex.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    pub name: String,
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSection {
    pub mode: AuthMode,
    #[serde(with = "humantime_serde")]
    pub auth_timeout: Duration,
    pub require_client_cert: bool,
    pub max_failures: u32,
    #[serde(with = "humantime_serde")]
    pub failure_window: Duration,
    #[serde(with = "humantime_serde")]
    pub ban_duration: Duration,
    pub tokens: Vec<TokenEntry>,
}

impl Default for AuthSection {
    fn default() -> Self {
        AuthSection {
            mode: AuthMode::Any,
            auth_timeout: Duration::from_secs(10),
            require_client_cert: false,
            max_failures: 5,
            failure_window: Duration::from_secs(60),
            ban_duration: Duration::from_secs(300),
            tokens: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessSection {
    /// When non-empty, only these networks may connect.
    pub allow: Vec<IpNet>,
    /// These networks are always refused.
    pub deny: Vec<IpNet>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyMode {
    Off,
    Optional,
    Required,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyProtocolSection {
    pub mode: ProxyMode,
    /// Peers whose PROXY header is believed.
    pub trusted: Vec<IpNet>,
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    pub max_v2_bytes: usize,
}

impl Default for ProxyProtocolSection {
    fn default() -> Self {
        ProxyProtocolSection {
            mode: ProxyMode::Off,
            trusted: Vec::new(),
            header_timeout: Duration::from_secs(3),
            max_v2_bytes: 512,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSection {
    /// `/metrics`, `/healthz`, `/readyz`. Loopback by default: metrics are not public.
    pub listen: SocketAddr,
    /// Admin connections open at once; at the cap the oldest is closed to make room, so
    /// slow clients cannot lock out the health check.
    pub max_connections: usize,
    /// An admin connection with no traffic for this long is closed (scrapers reconnect).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// A request's headers must arrive whole within this, however slowly they trickle (the
    /// idle timer alone restarts on every byte). Also bounds a keep-alive connection's wait
    /// for its next request.
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// The SHA-256 (hex) of the bearer token the write endpoints (`/bans`) require; empty
    /// turns them off (404).
    pub token_sha256: String,
    /// Bans the admin API may hold at once, so the list and its check stay small. In
    /// cluster mode it also caps the cluster's admin ban set in Redis and the admin
    /// changes waiting for Redis while it is down.
    pub max_bans: usize,
}

impl Default for AdminSection {
    fn default() -> Self {
        AdminSection {
            listen: "127.0.0.1:9464".parse().expect("constant address"),
            max_connections: 64,
            idle_timeout: Duration::from_secs(30),
            header_timeout: Duration::from_secs(5),
            token_sha256: String::new(),
            max_bans: 1024,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    pub format: LogFormat,
    /// A `tracing` filter; `RUST_LOG` overrides it.
    pub level: String,
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

/// How an authenticated connection is relayed to the upstream (SPEC section 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamMode {
    /// Every client message is checked, then forwarded as one length-prefixed frame.
    Messages,
    /// After authentication the bytes are relayed as they are.
    Stream,
}

/// How a server is chosen among those up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// The server with the fewest open relayed connections.
    LeastConn,
    /// Each server in turn.
    RoundRobin,
}

/// The header sent first on each upstream connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SendProxy {
    /// A PROXY v2 header with the client's address and identity TLVs.
    V2,
    /// Nothing: the upstream receives the frames (or bytes) only.
    Off,
}

/// Where one upstream server listens, as configured (`host:port` or `unix:/path`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerAddress {
    /// A host name or IP address and a port, resolved at start and at each reload.
    Tcp { host: String, port: u16 },
    /// An absolute Unix socket path.
    Unix(PathBuf),
}

impl ServerAddress {
    /// Parses `host:port`, `[v6]:port` or `unix:/path`.
    pub fn parse(text: &str) -> Result<ServerAddress, String> {
        if let Some(path) = text.strip_prefix("unix:") {
            let path = PathBuf::from(path);
            return if path.is_absolute() {
                Ok(ServerAddress::Unix(path))
            } else {
                Err(format!("{text:?}: a unix socket path must be absolute"))
            };
        }
        let (host, port) = text
            .rsplit_once(':')
            .ok_or_else(|| format!("{text:?} is not host:port or unix:/path"))?;
        let port: u16 = port
            .parse()
            .map_err(|_| format!("{text:?}: {port:?} is not a port number"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || port == 0 {
            return Err(format!("{text:?} needs a host and a non-zero port"));
        }
        Ok(ServerAddress::Tcp {
            host: host.to_string(),
            port,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamSection {
    /// The operator's own service: `host:port` (resolved at start and at each reload) or
    /// `unix:/path`. Empty: the built-in commands answer authenticated clients (turning it
    /// on or off needs a restart; the list itself reloads).
    pub servers: Vec<String>,
    pub mode: UpstreamMode,
    pub balance: Balance,
    /// A connect (or a health check) taking longer than this fails.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Relayed connections one server may hold; a full server is skipped.
    pub max_connections_per_server: usize,
    /// The cap on one message from the upstream, checked before it is buffered.
    pub max_reply_bytes: usize,
    pub send_proxy: SendProxy,
    /// Active checks (TCP connect + PROXY v2 LOCAL) this often; 0s = passive only.
    #[serde(with = "humantime_serde")]
    pub health_interval: Duration,
    /// Consecutive successes that mark a server up.
    pub rise: u32,
    /// Consecutive failures (checks or connects) that mark a server down.
    pub fall: u32,
}

impl Default for UpstreamSection {
    fn default() -> Self {
        UpstreamSection {
            servers: Vec::new(),
            mode: UpstreamMode::Messages,
            balance: Balance::LeastConn,
            connect_timeout: Duration::from_secs(2),
            max_connections_per_server: 10000,
            max_reply_bytes: 65536,
            send_proxy: SendProxy::V2,
            health_interval: Duration::from_secs(5),
            rise: 2,
            fall: 3,
        }
    }
}

/// Sharing limits, bans and ticket keys with other replicas through Redis (SPEC 7).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSection {
    /// `redis://host:6379/0` or `rediss://…` (TLS); empty runs standalone.
    pub redis: String,
    /// Prepended to every key written, so that several deployments can share one Redis.
    pub key_prefix: String,
    /// How often local counts are published and shared state fetched: the staleness of
    /// every shared limit.
    #[serde(with = "humantime_serde")]
    pub sync_interval: Duration,
}

impl ClusterSection {
    /// The Redis URL, when cluster mode is on.
    pub fn redis(&self) -> Option<&str> {
        (!self.redis.is_empty()).then_some(self.redis.as_str())
    }
}

impl Default for ClusterSection {
    fn default() -> Self {
        ClusterSection {
            redis: String::new(),
            key_prefix: "portcullis:".into(),
            sync_interval: Duration::from_millis(100),
        }
    }
}

/// Values given on the command line; they win over the environment and the file.
#[derive(Debug, Clone, Default)]
pub struct FlagOverrides {
    pub listen: Option<SocketAddr>,
    pub admin_listen: Option<SocketAddr>,
    pub log_format: Option<LogFormat>,
    pub log_level: Option<String>,
}

impl Config {
    /// Loads `path` (or only defaults when `None`), applies the `PORTCULLIS_*` variables of
    /// `env` and then `flags`, resolves relative paths against the file's folder, and
    /// validates the result.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        flags: &FlagOverrides,
    ) -> Result<Config, ConfigError> {
        let mut table = match path {
            Some(path) => read_table(path)?,
            None => toml::Table::new(),
        };
        let mut env = apply_env(&mut table, env)?;
        let mut config =
            from_table(table, path.unwrap_or(Path::new("<defaults>"))).map_err(|e| env.blame(e))?;
        config.apply_flags(flags, &mut env);
        config.flags = flags.clone();
        if let Some(dir) = path.and_then(Path::parent) {
            config.resolve_paths(dir);
        }
        config.source = path.map(Path::to_path_buf);
        config.validate().map_err(|e| env.blame(e))?;
        config.unknown_env = env.unknown;
        Ok(config)
    }

    /// The one warning about ignored `PORTCULLIS_*` variables, when there are any.
    pub fn unknown_env_warning(&self) -> Option<String> {
        (!self.unknown_env.is_empty()).then(|| {
            format!(
                "ignoring environment variables that name no configuration key: {}",
                self.unknown_env.join(", ")
            )
        })
    }

    /// Parses a whole TOML document, without environment or flags (fuzzing, tests).
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        let origin = Path::new("<string>");
        let table: toml::Table =
            text.parse()
                .map_err(|e: toml::de::Error| ConfigError::Syntax {
                    path: origin.into(),
                    message: e.to_string(),
                })?;
        let config = from_table(table, origin)?;
        config.validate()?;
        Ok(config)
    }

    /// The effective configuration as TOML, for `check-config`.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }

    /// Applies the flags; a key a flag sets is no longer the environment's to answer for.
    fn apply_flags(&mut self, flags: &FlagOverrides, env: &mut env::EnvOverrides) {
        if let Some(listen) = flags.listen {
            self.server.listen = listen;
            env.set_by_flag("server.listen", "--listen");
        }
        if let Some(listen) = flags.admin_listen {
            self.admin.listen = listen;
            env.set_by_flag("admin.listen", "--admin-listen");
        }
        if let Some(format) = flags.log_format {
            self.log.format = format;
            env.set_by_flag("log.format", "--log-format");
        }
        if let Some(level) = &flags.log_level {
            self.log.level = level.clone();
            env.set_by_flag("log.level", "--log-level");
        }
    }

    fn resolve_paths(&mut self, dir: &Path) {
        for path in [
            &mut self.tls.cert,
            &mut self.tls.key,
            &mut self.tls.client_ca,
        ]
        .into_iter()
        .chain(&mut self.tls.client_crl)
        {
            if !path.as_os_str().is_empty() && path.is_relative() {
                *path = dir.join(&*path);
            }
        }
    }
}

fn read_table(path: &Path) -> Result<toml::Table, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
        path: path.into(),
        error,
    })?;
    text.parse()
        .map_err(|e: toml::de::Error| ConfigError::Syntax {
            path: path.into(),
            message: e.to_string(),
        })
}

/// How a duration is written, for errors about one.
const DURATION_EXAMPLE: &str = r#"use e.g. "10s", "5m", "1h30m""#;

/// Deserializes with the path of the offending key in the error, and for a duration key an
/// example of a valid value.
fn from_table(table: toml::Table, origin: &Path) -> Result<Config, ConfigError> {
    serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
        let key = e.path().to_string();
        let mut message = e.into_inner().message().to_string();
        if key == "." {
            return ConfigError::Syntax {
                path: origin.into(),
                message,
            };
        }
        if is_duration_key(&key) {
            message = format!("{message}; {DURATION_EXAMPLE}");
        }
        ConfigError::Key { key, message }
    })
}

/// Whether `section.key` holds a duration: its default renders as one.
fn is_duration_key(key: &str) -> bool {
    let Some((section, name)) = key.split_once('.') else {
        return false;
    };
    let Ok(toml::Value::Table(defaults)) = toml::Value::try_from(Config::default()) else {
        return false;
    };
    matches!(
        defaults.get(section).and_then(|s| s.get(name)),
        Some(toml::Value::String(text)) if humantime::parse_duration(text).is_ok()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("portcullis.toml");
        std::fs::write(&path, text).unwrap();
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        Config::load(Some(&path), env, &FlagOverrides::default())
    }

    #[test]
    fn defaults_match_the_spec() {
        let c = Config::default();
        assert_eq!(c.server.listen.to_string(), "[::]:8443");
        assert_eq!(c.protocol.max_frame_bytes, 65536);
        assert_eq!(c.limits.idle_timeout, Duration::from_secs(60));
        assert_eq!(c.auth.ban_duration, Duration::from_secs(300));
        assert_eq!(c.admin.listen.to_string(), "127.0.0.1:9464");
        c.validate().unwrap();
    }

    #[test]
    fn unknown_key_is_named_by_its_path() {
        let err = load_str("[limits]\nmax_conections = 5\n", &[]).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("limits"), "{text}");
        assert!(text.contains("max_conections"), "{text}");
    }

    #[test]
    fn wrong_type_is_named_by_its_path() {
        let err = load_str("[limits]\nidle_timeout = \"soon\"\n", &[]).unwrap_err();
        assert!(err.to_string().starts_with("limits.idle_timeout"), "{err}");
    }

    #[test]
    fn a_bad_duration_shows_a_valid_one() {
        for text in ["idle_timeout = \"soon\"", "idle_timeout = 10"] {
            let err = load_str(&format!("[limits]\n{text}\n"), &[]).unwrap_err();
            let text = err.to_string();
            assert!(text.starts_with("limits.idle_timeout: "), "{text}");
            assert!(text.ends_with(r#"use e.g. "10s", "5m", "1h30m""#), "{text}");
        }
        // Not for other keys.
        let err = load_str("[log]\nlevel = 3\n", &[]).unwrap_err();
        assert!(!err.to_string().contains("use e.g."), "{err}");
        // From the environment, the variable is named too.
        let err = load_str("", &[("PORTCULLIS_AUTH_BAN_DURATION", "1 fortnight")]).unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with(
                "environment variable PORTCULLIS_AUTH_BAN_DURATION: auth.ban_duration: "
            ),
            "{text}"
        );
        assert!(text.ends_with(r#"use e.g. "10s", "5m", "1h30m""#), "{text}");
    }

    #[test]
    fn a_log_level_that_is_no_level_is_refused() {
        for good in [
            "info",
            "WARN",
            "off",
            "info,portcullis=debug",
            "portcullis::session=trace",
        ] {
            load_str(&format!("[log]\nlevel = {good:?}\n"), &[]).unwrap();
        }
        for bad in [
            "verbose",
            "warning",
            "",
            "info,loud",
            "portcullis=[",
            "info,=x",
        ] {
            let err = load_str(&format!("[log]\nlevel = {bad:?}\n"), &[]).unwrap_err();
            assert!(err.to_string().starts_with("log.level: "), "{bad:?}: {err}");
        }
        let err = load_str("", &[("PORTCULLIS_LOG_LEVEL", "debug")])
            .map(|mut c| {
                let mut env = env::EnvOverrides::default();
                c.apply_flags(
                    &FlagOverrides {
                        log_level: Some("chatty".into()),
                        ..Default::default()
                    },
                    &mut env,
                );
                c.validate().map_err(|e| env.blame(e))
            })
            .unwrap()
            .unwrap_err();
        assert!(err.to_string().starts_with("--log-level: "), "{err}");
    }

    #[test]
    fn human_durations() {
        let c = load_str(
            "[limits]\nidle_timeout = \"1h30m\"\nhandshake_timeout = \"250ms\"\n",
            &[],
        )
        .unwrap();
        assert_eq!(c.limits.idle_timeout, Duration::from_secs(5400));
        assert_eq!(c.limits.handshake_timeout, Duration::from_millis(250));
    }

    #[test]
    fn frame_cap_above_16_mib_is_refused() {
        let err = load_str("[protocol]\nmax_frame_bytes = 16777216\n", &[]).unwrap_err();
        assert!(
            err.to_string().starts_with("protocol.max_frame_bytes"),
            "{err}"
        );
        load_str(
            "[protocol]\nmax_frame_bytes = 16777215\n[limits]\nmax_write_buffer_bytes = 16777279\n",
            &[],
        )
        .unwrap();
    }

    #[test]
    fn environment_overrides_file_and_flags_override_environment() {
        let c = load_str(
            "[limits]\nidle_timeout = \"5s\"\n[server]\nlisten = \"127.0.0.1:1\"\n",
            &[
                ("PORTCULLIS_LIMITS_IDLE_TIMEOUT", "7s"),
                ("PORTCULLIS_LIMITS_MAX_CONNECTIONS", "12"),
                ("PORTCULLIS_PROXY_PROTOCOL_MODE", "optional"),
                (
                    "PORTCULLIS_PROXY_PROTOCOL_TRUSTED",
                    "10.0.0.0/8, 127.0.0.1/32",
                ),
                ("PORTCULLIS_SERVER_LISTEN", "127.0.0.1:2"),
                ("UNRELATED", "x"),
            ],
        )
        .unwrap();
        assert_eq!(c.limits.idle_timeout, Duration::from_secs(7));
        assert_eq!(c.limits.max_connections, 12);
        assert_eq!(c.proxy_protocol.mode, ProxyMode::Optional);
        assert_eq!(c.proxy_protocol.trusted.len(), 2);
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:2");

        let mut c2 = c.clone();
        c2.apply_flags(
            &FlagOverrides {
                listen: Some("127.0.0.1:3".parse().unwrap()),
                ..Default::default()
            },
            &mut Default::default(),
        );
        assert_eq!(c2.server.listen.to_string(), "127.0.0.1:3");
    }

    #[test]
    fn variables_naming_no_key_are_ignored_and_listed() {
        let c = load_str(
            "",
            &[
                ("PORTCULLIS_PORT", "tcp://10.0.0.1:8443"),
                ("PORTCULLIS_SERVICE_HOST", "10.0.0.1"),
                ("PORTCULLIS_ADMIN_SERVICE_PORT", "9464"),
                ("PORTCULLIS_LIMITS_MAX_CONNECTIONS", "12"),
            ],
        )
        .unwrap();
        assert_eq!(c.limits.max_connections, 12);
        assert_eq!(
            c.unknown_env,
            [
                "PORTCULLIS_ADMIN_SERVICE_PORT",
                "PORTCULLIS_PORT",
                "PORTCULLIS_SERVICE_HOST"
            ]
        );
        let warning = c.unknown_env_warning().unwrap();
        assert!(
            warning.ends_with(
                "PORTCULLIS_ADMIN_SERVICE_PORT, PORTCULLIS_PORT, PORTCULLIS_SERVICE_HOST"
            ),
            "{warning}"
        );
        assert!(load_str("", &[]).unwrap().unknown_env_warning().is_none());
    }

    #[test]
    fn invalid_values_of_real_keys_name_the_variable() {
        let err = load_str("", &[("PORTCULLIS_LIMITS_MAX_CONNECTIONS", "many")]).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("PORTCULLIS_LIMITS_MAX_CONNECTIONS"), "{text}");
        assert!(text.contains("not an integer"), "{text}");
        // Type errors found while deserializing, and validation errors, name it too.
        let err = load_str("", &[("PORTCULLIS_PROXY_PROTOCOL_MODE", "sometimes")]).unwrap_err();
        assert!(
            err.to_string().starts_with(
                "environment variable PORTCULLIS_PROXY_PROTOCOL_MODE: proxy_protocol.mode"
            ),
            "{err}"
        );
        let err = load_str("", &[("PORTCULLIS_PROTOCOL_MAX_FRAME_BYTES", "16777216")]).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("environment variable PORTCULLIS_PROTOCOL_MAX_FRAME_BYTES: protocol.max_frame_bytes"),
            "{err}"
        );
        // The same error from the file names the key only.
        let err = load_str("[protocol]\nmax_frame_bytes = 16777216\n", &[]).unwrap_err();
        assert!(
            err.to_string().starts_with("protocol.max_frame_bytes"),
            "{err}"
        );
    }

    #[test]
    fn durations_above_365_days_are_refused_naming_key_or_variable() {
        let err = load_str("[limits]\nidle_timeout = \"366d\"\n", &[]).unwrap_err();
        assert!(err.to_string().starts_with("limits.idle_timeout"), "{err}");
        load_str("[limits]\nidle_timeout = \"365d\"\n", &[]).unwrap();
        let err = load_str("", &[("PORTCULLIS_LIMITS_IDLE_TIMEOUT", "400000000000y")]).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("PORTCULLIS_LIMITS_IDLE_TIMEOUT"), "{text}");
        assert!(text.contains("365 days"), "{text}");
        let err = load_str("", &[("PORTCULLIS_SERVER_SHUTDOWN_DELAY", "400d")]).unwrap_err();
        assert!(
            err.to_string().contains("PORTCULLIS_SERVER_SHUTDOWN_DELAY"),
            "{err}"
        );
        // A value humantime cannot hold at all is named by its variable too.
        let err = load_str(
            "",
            &[("PORTCULLIS_AUTH_BAN_DURATION", "99999999999999999999y")],
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("PORTCULLIS_AUTH_BAN_DURATION"),
            "{err}"
        );
    }

    #[test]
    fn every_timeout_must_be_above_zero() {
        for key in [
            "[admin]\nidle_timeout",
            "[server]\ndrain_timeout",
            "[limits]\nhandshake_timeout",
            "[auth]\nauth_timeout",
            "[proxy_protocol]\nheader_timeout",
        ] {
            let err = load_str(&format!("{key} = \"0s\"\n"), &[]).unwrap_err();
            let dotted = key.trim_start_matches('[').replace("]\n", ".");
            assert!(err.to_string().starts_with(&dotted), "{err}");
            assert!(err.to_string().contains("greater than 0s"), "{err}");
        }
        // "0s" still means "off" where a key says so.
        load_str("[server]\nshutdown_delay = \"0s\"\n", &[]).unwrap();
    }

    #[test]
    fn preauth_cap_and_socket_buffer_are_bounded() {
        let c = load_str("", &[]).unwrap();
        assert_eq!(c.protocol.max_preauth_bytes, 1024);
        assert_eq!(c.limits.socket_send_buffer, 65536);
        let err = load_str("[protocol]\nmax_preauth_bytes = 64\n", &[]).unwrap_err();
        assert!(
            err.to_string().starts_with("protocol.max_preauth_bytes"),
            "{err}"
        );
        let err = load_str("[limits]\nsocket_send_buffer = 0\n", &[]).unwrap_err();
        assert!(
            err.to_string().starts_with("limits.socket_send_buffer"),
            "{err}"
        );
    }

    #[test]
    fn write_buffer_must_hold_one_full_reply() {
        let err = load_str(
            "[protocol]\nmax_frame_bytes = 100000\n[limits]\nmax_write_buffer_bytes = 100000\n",
            &[],
        )
        .unwrap_err();
        assert!(
            err.to_string().starts_with("limits.max_write_buffer_bytes"),
            "{err}"
        );
        assert!(err.to_string().contains("100064"), "{err}");
        load_str(
            "[protocol]\nmax_frame_bytes = 100000\n[limits]\nmax_write_buffer_bytes = 100064\n",
            &[],
        )
        .unwrap();
        let err = load_str("[protocol]\nmax_line_bytes = 300000\n", &[]).unwrap_err();
        assert!(
            err.to_string().starts_with("limits.max_write_buffer_bytes"),
            "{err}"
        );
    }

    #[test]
    fn relative_paths_resolve_against_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("portcullis.toml");
        std::fs::write(&path, "[tls]\ncert = \"c.pem\"\nkey = \"/abs/k.pem\"\n").unwrap();
        let c = Config::load(Some(&path), [], &FlagOverrides::default()).unwrap();
        assert_eq!(c.tls.cert, dir.path().join("c.pem"));
        assert_eq!(c.tls.key, PathBuf::from("/abs/k.pem"));
        assert!(c.tls.client_ca().is_none());
    }

    #[test]
    fn token_and_mode_rules() {
        let err = load_str("[[auth.tokens]]\nname = \"a\"\nsha256 = \"abc\"\n", &[]).unwrap_err();
        assert!(
            err.to_string().starts_with("auth.tokens[0].sha256"),
            "{err}"
        );
        let err = load_str("[auth]\nmode = \"mtls\"\n", &[]).unwrap_err();
        assert!(err.to_string().starts_with("auth.mode"), "{err}");
    }

    #[test]
    fn upstream_keys_validate_and_take_environment_overrides() {
        let c = load_str(
            "[upstream]\nservers = [\"backend:7000\", \"unix:/run/app.sock\", \"[::1]:7001\"]\n\
             mode = \"stream\"\nbalance = \"round_robin\"\nsend_proxy = \"off\"\n",
            &[
                (
                    "PORTCULLIS_UPSTREAM_SERVERS",
                    "10.0.0.5:7000, 10.0.0.6:7000",
                ),
                ("PORTCULLIS_UPSTREAM_HEALTH_INTERVAL", "0s"),
                ("PORTCULLIS_UPSTREAM_FALL", "5"),
            ],
        )
        .unwrap();
        assert_eq!(c.upstream.servers, ["10.0.0.5:7000", "10.0.0.6:7000"]);
        assert_eq!(c.upstream.mode, UpstreamMode::Stream);
        assert_eq!(c.upstream.balance, Balance::RoundRobin);
        assert_eq!(c.upstream.send_proxy, SendProxy::Off);
        assert_eq!(c.upstream.health_interval, Duration::ZERO);
        assert_eq!(c.upstream.fall, 5);
        assert_eq!(
            ServerAddress::parse("[::1]:7001").unwrap(),
            ServerAddress::Tcp {
                host: "::1".into(),
                port: 7001
            }
        );

        let refused = [
            ("servers = [\"backend\"]", "upstream.servers[0]"),
            ("servers = [\"unix:run/app.sock\"]", "upstream.servers[0]"),
            ("servers = [\"a:1\", \"a:1\"]", "upstream.servers[1]"),
            ("mode = \"datagram\"", "upstream.mode"),
            ("balance = \"random\"", "upstream.balance"),
            ("send_proxy = \"v1\"", "upstream.send_proxy"),
            ("max_reply_bytes = 16777216", "upstream.max_reply_bytes"),
            ("max_reply_bytes = 0", "upstream.max_reply_bytes"),
            ("rise = 0", "upstream.rise"),
            ("fall = 0", "upstream.fall"),
            ("connect_timeout = \"0s\"", "upstream.connect_timeout"),
            (
                "max_connections_per_server = 0",
                "upstream.max_connections_per_server",
            ),
        ];
        for (line, key) in refused {
            let err = load_str(&format!("[upstream]\n{line}\n"), &[]).unwrap_err();
            assert!(err.to_string().starts_with(key), "{line}: {err}");
        }
        let err = load_str(
            "[limits]\nmax_write_buffer_bytes = 70000\n[upstream]\nmax_reply_bytes = 69999\n",
            &[],
        )
        .unwrap_err();
        assert!(err.to_string().contains("max_write_buffer_bytes"), "{err}");
    }

    #[test]
    fn effective_config_round_trips() {
        let c = Config::default();
        let again = Config::from_toml_str(&c.to_toml()).unwrap();
        assert_eq!(again.to_toml(), c.to_toml());
    }

    #[test]
    fn cluster_defaults_and_rules() {
        let c = Config::default();
        assert_eq!(c.cluster.redis(), None, "standalone by default");
        assert_eq!(c.cluster.key_prefix, "portcullis:");
        assert_eq!(c.cluster.sync_interval, Duration::from_millis(100));
        assert_eq!(c.tls.ticket_rotation, Duration::from_secs(12 * 3600));
        for url in ["redis://127.0.0.1:6379/0", "rediss://cache.example:6380/1"] {
            let c = load_str(&format!("[cluster]\nredis = \"{url}\"\n"), &[]).unwrap();
            assert_eq!(c.cluster.redis(), Some(url));
        }
        for (text, key) in [
            ("[cluster]\nredis = \"http://127.0.0.1\"\n", "cluster.redis"),
            ("[cluster]\nredis = \"127.0.0.1:6379\"\n", "cluster.redis"),
            (
                "[cluster]\nsync_interval = \"1ms\"\n",
                "cluster.sync_interval",
            ),
            (
                "[cluster]\nsync_interval = \"10s\"\n",
                "cluster.sync_interval",
            ),
            ("[cluster]\nkey_prefix = \"a b\"\n", "cluster.key_prefix"),
            ("[tls]\nticket_rotation = \"0s\"\n", "tls.ticket_rotation"),
            (
                "[tls]\nticket_rotation = \"8days\"\n",
                "tls.ticket_rotation",
            ),
        ] {
            let err = load_str(text, &[]).unwrap_err();
            assert!(err.to_string().starts_with(key), "{text}: {err}");
        }
        let c = load_str("", &[("PORTCULLIS_CLUSTER_REDIS", "redis://127.0.0.1:1/0")]).unwrap();
        assert_eq!(c.cluster.redis(), Some("redis://127.0.0.1:1/0"));
    }
}
