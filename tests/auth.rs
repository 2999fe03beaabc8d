//! Authentication (mTLS and tokens) and the auth and idle timeouts.

mod support;

use std::time::{Duration, Instant};

use portcullis::config::AuthMode;
use support::*;

#[tokio::test]
async fn trusted_client_certificate_authenticates_without_auth() {
    let certs = TestCerts::new();
    let server = TestServer::start(test_config(&certs)).await;
    let mut c = Client::connect_with(server.addr, &certs, with_cert(&certs, true))
        .await
        .unwrap();
    assert_eq!(c.request_line("ECHO via mtls").await, "OK via mtls");
    let whoami = c.request_line("WHOAMI").await;
    assert!(
        whoami.starts_with("OK identity=dev-client ip=127.0.0.1 "),
        "{whoami}"
    );
}

#[tokio::test]
async fn untrusted_client_certificate_fails_the_handshake() {
    let certs = TestCerts::new();
    let server = TestServer::start(test_config(&certs)).await;
    assert!(
        refused(Client::connect_with(server.addr, &certs, with_cert(&certs, false)).await).await
    );
    // The gateway is still serving.
    let mut ok = Client::connect(server.addr, &certs).await;
    assert_eq!(ok.request_line("PING").await, "OK PONG");
}

#[tokio::test]
async fn require_client_cert_refuses_a_client_without_one() {
    let certs = TestCerts::new();
    let mut config = test_config(&certs);
    config.auth.require_client_cert = true;
    let server = TestServer::start(config).await;
    assert!(
        refused(Client::connect_with(server.addr, &certs, ClientOptions::default()).await).await
    );
    let mut c = Client::connect_with(server.addr, &certs, with_cert(&certs, true))
        .await
        .unwrap();
    assert_eq!(c.request_line("ECHO ok").await, "OK ok");
}

#[tokio::test]
async fn token_mode_ignores_certificates_and_mtls_mode_refuses_tokens() {
    let certs = TestCerts::new();
    let mut config = test_config(&certs);
    config.auth.mode = AuthMode::Token;
    let server = TestServer::start(config).await;
    let mut c = Client::connect_with(server.addr, &certs, with_cert(&certs, true))
        .await
        .unwrap();
    assert!(c.request_line("ECHO x").await.starts_with("ERR NOAUTH"));
    assert_eq!(
        c.request_line(&format!("AUTH {ALICE_TOKEN}")).await,
        "OK alice"
    );

    let mut config = test_config(&certs);
    config.auth.mode = AuthMode::Mtls;
    let server = TestServer::start(config).await;
    let mut c = Client::connect(server.addr, &certs).await;
    assert_eq!(
        c.request_line(&format!("AUTH {ALICE_TOKEN}")).await,
        "ERR AUTH_FAILED"
    );
    assert!(c.request_line("ECHO x").await.starts_with("ERR NOAUTH"));
}

#[tokio::test]
async fn tokens_noauth_then_failed_then_ok() {
    let certs = TestCerts::new();
    let server = TestServer::start(test_config(&certs)).await;
    let mut c = Client::connect(server.addr, &certs).await;
    assert!(c.request_line("ECHO a").await.starts_with("ERR NOAUTH"));
    assert_eq!(
        c.request_line("AUTH alice-secret-tokeN").await,
        "ERR AUTH_FAILED"
    );
    assert_eq!(c.request_line("AUTH").await, "ERR AUTH_FAILED");
    assert!(c.request_line("ECHO a").await.starts_with("ERR NOAUTH"));
    assert_eq!(
        c.request_line(&format!("auth {ALICE_TOKEN}")).await,
        "OK alice"
    );
    assert_eq!(c.request_line("ECHO a").await, "OK a");
}

#[tokio::test]
async fn idle_timeout_closes_a_quiet_connection() {
    let certs = TestCerts::new();
    let mut config = test_config(&certs);
    config.limits.idle_timeout = Duration::from_millis(400);
    let server = TestServer::start(config).await;
    let mut c = Client::authed(server.addr, &certs).await;
    // Activity keeps it open past the timeout...
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(c.request_line("PING").await, "OK PONG");
    }
    // ...silence does not.
    let quiet = Instant::now();
    c.expect_closed().await;
    let waited = quiet.elapsed();
    assert!(
        waited >= Duration::from_millis(300),
        "closed too early: {waited:?}"
    );

    // Half a frame is not activity.
    let mut half = Client::connect(server.addr, &certs).await;
    half.send(&[0, 0, 0, 10, b'E']).await;
    half.expect_closed().await;
}

#[tokio::test]
async fn auth_timeout_closes_an_unauthenticated_connection_even_if_active() {
    let certs = TestCerts::new();
    let mut config = test_config(&certs);
    config.auth.auth_timeout = Duration::from_millis(400);
    let server = TestServer::start(config).await;
    let mut c = Client::connect(server.addr, &certs).await;
    let started = Instant::now();
    let mut closed = false;
    while started.elapsed() < Duration::from_secs(3) {
        c.send_line("PING").await;
        let mut buf = [0u8; 64];
        use tokio::io::AsyncReadExt;
        match tokio::time::timeout(Duration::from_secs(2), c.stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(_)) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(_) => panic!("no reply and no close"),
        }
    }
    assert!(
        closed,
        "an unauthenticated connection outlived auth_timeout"
    );
    assert!(started.elapsed() >= Duration::from_millis(350));

    // An authenticated one is not subject to it.
    let mut a = Client::authed(server.addr, &certs).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(a.request_line("PING").await, "OK PONG");
}

#[tokio::test]
async fn handshake_timeout_closes_a_silent_or_stalled_client() {
    let certs = TestCerts::new();
    let mut config = test_config(&certs);
    config.limits.handshake_timeout = Duration::from_millis(300);
    let server = TestServer::start(config).await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Half a ClientHello record header, then nothing.
    let mut tcp = tcp_connect(server.addr, None).await.unwrap();
    tcp.write_all(&[0x16, 0x03, 0x01, 0x02]).await.unwrap();
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_secs(3), tcp.read(&mut buf)).await;
    assert!(
        matches!(r, Ok(Ok(0)) | Ok(Err(_))),
        "stalled handshake not closed: {r:?}"
    );
    // Nothing at all.
    let mut silent = tcp_connect(server.addr, None).await.unwrap();
    let r = tokio::time::timeout(Duration::from_secs(3), silent.read(&mut buf)).await;
    assert!(
        matches!(r, Ok(Ok(0)) | Ok(Err(_))),
        "silent client not closed: {r:?}"
    );
}
