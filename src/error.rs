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
    /// `max_handshakes_in_flight` handshakes are already running.
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
    /// The client key was banned while the connection was open.
    Banned,
    /// The gateway is shutting down.
    Shutdown,
    /// A socket error.
    IoError,
}

impl CloseReason {
    /// Every value, for pre-registering metric series.
    pub const ALL: [CloseReason; 12] = [
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
        CloseReason::Shutdown,
        CloseReason::IoError,
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
            CloseReason::Shutdown => "shutdown",
            CloseReason::IoError => "io_error",
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
        }
    }
}
