//! The closed sets of outcomes that become metric labels and reply codes.
//!
//! Every refusal, close and error a peer can cause is mapped onto one of these enums before
//! it is counted or logged, so a label value can never carry an address, a token or any
//! other unbounded text (SPEC section 5).

/// Why a connection was refused before any TLS work was done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// The client address is in `access.deny`, or `access.allow` is set and does not hold it.
    Denied,
    /// The client key is banned after repeated authentication failures.
    Banned,
    /// The client key opened new connections faster than `connection_rate_per_ip`.
    RateLimited,
    /// The client key already holds `max_connections_per_ip` connections.
    PerIpCap,
    /// The gateway already holds `max_connections` connections.
    MaxConnections,
    /// The client key already has `max_handshakes_per_ip` handshakes in flight.
    HandshakeCapacity,
    /// `proxy_protocol.mode = "required"` and no header came.
    ProxyRequired,
    /// A trusted peer sent a malformed, oversized or late PROXY header.
    BadProxyHeader,
}

impl RejectReason {
    /// Every value, for pre-registering metric series.
    pub const ALL: [RejectReason; 8] = [
        RejectReason::Denied,
        RejectReason::Banned,
        RejectReason::RateLimited,
        RejectReason::PerIpCap,
        RejectReason::MaxConnections,
        RejectReason::HandshakeCapacity,
        RejectReason::ProxyRequired,
        RejectReason::BadProxyHeader,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::Denied => "denied",
            RejectReason::Banned => "banned",
            RejectReason::RateLimited => "rate_limited",
            RejectReason::PerIpCap => "per_ip_cap",
            RejectReason::MaxConnections => "max_connections",
            RejectReason::HandshakeCapacity => "handshake_capacity",
            RejectReason::ProxyRequired => "proxy_required",
            RejectReason::BadProxyHeader => "bad_proxy_header",
        }
    }
}

/// Why an admitted connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// The client closed its side (EOF or close_notify).
    ClientClose,
    /// The client sent `QUIT`.
    Quit,
    /// No message arrived within `idle_timeout`.
    IdleTimeout,
    /// The client did not authenticate within `auth_timeout`.
    AuthTimeout,
    /// The TLS handshake did not finish within `handshake_timeout`.
    HandshakeTimeout,
    /// The TLS handshake failed (bad ClientHello, untrusted client certificate, ...).
    HandshakeFailed,
    /// A frame or line over its cap.
    TooLarge,
    /// Bytes that are not a valid TLS stream or message.
    ProtocolError,
    /// Replies queued beyond `max_write_buffer_bytes` for a client that does not read.
    WriteOverflow,
    /// The client key was banned while the connection was open (authentication failures
    /// or the admin API).
    Banned,
    /// A reload put the client's address in `access.deny` (or out of `access.allow`).
    Denied,
    /// A reload removed the token the connection authenticated with, or its client
    /// certificate no longer verifies (client CA or CRL changed).
    Revoked,
    /// The connection reached `max_connection_lifetime`.
    Lifetime,
    /// The gateway is shutting down.
    Shutdown,
    /// A socket error.
    IoError,
    /// The upstream closed the relayed connection (what it sent was delivered first).
    UpstreamClosed,
    /// No upstream could be reached, or the upstream failed or broke the protocol.
    UpstreamError,
}

impl CloseReason {
    /// Every value, for pre-registering metric series.
    pub const ALL: [CloseReason; 17] = [
        CloseReason::ClientClose,
        CloseReason::Quit,
        CloseReason::IdleTimeout,
        CloseReason::AuthTimeout,
        CloseReason::HandshakeTimeout,
        CloseReason::HandshakeFailed,
        CloseReason::TooLarge,
        CloseReason::ProtocolError,
        CloseReason::WriteOverflow,
        CloseReason::Banned,
        CloseReason::Denied,
        CloseReason::Revoked,
        CloseReason::Lifetime,
        CloseReason::Shutdown,
        CloseReason::IoError,
        CloseReason::UpstreamClosed,
        CloseReason::UpstreamError,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::ClientClose => "client_close",
            CloseReason::Quit => "quit",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::AuthTimeout => "auth_timeout",
            CloseReason::HandshakeTimeout => "handshake_timeout",
            CloseReason::HandshakeFailed => "handshake_failed",
            CloseReason::TooLarge => "too_large",
            CloseReason::ProtocolError => "protocol_error",
            CloseReason::WriteOverflow => "write_overflow",
            CloseReason::Banned => "banned",
            CloseReason::Denied => "denied",
            CloseReason::Revoked => "revoked",
            CloseReason::Lifetime => "lifetime",
            CloseReason::Shutdown => "shutdown",
            CloseReason::IoError => "io_error",
            CloseReason::UpstreamClosed => "upstream_closed",
            CloseReason::UpstreamError => "upstream_error",
        }
    }
}

/// The `<CODE>` of an `ERR <CODE>` reply (SPEC section 2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    TooLarge,
    RateLimited,
    NoAuth,
    AuthFailed,
    UnknownCommand,
    BadRequest,
    ShuttingDown,
    /// No upstream server could be reached (SPEC section 6).
    UpstreamUnavailable,
}

impl ErrorCode {
    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::TooLarge => "TOO_LARGE",
            ErrorCode::RateLimited => "RATE_LIMITED",
            ErrorCode::NoAuth => "NOAUTH",
            ErrorCode::AuthFailed => "AUTH_FAILED",
            ErrorCode::UnknownCommand => "UNKNOWN_COMMAND",
            ErrorCode::BadRequest => "BAD_REQUEST",
            ErrorCode::ShuttingDown => "SHUTTING_DOWN",
            ErrorCode::UpstreamUnavailable => "UPSTREAM_UNAVAILABLE",
        }
    }
}

/// What went wrong with an upstream: the `reason` label of
/// `portcullis_upstream_errors_total` (SPEC section 8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UpstreamError {
    /// A connect was refused or failed.
    ConnectFailed,
    /// A connect took longer than `connect_timeout`.
    ConnectTimeout,
    /// No server could take the connection: the client got `ERR UPSTREAM_UNAVAILABLE`.
    Unavailable,
    /// An upstream message announced more than `max_reply_bytes`.
    ReplyTooLarge,
    /// An upstream message that cannot be delivered in the client's framing.
    UpstreamProtocol,
    /// The upstream connection failed mid-way (reset, broken pipe).
    Reset,
}

impl UpstreamError {
    /// Every value, for pre-registering metric series.
    pub const ALL: [UpstreamError; 6] = [
        UpstreamError::ConnectFailed,
        UpstreamError::ConnectTimeout,
        UpstreamError::Unavailable,
        UpstreamError::ReplyTooLarge,
        UpstreamError::UpstreamProtocol,
        UpstreamError::Reset,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamError::ConnectFailed => "connect_failed",
            UpstreamError::ConnectTimeout => "connect_timeout",
            UpstreamError::Unavailable => "unavailable",
            UpstreamError::ReplyTooLarge => "reply_too_large",
            UpstreamError::UpstreamProtocol => "upstream_protocol",
            UpstreamError::Reset => "reset",
        }
    }
}

/// A security event: every refusal and every sign of abuse. The `kind` label of
/// `portcullis_security_events_total` and of the rate-limited WARN log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SecurityEvent {
    /// A connection refused before TLS, for this reason.
    Rejected(RejectReason),
    OversizeFrame,
    OversizeLine,
    AuthFailed,
    HandshakeTimeout,
    HandshakeFailed,
    UntrustedProxyHeader,
    CommandRateLimited,
    WriteOverflow,
}

impl SecurityEvent {
    /// The number of kinds: the rejection reasons plus the eight others.
    pub const COUNT: usize = RejectReason::ALL.len() + 8;

    /// Every kind, for pre-registering metric series.
    pub fn all() -> impl Iterator<Item = SecurityEvent> {
        RejectReason::ALL
            .into_iter()
            .map(SecurityEvent::Rejected)
            .chain([
                SecurityEvent::OversizeFrame,
                SecurityEvent::OversizeLine,
                SecurityEvent::AuthFailed,
                SecurityEvent::HandshakeTimeout,
                SecurityEvent::HandshakeFailed,
                SecurityEvent::UntrustedProxyHeader,
                SecurityEvent::CommandRateLimited,
                SecurityEvent::WriteOverflow,
            ])
    }

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            SecurityEvent::Rejected(reason) => reason.as_str(),
            SecurityEvent::OversizeFrame => "oversize_frame",
            SecurityEvent::OversizeLine => "oversize_line",
            SecurityEvent::AuthFailed => "auth_failed",
            SecurityEvent::HandshakeTimeout => "handshake_timeout",
            SecurityEvent::HandshakeFailed => "handshake_failed",
            SecurityEvent::UntrustedProxyHeader => "untrusted_proxy_header",
            SecurityEvent::CommandRateLimited => "command_rate_limited",
            SecurityEvent::WriteOverflow => "write_overflow",
        }
    }

    /// A dense index in `0..COUNT`, for per-kind state.
    pub fn index(self) -> usize {
        match self {
            SecurityEvent::Rejected(reason) => reason as usize,
            SecurityEvent::OversizeFrame => RejectReason::ALL.len(),
            SecurityEvent::OversizeLine => RejectReason::ALL.len() + 1,
            SecurityEvent::AuthFailed => RejectReason::ALL.len() + 2,
            SecurityEvent::HandshakeTimeout => RejectReason::ALL.len() + 3,
            SecurityEvent::HandshakeFailed => RejectReason::ALL.len() + 4,
            SecurityEvent::UntrustedProxyHeader => RejectReason::ALL.len() + 5,
            SecurityEvent::CommandRateLimited => RejectReason::ALL.len() + 6,
            SecurityEvent::WriteOverflow => RejectReason::ALL.len() + 7,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn security_event_indexes_are_dense_and_unique() {
        let mut seen = [false; SecurityEvent::COUNT];
        for event in SecurityEvent::all() {
            assert!(!seen[event.index()], "{event:?}");
            seen[event.index()] = true;
        }
        assert!(seen.iter().all(|&s| s));
    }
}

/// How a connection authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    Token,
    Mtls,
}

impl AuthMethod {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::Token => "token",
            AuthMethod::Mtls => "mtls",
        }
    }
}

/// The verbs, a closed set: also the `command` metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Ping,
    Echo,
    Auth,
    Whoami,
    Help,
    Quit,
    Unknown,
}

impl Verb {
    /// The verbs `HELP` lists, in its order.
    pub const KNOWN: [Verb; 6] = [
        Verb::Ping,
        Verb::Echo,
        Verb::Auth,
        Verb::Whoami,
        Verb::Help,
        Verb::Quit,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Ping => "ping",
            Verb::Echo => "echo",
            Verb::Auth => "auth",
            Verb::Whoami => "whoami",
            Verb::Help => "help",
            Verb::Quit => "quit",
            Verb::Unknown => "unknown",
        }
    }

    pub(crate) fn wire_name(self) -> &'static str {
        match self {
            Verb::Ping => "PING",
            Verb::Echo => "ECHO",
            Verb::Auth => "AUTH",
            Verb::Whoami => "WHOAMI",
            Verb::Help => "HELP",
            Verb::Quit => "QUIT",
            Verb::Unknown => "",
        }
    }

    pub(crate) fn from_bytes(verb: &[u8]) -> Verb {
        Verb::KNOWN
            .into_iter()
            .find(|v| v.wire_name().as_bytes().eq_ignore_ascii_case(verb))
            .unwrap_or(Verb::Unknown)
    }

    /// May this verb be served before the connection is authenticated?
    pub(crate) fn allowed_before_auth(self) -> bool {
        matches!(self, Verb::Ping | Verb::Auth | Verb::Help | Verb::Quit)
    }
}

/// Which exchange with Redis failed, for `portcullis_cluster_errors_total{op}` (SPEC 8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClusterOp {
    /// Publishing local counts (and learning the totals, in the same script call).
    Publish,
    /// Reading shared state: bans, ticket keys.
    Fetch,
    /// Opening the connection to Redis.
    Connect,
}

impl ClusterOp {
    pub const ALL: [ClusterOp; 3] = [ClusterOp::Publish, ClusterOp::Fetch, ClusterOp::Connect];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ClusterOp::Publish => "publish",
            ClusterOp::Fetch => "fetch",
            ClusterOp::Connect => "connect",
        }
    }
}
