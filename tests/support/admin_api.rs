//! The admin ban API (SPEC 9) as an operator drives it: curl with a bearer token.

use std::net::SocketAddr;

use portcullis::auth::token_digest_hex;

pub const ADMIN_TOKEN: &str = "operator-secret";
/// Where curl connects from, so the log line can be checked to name it.
pub const CURL_SOURCE: &str = "127.0.0.30";

/// An `[admin]` section enabling the ban API with [`ADMIN_TOKEN`].
pub fn admin_section(max_bans: usize) -> String {
    format!(
        "[admin]\ntoken_sha256 = \"{}\"\nmax_bans = {max_bans}\n",
        token_digest_hex(ADMIN_TOKEN)
    )
}

/// Runs curl against the admin listener; returns the status and the body.
pub async fn curl(admin: SocketAddr, path: &str, args: &[&str]) -> (u16, String) {
    let url = format!("http://{admin}{path}");
    let mut command = std::process::Command::new("curl");
    command
        .args(["-sS", "--max-time", "5", "--interface", CURL_SOURCE])
        .args(["-w", "\n%{http_code}"])
        .args(args)
        .arg(url);
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .unwrap()
        .expect("curl runs (apt-get install curl)");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
    (status.trim().parse().unwrap_or(0), body.to_string())
}

pub fn bearer(token: &str) -> String {
    format!("Authorization: Bearer {token}")
}

/// `POST /bans` with `body`.
pub async fn post_ban(admin: SocketAddr, body: &str) -> (u16, String) {
    let auth = bearer(ADMIN_TOKEN);
    curl(
        admin,
        "/bans",
        &["-X", "POST", "-H", &auth, "--data-binary", body],
    )
    .await
}

/// `DELETE /bans/<key>`.
pub async fn delete_ban(admin: SocketAddr, key: &str) -> (u16, String) {
    let auth = bearer(ADMIN_TOKEN);
    let path = format!("/bans/{key}");
    curl(admin, &path, &["-X", "DELETE", "-H", &auth]).await
}

/// `GET /bans`.
pub async fn list_bans(admin: SocketAddr) -> (u16, String) {
    curl(admin, "/bans", &["-H", &bearer(ADMIN_TOKEN)]).await
}
