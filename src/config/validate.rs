//! The rules the types alone do not express; each error names its key.

use std::time::Duration;

use super::{AuthMode, Config, ConfigError, ProxyMode, ServerAddress, MAX_FRAME_CAP, MAX_LINE_CAP};

/// The longest duration any key accepts: a longer one is a typo or an attack on the
/// configuration, never a deliberate setting.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 86_400);
/// The smallest `protocol.max_preauth_bytes`: `AUTH <token>` must fit.
const MIN_PREAUTH: usize = 128;
/// Bounds of `limits.socket_send_buffer`: below 4 KiB the kernel rounds up anyway; above
/// 1 GiB the value no longer fits SO_SNDBUF's doubled `int`.
const MIN_SOCKET_BUFFER: usize = 4096;
const MAX_SOCKET_BUFFER: usize = 1 << 30;
/// The most `auth.max_failures` allowed: the failure log of a key holds that many instants.
const MAX_FAILURES: u32 = 1000;
/// `cluster.key_prefix` is repeated in every key: keep it short.
const MAX_KEY_PREFIX: usize = 64;
/// Below this, syncs would load Redis for no gain in accuracy.
const MIN_SYNC_INTERVAL: Duration = Duration::from_millis(10);
/// Above this, the shared 10 s rate window would be too stale to mean anything.
const MAX_SYNC_INTERVAL: Duration = Duration::from_secs(2);
/// RFC 8446 4.6.1: a ticket lifetime is at most 7 days.
const MAX_TICKET_ROTATION: Duration = Duration::from_secs(7 * 86_400);

/// The largest reply the gateway can queue at once: a full message echoed back, plus the
/// reply's own prefix and framing.
fn largest_reply(config: &Config) -> usize {
    let p = &config.protocol;
    p.max_frame_bytes.max(p.max_line_bytes) + 64
}

impl Config {
    /// Checks every rule that the types alone do not express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let p = &self.protocol;
        if p.max_frame_bytes == 0 || p.max_frame_bytes > MAX_FRAME_CAP {
            return Err(ConfigError::key(
                "protocol.max_frame_bytes",
                format!(
                    "must be between 1 and {MAX_FRAME_CAP} (16 MiB - 1), got {}",
                    p.max_frame_bytes
                ),
            ));
        }
        if p.max_line_bytes == 0 || p.max_line_bytes > MAX_LINE_CAP {
            return Err(ConfigError::key(
                "protocol.max_line_bytes",
                format!(
                    "must be between 1 and {MAX_LINE_CAP}, got {}",
                    p.max_line_bytes
                ),
            ));
        }
        if p.max_preauth_bytes < MIN_PREAUTH || p.max_preauth_bytes > MAX_FRAME_CAP {
            return Err(ConfigError::key(
                "protocol.max_preauth_bytes",
                format!(
                    "must be between {MIN_PREAUTH} (an AUTH line must fit) and {MAX_FRAME_CAP}, got {}",
                    p.max_preauth_bytes
                ),
            ));
        }
        let sndbuf = self.limits.socket_send_buffer;
        if !(MIN_SOCKET_BUFFER..=MAX_SOCKET_BUFFER).contains(&sndbuf) {
            return Err(ConfigError::key(
                "limits.socket_send_buffer",
                format!(
                    "must be between {MIN_SOCKET_BUFFER} and {MAX_SOCKET_BUFFER}, got {sndbuf}"
                ),
            ));
        }
        self.validate_durations()?;
        self.validate_limits()?;
        self.validate_auth()?;
        self.validate_upstream()?;
        self.validate_admin()?;
        self.validate_cluster()?;
        self.validate_log_level()?;
        if self.proxy_protocol.max_v2_bytes > 65535 {
            return Err(ConfigError::key(
                "proxy_protocol.max_v2_bytes",
                "must be at most 65535 (a v2 header's length is 16 bits)",
            ));
        }
        if self.proxy_protocol.mode != ProxyMode::Off && self.proxy_protocol.trusted.is_empty() {
            return Err(ConfigError::key(
                "proxy_protocol.trusted",
                "must list the load balancers' networks when mode is not \"off\"",
            ));
        }
        Ok(())
    }

    fn validate_limits(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        let positive: [(&str, u64); 11] = [
            ("limits.max_connections", l.max_connections as u64),
            (
                "limits.max_connections_per_ip",
                l.max_connections_per_ip as u64,
            ),
            (
                "limits.connection_rate_per_ip",
                l.connection_rate_per_ip.into(),
            ),
            (
                "limits.connection_burst_per_ip",
                l.connection_burst_per_ip.into(),
            ),
            (
                "limits.max_handshakes_in_flight",
                l.max_handshakes_in_flight as u64,
            ),
            (
                "limits.max_handshakes_per_ip",
                l.max_handshakes_per_ip as u64,
            ),
            ("limits.commands_per_second", l.commands_per_second.into()),
            ("limits.commands_burst", l.commands_burst.into()),
            (
                "limits.max_write_buffer_bytes",
                l.max_write_buffer_bytes as u64,
            ),
            ("admin.max_connections", self.admin.max_connections as u64),
            ("auth.max_failures", self.auth.max_failures.into()),
        ];
        if let Some((key, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(ConfigError::key(key, "must be greater than 0"));
        }
        let needed = largest_reply(self);
        if l.max_write_buffer_bytes < needed {
            return Err(ConfigError::key(
                "limits.max_write_buffer_bytes",
                format!(
                    "must be at least the larger of protocol.max_frame_bytes and \
                     protocol.max_line_bytes, plus 64 ({needed}), so that one full reply fits"
                ),
            ));
        }
        if l.ipv6_prefix == 0 || l.ipv6_prefix > 128 {
            return Err(ConfigError::key(
                "limits.ipv6_prefix",
                "must be between 1 and 128",
            ));
        }
        Ok(())
    }

    /// Every duration is at most [`MAX_DURATION`]; every timeout and interval is above 0.
    fn validate_durations(&self) -> Result<(), ConfigError> {
        let (l, a) = (&self.limits, &self.auth);
        // Keys for which "0s" means "off" (SPEC section 3).
        let may_be_zero = [
            ("server.shutdown_delay", self.server.shutdown_delay),
            ("tls.reload_interval", self.tls.reload_interval),
            ("auth.ban_duration", a.ban_duration),
            ("upstream.health_interval", self.upstream.health_interval),
            ("limits.max_connection_lifetime", l.max_connection_lifetime),
        ];
        let positive = [
            ("server.drain_timeout", self.server.drain_timeout),
            ("limits.handshake_timeout", l.handshake_timeout),
            ("limits.idle_timeout", l.idle_timeout),
            ("limits.prune_interval", l.prune_interval),
            ("auth.auth_timeout", a.auth_timeout),
            ("auth.failure_window", a.failure_window),
            (
                "proxy_protocol.header_timeout",
                self.proxy_protocol.header_timeout,
            ),
            ("admin.idle_timeout", self.admin.idle_timeout),
            ("admin.header_timeout", self.admin.header_timeout),
            ("upstream.connect_timeout", self.upstream.connect_timeout),
            ("tls.ticket_rotation", self.tls.ticket_rotation),
            ("cluster.sync_interval", self.cluster.sync_interval),
        ];
        if let Some((key, _)) = positive.iter().find(|(_, d)| d.is_zero()) {
            return Err(ConfigError::key(key, "must be greater than 0s"));
        }
        let too_long = positive
            .iter()
            .chain(&may_be_zero)
            .find(|(_, d)| *d > MAX_DURATION);
        if let Some((key, d)) = too_long {
            return Err(ConfigError::key(
                key,
                format!("{} is longer than 365 days", humantime::format_duration(*d)),
            ));
        }
        Ok(())
    }

    fn validate_upstream(&self) -> Result<(), ConfigError> {
        let u = &self.upstream;
        let mut seen = std::collections::HashSet::new();
        for (i, server) in u.servers.iter().enumerate() {
            let key = format!("upstream.servers[{i}]");
            ServerAddress::parse(server).map_err(|message| ConfigError::key(&key, message))?;
            if !seen.insert(server.as_str()) {
                return Err(ConfigError::key(
                    &key,
                    format!("duplicate server {server:?}"),
                ));
            }
        }
        let positive: [(&str, u64); 3] = [
            (
                "upstream.max_connections_per_server",
                u.max_connections_per_server as u64,
            ),
            ("upstream.rise", u.rise.into()),
            ("upstream.fall", u.fall.into()),
        ];
        if let Some((key, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(ConfigError::key(key, "must be greater than 0"));
        }
        if u.max_reply_bytes == 0 || u.max_reply_bytes > MAX_FRAME_CAP {
            return Err(ConfigError::key(
                "upstream.max_reply_bytes",
                format!(
                    "must be between 1 and {MAX_FRAME_CAP} (16 MiB - 1), got {}",
                    u.max_reply_bytes
                ),
            ));
        }
        // A relayed reply is held back until it fits the client's write buffer: one must fit.
        if u.max_reply_bytes + 64 > self.limits.max_write_buffer_bytes {
            return Err(ConfigError::key(
                "upstream.max_reply_bytes",
                "must be at most limits.max_write_buffer_bytes - 64 (one reply must fit)",
            ));
        }
        Ok(())
    }

    /// The Redis URL parses with a `redis` or `rediss` scheme; the sync interval is short
    /// enough to share a 10 s window; ticket keys live within TLS 1.3's 7-day ticket cap.
    fn validate_cluster(&self) -> Result<(), ConfigError> {
        let c = &self.cluster;
        if let Some(url) = c.redis() {
            let scheme = redis::parse_redis_url(url).map(|u| u.scheme().to_string());
            if !matches!(scheme.as_deref(), Some("redis" | "rediss"))
                || redis::Client::open(url).is_err()
            {
                return Err(ConfigError::key(
                    "cluster.redis",
                    "must be a redis://host:port/db or rediss://host:port/db URL, or empty",
                ));
            }
        }
        if c.key_prefix.len() > MAX_KEY_PREFIX
            || c.key_prefix.bytes().any(|b| !b.is_ascii_graphic())
        {
            return Err(ConfigError::key(
                "cluster.key_prefix",
                format!(
                    "must be at most {MAX_KEY_PREFIX} printable ASCII characters without spaces"
                ),
            ));
        }
        if c.sync_interval < MIN_SYNC_INTERVAL || c.sync_interval > MAX_SYNC_INTERVAL {
            return Err(ConfigError::key(
                "cluster.sync_interval",
                "must be between 10ms and 2s: shared limits are as stale as this",
            ));
        }
        if self.tls.ticket_rotation > MAX_TICKET_ROTATION {
            return Err(ConfigError::key(
                "tls.ticket_rotation",
                "must be at most 7 days (TLS 1.3 caps a ticket's lifetime there)",
            ));
        }
        Ok(())
    }

    fn validate_admin(&self) -> Result<(), ConfigError> {
        let digest = &self.admin.token_sha256;
        if !digest.is_empty() && (digest.len() != 64 || hex::decode(digest).is_err()) {
            return Err(ConfigError::key(
                "admin.token_sha256",
                "must be empty or 64 hex characters (the token's SHA-256)",
            ));
        }
        if self.admin.max_bans == 0 {
            return Err(ConfigError::key("admin.max_bans", "must be greater than 0"));
        }
        Ok(())
    }

    fn validate_auth(&self) -> Result<(), ConfigError> {
        let a = &self.auth;
        if a.max_failures > MAX_FAILURES {
            return Err(ConfigError::key(
                "auth.max_failures",
                format!("must be at most {MAX_FAILURES}"),
            ));
        }
        if a.mode == AuthMode::Mtls && self.tls.client_ca().is_none() {
            return Err(ConfigError::key(
                "auth.mode",
                "\"mtls\" needs tls.client_ca",
            ));
        }
        if !self.tls.client_crl.is_empty() && self.tls.client_ca().is_none() {
            return Err(ConfigError::key(
                "tls.client_crl",
                "needs tls.client_ca (CRLs revoke client certificates)",
            ));
        }
        if a.require_client_cert && self.tls.client_ca().is_none() {
            return Err(ConfigError::key(
                "auth.require_client_cert",
                "needs tls.client_ca",
            ));
        }
        let mut names = std::collections::HashSet::new();
        for (i, token) in a.tokens.iter().enumerate() {
            let key = format!("auth.tokens[{i}]");
            if token.name.is_empty() || token.name.bytes().any(|b| !b.is_ascii_graphic()) {
                return Err(ConfigError::key(
                    &format!("{key}.name"),
                    "must be non-empty printable ASCII without spaces",
                ));
            }
            if !names.insert(token.name.as_str()) {
                return Err(ConfigError::key(
                    &format!("{key}.name"),
                    format!("duplicate name {:?}", token.name),
                ));
            }
            if token.sha256.len() != 64 || hex::decode(&token.sha256).is_err() {
                return Err(ConfigError::key(
                    &format!("{key}.sha256"),
                    "must be 64 hex characters (the token's SHA-256)",
                ));
            }
        }
        Ok(())
    }

    /// `log.level` must say what it means: a bare word that is no level (`verbose`,
    /// `warning`) parses as a target name and would silently turn every other line off.
    fn validate_log_level(&self) -> Result<(), ConfigError> {
        use tracing_subscriber::filter::{EnvFilter, LevelFilter};
        let level = self.log.level.trim();
        let refuse = |why: String| {
            Err(ConfigError::key(
                "log.level",
                format!(
                    "{why}; use a level (off, error, warn, info, debug, trace) or directives \
                     such as \"info,portcullis=debug\""
                ),
            ))
        };
        if level.is_empty() {
            return refuse("is empty".into());
        }
        if let Err(e) = EnvFilter::builder().parse(level) {
            return refuse(format!("{level:?} is not a log filter ({e})"));
        }
        let bare_word = |d: &&str| !d.contains(['=', '[', ':']);
        let directives = level.split(',').map(str::trim).filter(|d| !d.is_empty());
        if let Some(word) = directives
            .filter(bare_word)
            .find(|d| d.parse::<LevelFilter>().is_err())
        {
            return refuse(format!("{word:?} is not a log level"));
        }
        Ok(())
    }
}
