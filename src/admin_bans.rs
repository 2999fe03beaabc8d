//! The admin write endpoints, for an operator under attack (SPEC section 9):
//! `GET /bans`, `POST /bans` (`{"cidr": "203.0.113.0/24", "duration": "1h"}`) and
//! `DELETE /bans/<cidr or address>`.
//!
//! They answer only when `admin.token_sha256` is set (404 otherwise; read per request, so a
//! reload turns them on or off), and only to a request carrying `Authorization: Bearer
//! <token>` whose SHA-256 matches, compared in constant time (401 otherwise). A ban refuses
//! new connections from its network and closes the open ones (`reason="banned"`; in
//! cluster mode once Redis has taken it, or within [`crate::cluster::admin::CONFIRM_WAIT`],
//! so a ban the cluster refuses closes nothing); every authorized write is logged with its
//! source address and its outcome, refusals (400, 404, 507) included. In cluster mode a change holds here at once and
//! is shared with every replica (see [`crate::cluster::admin`]); the response and the log
//! line say whether Redis confirmed it. Bounded: at most `admin.max_bans` bans, request
//! bodies of at most [`MAX_BODY_BYTES`], listings of at most [`MAX_LISTED`] bans.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::Router;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::admission::AdminRefusal;
use crate::bans::parse_net;
use crate::cluster::admin::Sharing;
use crate::config::MAX_DURATION;
use crate::gateway::Gateway;

/// The largest request body read: a ban request is a few dozen bytes.
pub const MAX_BODY_BYTES: usize = 1024;
/// The most bans one `GET /bans` lists (admin bans first, then keys banned after
/// authentication failures, which an attack can make numerous).
pub const MAX_LISTED: usize = 4096;

/// The `/bans` routes, sharing the admin listener.
pub fn router(gateway: Arc<Gateway>) -> Router {
    Router::new()
        .route("/bans", get(list).post(add))
        .route("/bans/{*key}", delete(lift))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(gateway)
}

/// A ban as listed.
#[derive(Serialize)]
struct BanView {
    key: String,
    /// RFC 3339, UTC, to the second.
    until: String,
    reason: &'static str,
}

/// A `POST /bans` body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BanRequest {
    /// A network (`203.0.113.0/24`) or a single address.
    cidr: String,
    /// A human duration (`"90s"`, `"1h"`), at most 365 days.
    duration: String,
}

async fn list(State(gateway): State<Arc<Gateway>>, headers: HeaderMap) -> Response {
    if let Err(refusal) = authorize(&gateway, &headers) {
        return refusal.into_response();
    }
    let now = (Instant::now(), SystemTime::now());
    let bans: Vec<BanView> = gateway
        .admission
        .bans(MAX_LISTED)
        .into_iter()
        .map(|ban| BanView {
            key: ban.key,
            until: wall_clock(ban.until, now),
            reason: ban.reason.as_str(),
        })
        .collect();
    json(StatusCode::OK, &bans)
}

async fn add(
    State(gateway): State<Arc<Gateway>>,
    ConnectInfo(source): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(refusal) = authorize(&gateway, &headers) {
        // Not logged above debug: anyone reaching the listener could flood the log.
        tracing::debug!(%source, "admin API: POST /bans without the admin token");
        return refusal.into_response();
    }
    let (net, duration) = match parse_request(&body) {
        Ok(parsed) => parsed,
        Err(message) => {
            tracing::warn!(%source, error = %message, "admin API: ban not added: bad request (400)");
            return text(StatusCode::BAD_REQUEST, message);
        }
    };
    let max = gateway.config().admin.max_bans;
    let shown = humantime::format_duration(duration);
    let ticket = match gateway.admission.ban_network(net, duration, max) {
        Ok(ticket) => ticket,
        Err(refusal) => {
            tracing::warn!(%source, %net, duration = %shown, error = %refusal, "admin API: ban not added");
            return refused(&refusal);
        }
    };
    // Open connections are told once the ban stands: one the cluster refuses (undone here)
    // closes none. In a task of its own, so that a client hanging up cannot skip it.
    let told = gateway.clone();
    let sharing = tokio::spawn(async move {
        let sharing = ticket.outcome().await;
        if sharing != Sharing::Refused {
            told.rules_changed.notify();
        }
        sharing
    })
    .await
    .unwrap_or(Sharing::Later);
    if sharing == Sharing::Refused {
        tracing::warn!(%source, %net, duration = %shown, "admin API: ban not added: refused by the cluster (admin.max_bans; 507)");
        return text(StatusCode::INSUFFICIENT_STORAGE, sharing.describe());
    }
    tracing::info!(%source, %net, duration = %shown, cluster = sharing.describe(), "admin API: ban added; open connections from it are closed");
    text(
        StatusCode::CREATED,
        format!("banned {net}{}", said(sharing)),
    )
}

async fn lift(
    State(gateway): State<Arc<Gateway>>,
    ConnectInfo(source): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(key): Path<String>,
) -> Response {
    if let Err(refusal) = authorize(&gateway, &headers) {
        tracing::debug!(%source, "admin API: DELETE /bans without the admin token");
        return refusal.into_response();
    }
    let max = gateway.config().admin.max_bans;
    let lifted = if key.contains('/') {
        parse_net(&key).map(|net| gateway.admission.lift_network_ban(net, max))
    } else {
        key.parse::<IpAddr>()
            .ok()
            .map(|ip| gateway.admission.lift_address_ban(ip, max))
    };
    let ticket = match lifted {
        Some(Ok(ticket)) => ticket,
        Some(Err(refusal)) => {
            tracing::warn!(%source, key = %key, error = %refusal, "admin API: ban not lifted");
            return refused(&refusal);
        }
        None => {
            tracing::warn!(%source, key = %key, "admin API: ban not lifted: not a CIDR or an address (400)");
            return text(StatusCode::BAD_REQUEST, "not a CIDR or an address");
        }
    };
    let sharing = ticket.outcome().await;
    tracing::info!(%source, key = %key, cluster = sharing.describe(), "admin API: ban lifted");
    text(StatusCode::OK, format!("lifted {key}{}", said(sharing)))
}

/// The answer to a change that was not made.
fn refused(refusal: &AdminRefusal) -> Response {
    let status = match refusal {
        AdminRefusal::NoSuchBan => StatusCode::NOT_FOUND,
        AdminRefusal::Full(_) | AdminRefusal::Backlog(_) => StatusCode::INSUFFICIENT_STORAGE,
    };
    text(status, refusal.to_string())
}

/// What the response adds about the cluster: nothing standalone.
fn said(sharing: Sharing) -> String {
    match sharing {
        Sharing::Standalone => String::new(),
        other => format!(" ({})", other.describe()),
    }
}

/// Why a request to the write endpoints is refused before it is looked at.
enum Refusal {
    /// No `admin.token_sha256` is configured: the endpoints do not exist.
    NotConfigured,
    /// The bearer token is missing or wrong.
    Unauthorized,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self {
            Refusal::NotConfigured => text(StatusCode::NOT_FOUND, "not found"),
            Refusal::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                "unauthorized\n",
            )
                .into_response(),
        }
    }
}

/// Whether the request carries the configured admin token.
fn authorize(gateway: &Gateway, headers: &HeaderMap) -> Result<(), Refusal> {
    let config = gateway.config();
    let mut expected = [0u8; 32];
    if hex::decode_to_slice(&config.admin.token_sha256, &mut expected).is_err() {
        return Err(Refusal::NotConfigured);
    }
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| {
            let (scheme, token) = value.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
    let matches = presented.is_some_and(|token| {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        bool::from(digest.ct_eq(&expected))
    });
    if matches {
        Ok(())
    } else {
        Err(Refusal::Unauthorized)
    }
}

/// The network and duration of a `POST /bans` body, or what is wrong with it.
fn parse_request(body: &[u8]) -> Result<(IpNet, Duration), String> {
    let request: BanRequest =
        serde_json::from_slice(body).map_err(|e| format!("bad JSON body: {e}"))?;
    let net = parse_net(&request.cidr)
        .ok_or_else(|| format!("cidr {:?} is not a network or an address", request.cidr))?;
    let duration = humantime::parse_duration(&request.duration)
        .map_err(|e| format!("duration {:?}: {e} (e.g. \"1h\")", request.duration))?;
    if !ban_duration_valid(duration) {
        return Err(format!(
            "duration {:?} must be above 0s and at most 365 days",
            request.duration
        ));
    }
    Ok((net, duration))
}

/// Whether an admin ban may last that long: above 0 and at most 365 days. The same rule
/// holds for a `POST /bans` body and for the cluster's list read from Redis.
pub fn ban_duration_valid(duration: Duration) -> bool {
    !duration.is_zero() && duration <= MAX_DURATION
}

/// The wall-clock time of a monotonic instant, given one `(Instant, SystemTime)` pair.
fn wall_clock(at: Instant, (mono, wall): (Instant, SystemTime)) -> String {
    let wall = wall + at.saturating_duration_since(mono);
    humantime::format_rfc3339_seconds(wall).to_string()
}

fn json(status: StatusCode, value: &impl Serialize) -> Response {
    match serde_json::to_string(value) {
        Ok(body) => (
            status,
            [(header::CONTENT_TYPE, "application/json")],
            body + "\n",
        )
            .into_response(),
        Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "cannot render"),
    }
}

fn text(status: StatusCode, message: impl Into<String>) -> Response {
    (status, message.into() + "\n").into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_strictly() {
        let (net, d) = parse_request(br#"{"cidr": "203.0.113.9/24", "duration": "1h"}"#).unwrap();
        assert_eq!(net.to_string(), "203.0.113.0/24");
        assert_eq!(d, Duration::from_secs(3600));
        let (net, _) = parse_request(br#"{"cidr": "2001:db8::1", "duration": "90s"}"#).unwrap();
        assert_eq!(net.to_string(), "2001:db8::1/128");
        let (net, _) =
            parse_request(br#"{"cidr": "::ffff:203.0.113.9/120", "duration": "1h"}"#).unwrap();
        assert_eq!(
            net.to_string(),
            "203.0.113.0/24",
            "IPv4-mapped: the IPv4 network"
        );
        for bad in [
            &br#"{"cidr": "nope", "duration": "1h"}"#[..],
            br#"{"cidr": "10.0.0.0/8", "duration": "0s"}"#,
            br#"{"cidr": "10.0.0.0/8", "duration": "400d"}"#,
            br#"{"cidr": "10.0.0.0/8", "duration": "soon"}"#,
            br#"{"cidr": "10.0.0.0/8"}"#,
            br#"{"cidr": "10.0.0.0/8", "duration": "1h", "extra": 1}"#,
            b"not json",
        ] {
            assert!(
                parse_request(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
