//! The TLS stage of a connection: wait for the first byte, take a handshake slot, then the
//! rustls handshake, all within `handshake_timeout`; a verified client certificate becomes
//! a principal.

use std::net::IpAddr;

use rustls::ServerConnection;
use tokio::time::{timeout_at, Instant};
use tokio_rustls::server::TlsStream;

use crate::admission::ClientGuard;
use crate::auth::{certificate_identity, AuthMethod, Principal};
use crate::config::AuthMode;
use crate::deadline;
use crate::error::{CloseReason, RejectReason, SecurityEvent};
use crate::gateway::Gateway;
use crate::metrics::{self, HandshakeResult};
use crate::proxy_protocol::{self, Rewind};

/// The negotiated version as labelled and shown by WHOAMI.
pub fn version_label(conn: &ServerConnection) -> &'static str {
    match conn.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1_3",
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1_2",
        _ => "none",
    }
}

/// Why a connection got no TLS session.
pub enum HandshakeError {
    /// The connection ended; counted as closed for this reason.
    Closed(CloseReason),
    /// Refused at its first byte (its key already has `max_handshakes_per_ip` handshakes in
    /// flight): the stream comes back so the caller can reset it and count the refusal.
    Refused(RejectReason, Rewind),
}

impl From<CloseReason> for HandshakeError {
    fn from(reason: CloseReason) -> Self {
        HandshakeError::Closed(reason)
    }
}

/// Waits for the first byte (a peer that closes before sending one — a balancer's TCP health
/// check — is closed quietly), takes a handshake slot (its key's at once, a global one
/// waited for), then runs the TLS handshake, all within `handshake_timeout`. A silent
/// connection holds no slot. A verified client certificate yields a principal, unless
/// `auth.mode` is `token`.
pub async fn handshake(
    stream: Rewind,
    ip: IpAddr,
    client: &ClientGuard,
    gateway: &Gateway,
) -> Result<(TlsStream<Rewind>, Option<Principal>), HandshakeError> {
    let started = Instant::now();
    let config = gateway.config();
    let deadline = deadline::from_now(config.limits.handshake_timeout);
    let timed_out = || {
        metrics::handshake(HandshakeResult::Timeout, "none", started.elapsed());
        metrics::security_event(
            SecurityEvent::HandshakeTimeout,
            ip,
            "TLS handshake not finished in time",
        );
        CloseReason::HandshakeTimeout
    };
    let mut first_bytes = [0u8; 6];
    let first = tokio::select! {
        r = timeout_at(deadline, stream.peek(&mut first_bytes)) => r,
        _ = gateway.shutdown.force.cancelled() => return Err(CloseReason::Shutdown.into()),
    };
    match first {
        Ok(Ok(0)) => return Err(CloseReason::ClientClose.into()),
        Ok(Ok(n)) if proxy_protocol::looks_like_header(&first_bytes[..n]) => {
            metrics::security_event(
                SecurityEvent::UntrustedProxyHeader,
                ip,
                "PROXY header from an untrusted peer",
            );
            return Err(CloseReason::ProtocolError.into());
        }
        Ok(Ok(_)) => {}
        Ok(Err(_)) => return Err(CloseReason::IoError.into()),
        Err(_) => return Err(timed_out().into()),
    }
    let slot = tokio::select! {
        r = timeout_at(deadline, gateway.admission.handshake_slot(client)) => r,
        _ = gateway.shutdown.force.cancelled() => return Err(CloseReason::Shutdown.into()),
    };
    // Held until the handshake ends, whichever way.
    let _slot = match slot {
        Ok(Ok(slot)) => slot,
        Ok(Err(reason)) => return Err(HandshakeError::Refused(reason, stream)),
        Err(_) => return Err(timed_out().into()),
    };
    let accepted = tokio::select! {
        r = timeout_at(deadline, gateway.tls.acceptor().accept(stream)) => r,
        _ = gateway.shutdown.force.cancelled() => return Err(CloseReason::Shutdown.into()),
    };
    let tls = match accepted {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            metrics::handshake(HandshakeResult::Failed, "none", started.elapsed());
            metrics::security_event(SecurityEvent::HandshakeFailed, ip, "TLS handshake failed");
            tracing::debug!(%ip, error = %e, "TLS handshake failed");
            return Err(CloseReason::HandshakeFailed.into());
        }
        Err(_) => return Err(timed_out().into()),
    };
    let (_, conn) = tls.get_ref();
    metrics::handshake(HandshakeResult::Ok, version_label(conn), started.elapsed());
    let principal = match config.auth.mode {
        AuthMode::Token => None,
        _ => mtls_principal(conn, ip)?,
    };
    Ok((tls, principal))
}

/// The principal of a verified client certificate, if the connection presented one. An
/// identity with control characters would inject lines into replies and logs: the
/// connection is closed and counted instead (`auth_total{method="mtls",result="failed"}`,
/// a `handshake_failed` security event).
fn mtls_principal(conn: &ServerConnection, ip: IpAddr) -> Result<Option<Principal>, CloseReason> {
    let Some(cert) = conn.peer_certificates().and_then(|chain| chain.first()) else {
        return Ok(None);
    };
    match certificate_identity(cert) {
        Ok(identity) => Ok(identity.map(|identity| {
            metrics::auth(AuthMethod::Mtls, true);
            Principal {
                identity,
                method: AuthMethod::Mtls,
                token_digest: None,
            }
        })),
        Err(unsafe_identity) => {
            metrics::auth(AuthMethod::Mtls, false);
            metrics::security_event(
                SecurityEvent::HandshakeFailed,
                ip,
                "client certificate identity holds control characters",
            );
            tracing::debug!(%ip, error = %unsafe_identity, "client certificate refused");
            Err(CloseReason::HandshakeFailed)
        }
    }
}
