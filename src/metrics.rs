//! Every metric name and label set, in one place (SPEC section 5).
//!
//! The rest of the crate reports events through these functions and never names a metric
//! itself, so label values can only come from the closed enums of [`crate::error`] and
//! friends: never an address, a token or an identity.

use std::time::Duration;

use metrics::{counter, gauge, histogram};

use crate::auth::AuthMethod;
use crate::error::{CloseReason, RejectReason};

pub const CONNECTIONS_ACCEPTED: &str = "portcullis_connections_accepted_total";
pub const CONNECTIONS_REJECTED: &str = "portcullis_connections_rejected_total";
pub const CONNECTIONS_ACTIVE: &str = "portcullis_connections_active";
pub const CONNECTIONS_CLOSED: &str = "portcullis_connections_closed_total";
pub const HANDSHAKE_DURATION: &str = "portcullis_tls_handshake_duration_seconds";
pub const HANDSHAKES: &str = "portcullis_tls_handshakes_total";
pub const SECURITY_EVENTS: &str = "portcullis_security_events_total";
pub const AUTH: &str = "portcullis_auth_total";
pub const COMMAND_DURATION: &str = "portcullis_command_duration_seconds";
pub const COMMANDS: &str = "portcullis_commands_total";
pub const FRAMES: &str = "portcullis_frames_total";
pub const BYTES: &str = "portcullis_bytes_total";

/// The result of a TLS handshake, as labelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeResult {
    Ok,
    Failed,
    Timeout,
}

impl HandshakeResult {
    fn as_str(self) -> &'static str {
        match self {
            HandshakeResult::Ok => "ok",
            HandshakeResult::Failed => "failed",
            HandshakeResult::Timeout => "timeout",
        }
    }
}

/// A TCP connection was accepted (whether or not it is then refused).
pub fn connection_accepted() {
    counter!(CONNECTIONS_ACCEPTED).increment(1);
}

/// A connection was refused before TLS.
pub fn connection_rejected(reason: RejectReason) {
    counter!(CONNECTIONS_REJECTED, "reason" => reason.as_str()).increment(1);
}

/// An admitted connection ended.
pub fn connection_closed(reason: CloseReason) {
    counter!(CONNECTIONS_CLOSED, "reason" => reason.as_str()).increment(1);
}

/// The number of connections currently held, set from the exact count kept by the server.
pub fn connections_active(count: usize) {
    gauge!(CONNECTIONS_ACTIVE).set(count as f64);
}

/// A TLS handshake ended; `version` is `TLSv1_2`, `TLSv1_3` or `none`.
pub fn handshake(result: HandshakeResult, version: &'static str, took: Duration) {
    counter!(HANDSHAKES, "result" => result.as_str(), "version" => version).increment(1);
    histogram!(HANDSHAKE_DURATION).record(took.as_secs_f64());
}

/// An authentication attempt.
pub fn auth(method: AuthMethod, ok: bool) {
    let result = if ok { "ok" } else { "failed" };
    counter!(AUTH, "method" => method.as_str(), "result" => result).increment(1);
}

/// One command was served; `command` is a verb from the closed set of `command::Verb`.
pub fn command(command: &'static str, ok: bool, took: Duration) {
    let result = if ok { "ok" } else { "error" };
    counter!(COMMANDS, "command" => command, "result" => result).increment(1);
    histogram!(COMMAND_DURATION, "command" => command).record(took.as_secs_f64());
}

/// Messages and plaintext bytes received (`in`) or sent (`out`).
pub fn traffic(direction: &'static str, messages: u64, bytes: u64) {
    counter!(FRAMES, "direction" => direction).increment(messages);
    counter!(BYTES, "direction" => direction).increment(bytes);
}
