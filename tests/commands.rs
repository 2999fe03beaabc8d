//! Every command in both framings, over real TLS on loopback.

mod support;

use std::time::Duration;

use support::*;

#[tokio::test]
async fn text_commands() {
    let certs = TestCerts::new();
    let server = TestServer::start(test_config(&certs)).await;
    let mut c = Client::connect(server.addr, &certs).await;
    assert_eq!(c.request_line("PING").await, "OK PONG");
    assert_eq!(c.request_line("ping").await, "OK PONG");
    assert_eq!(
        c.request_line("HELP").await,
        "OK PING ECHO AUTH WHOAMI HELP QUIT"
    );
    assert!(c.request_line("ECHO hi").await.starts_with("ERR NOAUTH"));
    assert!(c.request_line("WHOAMI").await.starts_with("ERR NOAUTH"));
    assert!(c.request_line("BOGUS").await.starts_with("ERR NOAUTH"));
    assert_eq!(c.request_line("AUTH wrong").await, "ERR AUTH_FAILED");
    assert_eq!(
        c.request_line(&format!("AUTH {ALICE_TOKEN}")).await,
        "OK alice"
    );
    assert_eq!(c.request_line("ECHO hello world").await, "OK hello world");
    assert_eq!(
        c.request_line("ECHO   spaces  kept ").await,
        "OK   spaces  kept "
    );
    assert!(c.request_line("ECHO").await.starts_with("ERR BAD_REQUEST"));
    assert!(c
        .request_line("BOGUS")
        .await
        .starts_with("ERR UNKNOWN_COMMAND"));
    let whoami = c.request_line("WHOAMI").await;
    assert!(
        whoami.starts_with("OK identity=alice ip=127.0.0.1 tls=TLSv1_3 cipher=TLS13_"),
        "{whoami}"
    );
    assert!(whoami.ends_with(" framing=text"), "{whoami}");
    // CRLF line endings from terminals, and empty lines, are fine.
    c.send(b"\r\n\nPING\r\n").await;
    assert_eq!(c.read_line().await, "OK PONG");
    assert_eq!(c.request_line("QUIT").await, "OK BYE");
    c.expect_closed().await;
}

#[tokio::test]
async fn binary_commands() {
    let certs = TestCerts::new();
    let server = TestServer::start(test_config(&certs)).await;
    let mut c = Client::connect(server.addr, &certs).await;
    assert_eq!(c.request_frame(b"PING").await, b"OK PONG");
    assert!(c.request_frame(b"ECHO x").await.starts_with(b"ERR NOAUTH"));
    assert_eq!(c.request_frame(b"AUTH nope").await, b"ERR AUTH_FAILED");
    assert_eq!(
        c.request_frame(format!("AUTH {ALICE_TOKEN}").as_bytes())
            .await,
        b"OK alice"
    );
    assert_eq!(
        c.request_frame(b"HELP").await,
        b"OK PING ECHO AUTH WHOAMI HELP QUIT"
    );
    let payload = b"ECHO a\0b\nc\xff\r\n\0";
    assert_eq!(c.request_frame(payload).await, b"OK a\0b\nc\xff\r\n\0");
    assert!(c
        .request_frame(b"ECHO")
        .await
        .starts_with(b"ERR BAD_REQUEST"));
    assert!(c
        .request_frame(b"NOPE")
        .await
        .starts_with(b"ERR UNKNOWN_COMMAND"));
    let whoami = String::from_utf8(c.request_frame(b"WHOAMI").await).unwrap();
    assert!(
        whoami.starts_with("OK identity=alice ip=127.0.0.1 tls=TLSv1_3"),
        "{whoami}"
    );
    assert!(whoami.ends_with(" framing=binary"), "{whoami}");
    // A heartbeat gets no reply: the next reply is the PING's.
    c.send_frame(b"").await;
    assert_eq!(c.request_frame(b"PING").await, b"OK PONG");
    assert_eq!(c.request_frame(b"QUIT").await, b"OK BYE");
    c.expect_closed().await;
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let certs = TestCerts::new();
    let server = TestServer::start(test_config(&certs)).await;
    let mut c = Client::authed(server.addr, &certs).await;
    c.send(b"ECHO 1\nPING\nECHO 2\nBOGUS\nECHO 3\n").await;
    for expected in ["OK 1", "OK PONG", "OK 2"] {
        assert_eq!(c.read_line().await, expected);
    }
    assert!(c.read_line().await.starts_with("ERR UNKNOWN_COMMAND"));
    assert_eq!(c.read_line().await, "OK 3");

    let mut b = Client::connect(server.addr, &certs).await;
    let mut batch = Vec::new();
    for payload in [
        format!("AUTH {ALICE_TOKEN}").as_bytes(),
        b"ECHO \x00\x01",
        b"",
        b"PING",
    ] {
        batch.extend_from_slice(&frame(payload));
    }
    b.send(&batch).await;
    assert_eq!(b.read_frame().await, b"OK alice");
    assert_eq!(b.read_frame().await, b"OK \x00\x01");
    assert_eq!(b.read_frame().await, b"OK PONG");
}

#[tokio::test]
async fn requests_delivered_one_byte_at_a_time() {
    let certs = TestCerts::new();
    let server = TestServer::start(test_config(&certs)).await;
    let mut c = Client::connect(server.addr, &certs).await;
    for byte in format!("AUTH {ALICE_TOKEN}\nECHO slow\n").bytes() {
        c.send(&[byte]).await;
    }
    assert_eq!(c.read_line().await, "OK alice");
    assert_eq!(c.read_line().await, "OK slow");

    let mut b = Client::connect(server.addr, &certs).await;
    for byte in frame(b"ECHO \xff\n").iter().chain(frame(b"PING").iter()) {
        b.send(&[*byte]).await;
    }
    assert!(b.read_frame().await.starts_with(b"ERR NOAUTH"));
    assert_eq!(b.read_frame().await, b"OK PONG");
}

#[tokio::test]
async fn tls12_is_served_and_reported() {
    let certs = TestCerts::new();
    let server = TestServer::start(test_config(&certs)).await;
    let options = ClientOptions {
        tls12_only: true,
        ..Default::default()
    };
    let mut c = Client::connect_with(server.addr, &certs, options.clone())
        .await
        .unwrap();
    c.request_line(&format!("AUTH {ALICE_TOKEN}")).await;
    let whoami = c.request_line("WHOAMI").await;
    assert!(
        whoami.contains(" tls=TLSv1_2 cipher=TLS_ECDHE_ECDSA_WITH_"),
        "{whoami}"
    );

    let mut config = test_config(&certs);
    config.tls.min_version = portcullis::config::TlsVersion::V1_3;
    let strict = TestServer::start(config).await;
    let refused = match Client::connect_with(strict.addr, &certs, options).await {
        Err(_) => true,
        Ok(mut c) => c.is_closed().await,
    };
    assert!(
        refused,
        "a TLS 1.2 client must be refused when min_version = 1.3"
    );
}

#[tokio::test]
async fn mode_none_serves_anonymously() {
    let certs = TestCerts::new();
    let mut config = test_config(&certs);
    config.auth.mode = portcullis::config::AuthMode::None;
    let server = TestServer::start(config).await;
    let mut c = Client::connect(server.addr, &certs).await;
    assert_eq!(c.request_line("ECHO free").await, "OK free");
    assert!(c
        .request_line("WHOAMI")
        .await
        .starts_with("OK identity=anonymous ip=127.0.0.1 "));
}

#[tokio::test]
async fn alpn_is_negotiated_from_config() {
    let certs = TestCerts::new();
    let mut config = test_config(&certs);
    config.tls.alpn = vec!["portcullis/1".into()];
    let server = TestServer::start(config).await;
    let mut client_config =
        (*client_config(&certs.paths.ca_cert, &ClientOptions::default())).clone();
    client_config.alpn_protocols = vec![b"portcullis/1".to_vec()];
    let tcp = tcp_connect(server.addr, None).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(client_config));
    let tls = tokio::time::timeout(
        Duration::from_secs(5),
        connector.connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        ),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"portcullis/1"[..]));
}
