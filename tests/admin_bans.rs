//! The admin ban API (SPEC section 9), driven with curl against the real binary: bearer
//! token required (404 without a configured token, 401 without the right one), a posted
//! ban closes open connections from its network and refuses new ones, a lifted ban lets
//! them in again, and the list and bodies are bounded.

mod support;

use support::admin_api::*;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_endpoints_need_a_configured_token_and_the_right_bearer() {
    let certs = TestCerts::new();
    let off = Process::gateway(&certs, "");
    let (status, _) = curl(off.admin, "/bans", &["-H", &bearer(ADMIN_TOKEN)]).await;
    assert_eq!(
        status, 404,
        "no admin.token_sha256: the endpoints do not exist"
    );
    drop(off);

    let on = Process::gateway(&certs, &admin_section(16));
    assert_eq!(curl(on.admin, "/bans", &[]).await.0, 401);
    assert_eq!(
        curl(on.admin, "/bans", &["-H", &bearer("guess")]).await.0,
        401
    );
    let (status, _) = curl(
        on.admin,
        "/bans",
        &[
            "-X",
            "POST",
            "--data-binary",
            r#"{"cidr": "127.0.0.9/32", "duration": "1h"}"#,
        ],
    )
    .await;
    assert_eq!(status, 401, "a write without the token changes nothing");
    let (status, body) = curl(on.admin, "/bans", &["-H", &bearer(ADMIN_TOKEN)]).await;
    assert_eq!((status, body.trim()), (200, "[]"));
    assert!(!refused_from(on.addr, &certs, 9).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ban_closes_open_connections_refuses_new_ones_and_can_be_lifted() {
    let certs = TestCerts::new();
    let gateway = Process::gateway(&certs, &admin_section(16));
    let mut banned = Client::connect_with(gateway.addr, &certs, from(21))
        .await
        .unwrap();
    assert_eq!(banned.request_line("PING").await, "OK PONG");
    let mut other = Client::connect_with(gateway.addr, &certs, from(22))
        .await
        .unwrap();
    assert_eq!(other.request_line("PING").await, "OK PONG");

    let (status, _) = post_ban(
        gateway.admin,
        r#"{"cidr": "127.0.0.21/32", "duration": "1h"}"#,
    )
    .await;
    assert_eq!(status, 201);
    banned.expect_close_notify().await;
    assert!(refused_from(gateway.addr, &certs, 21).await);
    assert_eq!(
        other.request_line("PING").await,
        "OK PONG",
        "others untouched"
    );

    let (status, body) = curl(gateway.admin, "/bans", &["-H", &bearer(ADMIN_TOKEN)]).await;
    assert_eq!(status, 200);
    assert!(body.contains(r#""key":"127.0.0.21/32""#), "{body}");
    assert!(body.contains(r#""reason":"admin""#), "{body}");
    assert!(body.contains(r#""until":"20"#), "an RFC 3339 time: {body}");
    let stderr = gateway.stderr();
    assert!(
        stderr.contains("ban added") && stderr.contains(CURL_SOURCE),
        "each write is logged with its source: {stderr}"
    );

    let auth = bearer(ADMIN_TOKEN);
    let lift = ["-X", "DELETE", "-H", auth.as_str()];
    assert_eq!(
        curl(gateway.admin, "/bans/127.0.0.21/32", &lift).await.0,
        200
    );
    assert!(!refused_from(gateway.addr, &certs, 21).await, "lifted");
    assert_eq!(
        curl(gateway.admin, "/bans/127.0.0.21/32", &lift).await.0,
        404
    );

    let scrape = wait_for_sample(
        gateway.admin,
        "portcullis_connections_closed_total{reason=\"banned\"}",
        1.0,
    )
    .await;
    assert!(
        sample(
            &scrape,
            "portcullis_connections_rejected_total{reason=\"banned\"}"
        ) >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ban_list_and_request_bodies_are_bounded() {
    let certs = TestCerts::new();
    let gateway = Process::gateway(&certs, &admin_section(2));
    for cidr in ["198.51.100.0/24", "203.0.113.0/24"] {
        let body = format!(r#"{{"cidr": "{cidr}", "duration": "10m"}}"#);
        assert_eq!(post_ban(gateway.admin, &body).await.0, 201);
    }
    let (status, body) = post_ban(
        gateway.admin,
        r#"{"cidr": "192.0.2.0/24", "duration": "10m"}"#,
    )
    .await;
    assert_eq!(status, 507, "{body}");
    assert!(body.contains("admin.max_bans"), "{body}");

    let huge = format!(
        r#"{{"cidr": "192.0.2.0/24", "duration": "10m", "pad": "{}"}}"#,
        "x".repeat(4096)
    );
    assert_eq!(post_ban(gateway.admin, &huge).await.0, 413);
    let (status, body) = post_ban(gateway.admin, r#"{"cidr": "nope", "duration": "1h"}"#).await;
    assert_eq!(status, 400, "{body}");
    let (status, _) = post_ban(
        gateway.admin,
        r#"{"cidr": "10.0.0.0/8", "duration": "9999d"}"#,
    )
    .await;
    assert_eq!(status, 400, "durations above 365 days are refused");
}
