//! The upstream relay (SPEC section 6), end to end: the real gateway binary in front of a
//! test upstream on loopback, real TLS clients (token and mTLS, text and binary).

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::upstream::MockUpstream;
use support::{http_get, sample, Client, ClientOptions, Process, TestCerts, ALICE_TOKEN};

/// `[upstream]` for `servers`, passive health only (no check connections), plus `extra`.
fn upstream_config(servers: &[SocketAddr], extra: &str) -> String {
    let list: Vec<String> = servers.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "[upstream]\nservers = [{}]\nhealth_interval = \"0s\"\n{extra}",
        list.join(", ")
    )
}

fn mtls(certs: &TestCerts) -> ClientOptions {
    ClientOptions {
        identity: Some((
            certs.paths.client_cert.clone(),
            certs.paths.client_key.clone(),
        )),
        ..Default::default()
    }
}

fn scrape(gateway: &Process) -> String {
    http_get(gateway.admin, "/metrics").expect("scrape").1
}

/// The client's own address, as the upstream should see it.
fn client_addr(client: &Client) -> SocketAddr {
    client.stream.get_ref().0.local_addr().unwrap()
}

#[tokio::test]
async fn text_token_client_reaches_the_upstream_with_its_identity_after_auth_only() {
    let certs = TestCerts::new();
    let mut upstream = MockUpstream::start().await;
    let gateway = Process::gateway(&certs, &upstream_config(&[upstream.addr], ""));
    let mut client = Client::connect(gateway.addr, &certs).await;
    assert_eq!(client.request_line("PING").await, "OK PONG");
    assert_eq!(client.request_line("AUTH wrong").await, "ERR AUTH_FAILED");
    assert!(client.request_line("hello").await.starts_with("ERR NOAUTH"));
    assert_eq!(upstream.accepts(), 0, "no upstream connection before AUTH");

    assert_eq!(
        client.request_line(&format!("AUTH {ALICE_TOKEN}")).await,
        "OK alice"
    );
    let mut conn = upstream.next().await;
    let header = conn.read_header().await;
    assert!(!header.local);
    assert_eq!(header.source, Some(client_addr(&client)));
    assert_eq!(header.destination, Some(gateway.addr));
    assert_eq!(header.tlv_str(0xE0), "alice");
    assert_eq!(header.tlv_str(0xE1), "token");
    assert_eq!(header.tlv_str(0xE2), "text");
    assert_eq!(header.tlv_str(0x02), "localhost", "SNI as AUTHORITY");
    assert!(header.tlv(0x01).is_none(), "no ALPN was negotiated");
    let (flags, subs) = header.ssl();
    assert_eq!(flags, 0x01, "PP2_CLIENT_SSL, no client certificate");
    assert_eq!(
        subs,
        vec![
            (0x21, "TLSv1.3".to_string()),
            (0x23, "TLS13_AES_256_GCM_SHA384".to_string()),
        ]
    );

    // Exactly the lines sent, without their line ends; heartbeats and empty lines stay.
    client.send(b"hello world\r\n\nECHO x\n").await;
    assert_eq!(conn.read_frame().await.unwrap(), b"hello world");
    assert_eq!(conn.read_frame().await.unwrap(), b"ECHO x");
    // Replies (and unsolicited messages) come back in order, one line each.
    conn.write_frame(b"first").await;
    conn.write_frame(b"second \x01").await;
    assert_eq!(client.read_line().await, "first");
    assert_eq!(client.read_line().await, "second \x01");

    // The client closes: the upstream sees the end after every frame.
    client.send_line("last").await;
    let _ = tokio::io::AsyncWriteExt::shutdown(&mut client.stream).await;
    assert_eq!(conn.read_frame().await.unwrap(), b"last");
    assert_eq!(conn.read_frame().await, None);
    assert_eq!(upstream.accepts(), 1);
    let metrics = scrape(&gateway);
    assert_eq!(
        sample(
            &metrics,
            "portcullis_upstream_messages_total{direction=\"to_upstream\"}"
        ),
        3.0
    );
    assert_eq!(
        sample(
            &metrics,
            "portcullis_upstream_messages_total{direction=\"from_upstream\"}"
        ),
        2.0
    );
}

#[tokio::test]
async fn binary_mtls_client_is_connected_at_its_first_message_with_its_certificate() {
    let certs = TestCerts::new();
    let mut upstream = MockUpstream::start().await;
    let gateway = Process::gateway(&certs, &upstream_config(&[upstream.addr], ""));
    let mut client = Client::connect_with(gateway.addr, &certs, mtls(&certs))
        .await
        .unwrap();
    // Authenticated by its certificate, framing unknown until the first byte.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(upstream.accepts(), 0, "framing not known yet");
    let payload = b"\0binary\npayload\xff".to_vec();
    client.send_frame(&payload).await;
    client.send(&[0, 0, 0, 0]).await; // a heartbeat: stays local
    client.send_frame(b"PING").await;
    let mut conn = upstream.next().await;
    let header = conn.read_header().await;
    assert_eq!(header.source, Some(client_addr(&client)));
    assert_eq!(header.tlv_str(0xE0), "dev-client");
    assert_eq!(header.tlv_str(0xE1), "mtls");
    assert_eq!(header.tlv_str(0xE2), "binary");
    let (flags, subs) = header.ssl();
    assert_eq!(flags, 0x03, "PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN");
    assert!(subs.contains(&(0x22, "dev-client".to_string())), "{subs:?}");
    assert!(subs.contains(&(0x21, "TLSv1.3".to_string())), "{subs:?}");
    assert_eq!(conn.read_frame().await.unwrap(), payload);
    assert_eq!(
        conn.read_frame().await.unwrap(),
        b"PING",
        "forwarded, not answered"
    );
    conn.write_frame(b"reply\n\0one").await;
    conn.write_frame(b"").await;
    conn.write_frame(b"reply two").await;
    assert_eq!(client.read_frame().await, b"reply\n\0one");
    assert_eq!(client.read_frame().await, b"");
    assert_eq!(client.read_frame().await, b"reply two");
    // The upstream closes: the client gets what was sent, then close_notify.
    conn.write_frame(b"bye").await;
    drop(conn);
    assert_eq!(client.read_frame().await, b"bye");
    client.expect_closed().await;
    let metrics = scrape(&gateway);
    assert_eq!(
        sample(
            &metrics,
            "portcullis_connections_closed_total{reason=\"upstream_closed\"}"
        ),
        1.0
    );
}

#[tokio::test]
async fn unauthenticated_clients_never_cost_an_upstream_connection() {
    let certs = TestCerts::new();
    let upstream = MockUpstream::start().await;
    let gateway = Process::gateway(&certs, &upstream_config(&[upstream.addr], ""));
    let mut text = Client::connect(gateway.addr, &certs).await;
    assert_eq!(text.request_line("PING").await, "OK PONG");
    assert_eq!(text.request_line("AUTH nope").await, "ERR AUTH_FAILED");
    text.send_line(&"x".repeat(5000)).await;
    assert!(text.read_line().await.starts_with("ERR TOO_LARGE"));
    text.expect_closed().await;
    let mut binary = Client::connect(gateway.addr, &certs).await;
    assert_eq!(binary.request_frame(b"PING").await, b"OK PONG");
    binary.send(&(1u32 << 20).to_be_bytes()).await;
    assert!(binary.read_frame().await.starts_with(b"ERR TOO_LARGE"));
    binary.expect_closed().await;
    assert_eq!(upstream.accepts(), 0);
}

#[tokio::test]
async fn oversize_and_rate_limited_messages_are_refused_and_not_forwarded() {
    let certs = TestCerts::new();
    let mut upstream = MockUpstream::start().await;
    let extra = "[limits]\ncommands_per_second = 1\ncommands_burst = 2\n";
    let gateway = Process::gateway(&certs, &upstream_config(&[upstream.addr], extra));
    let mut client = Client::authed(gateway.addr, &certs).await; // AUTH takes one token
    let mut conn = upstream.next().await;
    conn.read_header().await;
    client.send_line("one").await;
    assert_eq!(
        client.request_line("two").await,
        "ERR RATE_LIMITED slow down"
    );
    assert_eq!(conn.read_frame().await.unwrap(), b"one");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    client.send_line("three").await;
    assert_eq!(
        conn.read_frame().await.unwrap(),
        b"three",
        "two was not forwarded"
    );
    client.send_line(&"y".repeat(4097)).await;
    assert_eq!(client.read_line().await, "ERR TOO_LARGE 4096");
    client.expect_closed().await;
    assert_eq!(
        conn.read_frame().await,
        None,
        "the oversize line was not forwarded"
    );
}

/// Peak virtual memory of a process, in bytes.
fn peak_virtual_memory(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmPeak:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmPeak");
    kb * 1024
}

#[tokio::test]
async fn upstream_replies_over_the_cap_or_unfit_for_text_close_the_client() {
    let certs = TestCerts::new();
    let mut upstream = MockUpstream::start().await;
    let gateway = Process::gateway(&certs, &upstream_config(&[upstream.addr], ""));
    let mut client = Client::connect_with(gateway.addr, &certs, mtls(&certs))
        .await
        .unwrap();
    client.send_frame(b"hi").await;
    let mut conn = upstream.next().await;
    conn.read_header().await;
    conn.read_frame().await.unwrap();
    // Announces 4 GiB - 1 and sends a little of it.
    let mut announce = vec![0xFF; 4];
    announce.extend_from_slice(&[b'z'; 1000]);
    tokio::io::AsyncWriteExt::write_all(&mut conn.stream, &announce)
        .await
        .unwrap();
    client.expect_closed().await;
    assert!(
        peak_virtual_memory(gateway.child.id()) < 1 << 31,
        "nothing near 4 GiB was reserved"
    );

    let mut text = Client::authed(gateway.addr, &certs).await;
    let mut conn = upstream.next().await;
    conn.read_header().await;
    conn.write_frame(b"fine").await;
    assert_eq!(text.read_line().await, "fine");
    conn.write_frame(b"two\nlines").await;
    text.expect_closed().await;

    let metrics = scrape(&gateway);
    for (series, value) in [
        (
            "portcullis_upstream_errors_total{reason=\"reply_too_large\"}",
            1.0,
        ),
        (
            "portcullis_upstream_errors_total{reason=\"upstream_protocol\"}",
            1.0,
        ),
        (
            "portcullis_connections_closed_total{reason=\"upstream_error\"}",
            2.0,
        ),
    ] {
        assert_eq!(sample(&metrics, series), value, "{series}");
    }
}

#[tokio::test]
async fn unreachable_servers_get_one_retry_then_upstream_unavailable() {
    let certs = TestCerts::new();
    let dead: SocketAddr = format!("127.0.0.1:{}", support::free_port())
        .parse()
        .unwrap();
    let mut upstream = MockUpstream::start().await;
    let extra = "balance = \"round_robin\"\n";
    let gateway = Process::gateway(&certs, &upstream_config(&[dead, upstream.addr], extra));
    // Whichever server round-robin tries first, the retry reaches the live one.
    for _ in 0..2 {
        let mut client = Client::authed(gateway.addr, &certs).await;
        let mut conn = upstream.next().await;
        conn.read_header().await;
        client.send_line("ping").await;
        assert_eq!(conn.read_frame().await.unwrap(), b"ping");
    }
    let gateway_dead = Process::gateway(&certs, &upstream_config(&[dead], ""));
    let mut client = Client::connect(gateway_dead.addr, &certs).await;
    assert_eq!(
        client.request_line(&format!("AUTH {ALICE_TOKEN}")).await,
        "OK alice"
    );
    assert!(
        client
            .read_line()
            .await
            .starts_with("ERR UPSTREAM_UNAVAILABLE"),
        "after the OK to AUTH"
    );
    client.expect_closed().await;
    let metrics = scrape(&gateway_dead);
    assert_eq!(
        sample(
            &metrics,
            "portcullis_upstream_errors_total{reason=\"unavailable\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(
            &metrics,
            "portcullis_upstream_errors_total{reason=\"connect_failed\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(
            &scrape(&gateway),
            "portcullis_upstream_errors_total{reason=\"connect_failed\"}"
        ),
        1.0,
        "round-robin tried the dead server once in two connections"
    );
}

#[tokio::test]
async fn section_8_metrics_are_registered_before_any_traffic() {
    let certs = TestCerts::new();
    let upstream = MockUpstream::start().await;
    let dead: SocketAddr = format!("127.0.0.1:{}", support::free_port())
        .parse()
        .unwrap();
    let gateway = Process::gateway(&certs, &upstream_config(&[upstream.addr, dead], ""));
    let metrics = scrape(&gateway);
    for server in [upstream.addr, dead] {
        let series = format!("portcullis_upstream_server_up{{server=\"{server}\"}}");
        assert_eq!(sample(&metrics, &series), 1.0, "{series} in\n{metrics}");
    }
    for series in [
        "portcullis_upstream_connections_active",
        "portcullis_upstream_errors_total{reason=\"connect_failed\"}",
        "portcullis_upstream_errors_total{reason=\"connect_timeout\"}",
        "portcullis_upstream_errors_total{reason=\"unavailable\"}",
        "portcullis_upstream_errors_total{reason=\"reply_too_large\"}",
        "portcullis_upstream_errors_total{reason=\"upstream_protocol\"}",
        "portcullis_upstream_errors_total{reason=\"reset\"}",
        "portcullis_upstream_messages_total{direction=\"to_upstream\"}",
        "portcullis_upstream_messages_total{direction=\"from_upstream\"}",
        "portcullis_upstream_bytes_total{direction=\"to_upstream\"}",
        "portcullis_upstream_bytes_total{direction=\"from_upstream\"}",
        "portcullis_upstream_connect_duration_seconds_count{result=\"ok\"}",
        "portcullis_upstream_connect_duration_seconds_count{result=\"timeout\"}",
        "portcullis_connections_closed_total{reason=\"upstream_closed\"}",
        "portcullis_connections_closed_total{reason=\"upstream_error\"}",
    ] {
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with(&format!("{series} "))),
            "{series} missing"
        );
    }
    assert!(metrics.contains("# TYPE portcullis_upstream_connect_duration_seconds histogram"));
}

#[test]
fn check_config_validates_and_resolves_the_upstream() {
    let certs = TestCerts::new();
    let run = |extra: &str| {
        let config = support::write_config(&certs, extra);
        std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args(["check-config", "--config", config.to_str().unwrap()])
            .env_remove("RUST_LOG")
            .output()
            .unwrap()
    };
    let ok = run("[upstream]\nservers = [\"localhost:7000\", \"unix:/run/app.sock\"]\n");
    assert!(ok.status.success(), "{ok:?}");
    assert!(String::from_utf8_lossy(&ok.stdout).contains("[upstream]"));
    for (extra, named) in [
        (
            "[upstream]\nservers = [\"no-such-host.invalid:7000\"]\n",
            "upstream.servers",
        ),
        (
            "[upstream]\nservers = [\"localhost\"]\n",
            "upstream.servers[0]",
        ),
        (
            "[upstream]\nmax_reply_bytes = 16777216\n",
            "upstream.max_reply_bytes",
        ),
        ("[upstream]\nbalance = \"random\"\n", "upstream.balance"),
    ] {
        let out = run(extra);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{extra}");
        assert!(stderr.contains(named), "{extra}: {stderr}");
    }
}
