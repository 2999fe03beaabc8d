//! The TLS stage of a connection: wait for the first byte, then the rustls handshake, all
//! within `handshake_timeout`; a verified client certificate becomes a principal.

use std::net::IpAddr;

use rustls::ServerConnection;
use tokio::time::{timeout_at, Instant};
use tokio_rustls::server::TlsStream;

use crate::auth::{certificate_identity, AuthMethod, Principal};
use crate::config::AuthMode;
use crate::deadline;
use crate::error::{CloseReason, SecurityEvent};
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

/// Waits for the first byte (a peer that closes before sending one — a balancer's TCP health
/// check — is closed quietly), then runs the TLS handshake, all within `handshake_timeout`.
/// A verified client certificate yields a principal, unless `auth.mode` is `token`.
pub async fn handshake(
    stream: Rewind,
    ip: IpAddr,
    gateway: &Gateway,
) -> Result<(TlsStream<Rewind>, Option<Principal>), CloseReason> {
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
        _ = gateway.shutdown.force.cancelled() => return Err(CloseReason::Shutdown),
    };
    match first {
        Ok(Ok(0)) => return Err(CloseReason::ClientClose),
        Ok(Ok(n)) if proxy_protocol::looks_like_header(&first_bytes[..n]) => {
            metrics::security_event(
                SecurityEvent::UntrustedProxyHeader,
                ip,
                "PROXY header from an untrusted peer",
            );
            return Err(CloseReason::ProtocolError);
        }
        Ok(Ok(_)) => {}
        Ok(Err(_)) => return Err(CloseReason::IoError),
        Err(_) => return Err(timed_out()),
    }
    let accepted = tokio::select! {
        r = timeout_at(deadline, gateway.tls.acceptor().accept(stream)) => r,
        _ = gateway.shutdown.force.cancelled() => return Err(CloseReason::Shutdown),
    };
    let tls = match accepted {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            metrics::handshake(HandshakeResult::Failed, "none", started.elapsed());
            metrics::security_event(SecurityEvent::HandshakeFailed, ip, "TLS handshake failed");
            tracing::debug!(%ip, error = %e, "TLS handshake failed");
            return Err(CloseReason::HandshakeFailed);
        }
        Err(_) => return Err(timed_out()),
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
