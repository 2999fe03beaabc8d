//! The upstream relay (SPEC section 6), end to end: the real gateway binary in front of a
//! test upstream on loopback, real TLS clients (token and mTLS, text and binary).

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::upstream::{MockUpstream, UpstreamConn};
use support::{
    assert_samples, http_get, sample, Client, ClientOptions, Process, TestCerts, ALICE_TOKEN,
};

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
            (0x23, "TLS13_AES_128_GCM_SHA256".to_string()),
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
    let extra = "[limits]\ncommands_per_second = 1\ncommands_burst = 2\n";
    let (_upstream, _gateway, mut client, mut conn) = relayed(&certs, extra).await; // AUTH takes one token
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
        support::status_bytes(gateway.child.id(), "VmPeak") < 1 << 31,
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
    assert_samples(
        &metrics,
        &[
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
        ],
    );
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

/// A gateway relaying to a mock upstream (`extra` appended to its `[upstream]` section), a
/// token client authenticated through it, and the upstream's side of that client's
/// connection with its PROXY header read.
async fn relayed(certs: &TestCerts, extra: &str) -> (MockUpstream, Process, Client, UpstreamConn) {
    let mut upstream = MockUpstream::start().await;
    let gateway = Process::gateway(certs, &upstream_config(&[upstream.addr], extra));
    let client = Client::authed(gateway.addr, certs).await;
    let mut conn = upstream.next().await;
    conn.read_header().await;
    (upstream, gateway, client, conn)
}

/// The `upstream_echo` example's binary, built here once per test process.
fn upstream_echo_binary() -> std::path::PathBuf {
    const NAME: &str = "upstream_echo";
    let deps = std::env::current_exe().unwrap();
    let exe = deps
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join(NAME);
    // Built once per test process, always: a selective `cargo test --test upstream` does not
    // rebuild examples, and a stale binary would test old code. A no-op when up to date.
    static BUILT: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    BUILT.get_or_init(|| {
        let status = std::process::Command::new(env!("CARGO"))
            .args(["build", "--quiet", "--locked", "--example", NAME])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("cargo build --example");
        assert!(status.success());
    });
    exe
}

/// Polls `/readyz` until it answers `status` (fails after 10 s).
async fn wait_ready(gateway: &Process, status: u16) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let got = http_get(gateway.admin, "/readyz").map(|r| r.0).unwrap_or(0);
        if got == status {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "/readyz stayed {got}, wanted {status}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn health_checks_follow_rise_and_fall_and_drive_readyz() {
    let certs = TestCerts::new();
    let port = support::free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let extra = "[upstream]\nservers = [\"127.0.0.1:PORT\"]\nhealth_interval = \"100ms\"\n\
                 connect_timeout = \"500ms\"\nrise = 2\nfall = 2\n"
        .replace("PORT", &port.to_string());
    // Down at start: the first checks fail and the server falls.
    let gateway = Process::gateway(&certs, &extra);
    let up_series = format!("portcullis_upstream_server_up{{server=\"{addr}\"}}");
    wait_ready(&gateway, 503).await;
    assert_eq!(sample(&scrape(&gateway), &up_series), 0.0);
    let mut client = Client::connect(gateway.addr, &certs).await;
    assert_eq!(
        client.request_line(&format!("AUTH {ALICE_TOKEN}")).await,
        "OK alice"
    );
    assert!(client
        .read_line()
        .await
        .starts_with("ERR UPSTREAM_UNAVAILABLE"));
    client.expect_closed().await;

    // It comes up: checks connect and send a LOCAL header; after `rise` it is up.
    let mut upstream = MockUpstream::start_on(addr).await;
    let mut check = upstream.next().await;
    let header = check.read_header().await;
    assert!(header.local, "a health check says LOCAL");
    assert_eq!(check.read_frame().await, None, "and closes");
    wait_ready(&gateway, 200).await;
    assert_eq!(sample(&scrape(&gateway), &up_series), 1.0);

    // It goes away: after `fall` failed checks it is down again.
    drop(upstream);
    wait_ready(&gateway, 503).await;
    assert_eq!(sample(&scrape(&gateway), &up_series), 0.0);
}

#[tokio::test]
async fn an_upstream_failing_mid_connection_closes_the_client_and_is_counted() {
    let certs = TestCerts::new();
    let (_upstream, gateway, mut client, mut conn) = relayed(&certs, "").await;
    conn.write_frame(b"before the reset").await;
    assert_eq!(client.read_line().await, "before the reset");
    conn.stream.set_zero_linger().unwrap();
    drop(conn); // a reset
    client.expect_closed().await;
    let metrics = scrape(&gateway);
    assert_eq!(
        sample(
            &metrics,
            "portcullis_upstream_errors_total{reason=\"reset\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(
            &metrics,
            "portcullis_connections_closed_total{reason=\"upstream_error\"}"
        ),
        1.0
    );
}

/// Waits until `upstreams` together have accepted `n` connections; their counts.
async fn accepted(upstreams: [&MockUpstream; 2], n: usize) -> [usize; 2] {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let counts = upstreams.map(MockUpstream::accepts);
        if counts[0] + counts[1] >= n || std::time::Instant::now() > deadline {
            return counts;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn balance_spreads_connections_as_named() {
    let certs = TestCerts::new();
    let a = MockUpstream::start().await;
    let b = MockUpstream::start().await;
    let rr = Process::gateway(
        &certs,
        &upstream_config(&[a.addr, b.addr], "balance = \"round_robin\"\n"),
    );
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(Client::authed(rr.addr, &certs).await);
    }
    assert_eq!(
        accepted([&a, &b], 4).await,
        [2, 2],
        "round_robin alternates"
    );
    drop(held);
    drop(rr);

    // least_conn: each new connection goes to the server holding fewer.
    let a = MockUpstream::start().await;
    let b = MockUpstream::start().await;
    let lc = Process::gateway(&certs, &upstream_config(&[a.addr, b.addr], ""));
    let first = Client::authed(lc.addr, &certs).await;
    let after_first = accepted([&a, &b], 1).await;
    let _second = Client::authed(lc.addr, &certs).await;
    assert_eq!(accepted([&a, &b], 2).await, [1, 1], "the emptier server");
    drop(first);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while sample(&scrape(&lc), "portcullis_upstream_connections_active") != 1.0 {
        assert!(std::time::Instant::now() < deadline, "first not closed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _third = Client::authed(lc.addr, &certs).await;
    let after_third = accepted([&a, &b], 3).await;
    let expected = after_first.map(|n| n + 1);
    assert_eq!(after_third, expected, "the server the first one left");
}

/// `examples/upstream_echo` running on `listen`, its stdout lines on a channel.
struct Echo {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Echo {
    /// Starts it and returns it with the address its first line names.
    fn start(listen: &str) -> (Echo, String) {
        let exe = upstream_echo_binary();
        let mut child = std::process::Command::new(exe)
            .arg(listen)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start upstream_echo");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                let _ = tx.send(line);
            }
        });
        let first = lines
            .recv_timeout(Duration::from_secs(10))
            .expect("listening line");
        let addr = first.rsplit(' ').next().unwrap().to_string();
        (Echo { child, lines }, addr)
    }

    /// The next line it logs (fails after 5 s).
    fn next_line(&self) -> String {
        self.lines
            .recv_timeout(Duration::from_secs(5))
            .expect("a line from upstream_echo")
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn the_example_upstream_sees_the_identity_and_answers_each_frame() {
    let (echo, addr) = Echo::start("127.0.0.1:0");
    let addr: SocketAddr = addr.parse().unwrap();
    let certs = TestCerts::new();
    let gateway = Process::gateway(&certs, &upstream_config(&[addr], ""));
    let mut client = Client::authed(gateway.addr, &certs).await;
    assert_eq!(client.request_line("hello").await, "alice: hello");
    assert_eq!(
        client.request_line("ECHO two words").await,
        "alice: ECHO two words"
    );
    let logged = echo.next_line();
    let me = client_addr(&client);
    assert!(
        logged.starts_with(&format!(
            "client {me} identity=alice method=token framing=text"
        )),
        "{logged}"
    );
    let mut cert_client = Client::connect_with(gateway.addr, &certs, mtls(&certs))
        .await
        .unwrap();
    assert_eq!(
        cert_client.request_frame(b"\0hi").await,
        b"dev-client: \0hi"
    );
}

#[tokio::test]
async fn a_unix_socket_upstream_relays_checks_and_is_told_the_clients_tcp_addresses() {
    let certs = TestCerts::new();
    let socket = certs.dir.path().join("echo.sock");
    let server = format!("unix:{}", socket.display());
    let (echo, listening) = Echo::start(&server);
    assert_eq!(listening, server);
    let config = format!(
        "[upstream]\nservers = [\"{server}\"]\nhealth_interval = \"100ms\"\n\
         connect_timeout = \"500ms\"\nrise = 1\nfall = 2\n"
    );
    let gateway = Process::gateway(&certs, &config);
    let mut client = Client::authed(gateway.addr, &certs).await;
    assert_eq!(
        client.request_line("over a unix socket").await,
        "alice: over a unix socket"
    );
    // The PROXY v2 header still names the client's TCP address, not the Unix socket's.
    let me = client_addr(&client);
    let logged = echo.next_line();
    assert!(
        logged.starts_with(&format!(
            "client {me} identity=alice method=token framing=text (via {server})"
        )),
        "{logged}"
    );
    let up = format!("portcullis_upstream_server_up{{server=\"{server}\"}}");
    assert_eq!(sample(&scrape(&gateway), &up), 1.0);
    // Health checks reach the socket too: when the service goes, the server falls.
    drop(echo);
    wait_ready(&gateway, 503).await;
    assert_eq!(sample(&scrape(&gateway), &up), 0.0);
}

/// `len` pseudo-random bytes (every byte value occurs).
fn noise(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed;
    (0..len)
        .map(|_| {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (x >> 24) as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_mode_relays_10_mib_each_way_byte_exact_and_passes_half_closes_on() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let certs = TestCerts::new();
    let mut upstream = MockUpstream::start().await;
    let gateway = Process::gateway(
        &certs,
        &upstream_config(&[upstream.addr], "mode = \"stream\"\n"),
    );
    // A token client: one AUTH line, then raw bytes. The client half-closes first.
    let mut client = Client::connect(gateway.addr, &certs).await;
    assert_eq!(
        client.request_line(&format!("AUTH {ALICE_TOKEN}")).await,
        "OK alice"
    );
    let mut conn = upstream.next().await;
    let header = conn.read_header().await;
    assert_eq!(header.tlv_str(0xE1), "token");
    let up = noise(10 << 20, 1);
    let down = noise(10 << 20, 2);
    let (mut client_rd, mut client_wr) = tokio::io::split(client.stream);
    let sending = async {
        client_wr.write_all(&up).await.unwrap();
        client_wr.shutdown().await.unwrap(); // close_notify: the client is done sending
    };
    let upstream_side = async {
        let got = conn.read_bytes(up.len() + 1).await;
        assert!(got == up, "client → upstream differs ({} bytes)", got.len());
        // The client's half-close reached the upstream; the other way is still open.
        conn.stream.write_all(&down).await.unwrap();
        conn.stream.shutdown().await.unwrap();
    };
    let receiving = async {
        let mut got = Vec::new();
        client_rd.read_to_end(&mut got).await.unwrap();
        assert!(
            got == down,
            "upstream → client differs ({} bytes)",
            got.len()
        );
    };
    tokio::join!(sending, upstream_side, receiving);

    // An mTLS client is connected right after its handshake; the upstream half-closes first.
    let mut client = Client::connect_with(gateway.addr, &certs, mtls(&certs))
        .await
        .unwrap();
    let mut conn = upstream.next().await;
    assert_eq!(conn.read_header().await.tlv_str(0xE1), "mtls");
    conn.stream.write_all(b"bye from upstream").await.unwrap();
    conn.stream.shutdown().await.unwrap();
    let mut got = Vec::new();
    client.stream.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"bye from upstream");
    client.stream.write_all(b"late words").await.unwrap();
    client.stream.shutdown().await.unwrap();
    assert_eq!(conn.read_bytes(100).await, b"late words");
    let metrics = scrape(&gateway);
    assert_eq!(
        sample(
            &metrics,
            "portcullis_upstream_bytes_total{direction=\"to_upstream\"}"
        ),
        (up.len() + 10) as f64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffers_stay_bounded_against_a_flooding_upstream_and_a_flooding_client() {
    use tokio::io::AsyncWriteExt;
    const FLOOD: usize = 256 << 20;
    const BOUND: usize = 64 << 20;
    let certs = TestCerts::new();
    let mut upstream = MockUpstream::start().await;
    // A command rate high enough that every line of the flood is forwarded, not refused.
    let extra = "[limits]\ncommands_per_second = 10000000\ncommands_burst = 10000000\n";
    let gateway = Process::gateway(&certs, &upstream_config(&[upstream.addr], extra));
    // The upstream floods a client that reads nothing: its writes must stall.
    let mut client = Client::authed(gateway.addr, &certs).await;
    let mut conn = upstream.next().await;
    conn.read_header().await;
    let chunk = support::frame(&[b'x'; 60_000]);
    let mut written = 0;
    while written < FLOOD {
        let write = conn.stream.write_all(&chunk);
        match tokio::time::timeout(Duration::from_secs(2), write).await {
            Ok(result) => result.unwrap(),
            Err(_) => break, // stalled: the gateway stopped reading
        }
        written += chunk.len();
    }
    assert!(written < BOUND, "the gateway read {written} bytes ahead");
    // Nothing was lost: the client gets every message, in order, once it reads.
    let messages = written / chunk.len();
    for _ in 0..messages.min(50) {
        assert_eq!(client.read_line().await.len(), 60_000);
    }

    // A client floods an upstream that reads nothing: the client's writes must stall.
    let mut client = Client::authed(gateway.addr, &certs).await;
    let mut conn = upstream.next().await;
    conn.read_header().await;
    let line = format!("{}\n", "y".repeat(4000));
    let mut written = 0;
    while written < FLOOD {
        let write = client.stream.write_all(line.as_bytes());
        match tokio::time::timeout(Duration::from_secs(2), write).await {
            Ok(result) => result.unwrap(),
            Err(_) => break,
        }
        written += line.len();
    }
    assert!(written < BOUND, "the gateway read {written} bytes ahead");
    assert_eq!(conn.read_frame().await.unwrap().len(), 4000);
}

#[tokio::test]
async fn sigterm_leaves_relayed_connections_to_finish() {
    let certs = TestCerts::new();
    let (_upstream, mut gateway, mut client, mut conn) = relayed(&certs, "").await;
    gateway.signal(libc::SIGTERM);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Draining: the relayed connection goes on, both ways.
    client.send_line("during the drain").await;
    assert_eq!(conn.read_frame().await.unwrap(), b"during the drain");
    conn.write_frame(b"still here").await;
    assert_eq!(client.read_line().await, "still here");
    drop(conn);
    client.expect_closed().await;
    let started = std::time::Instant::now();
    let status = gateway.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "exited once the connection finished, before drain_timeout"
    );
}

#[tokio::test]
async fn behind_a_trusted_balancer_the_upstream_is_told_the_real_client() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let certs = TestCerts::new();
    let mut upstream = MockUpstream::start().await;
    let extra = "[proxy_protocol]\nmode = \"optional\"\ntrusted = [\"127.0.0.1/32\"]\n";
    let gateway = Process::gateway(&certs, &upstream_config(&[upstream.addr], extra));
    let mut tcp = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
    tcp.write_all(b"PROXY TCP4 203.0.113.9 127.0.0.1 5555 8443\r\n")
        .await
        .unwrap();
    let connector = tokio_rustls::TlsConnector::from(support::client_config(
        &certs.paths.ca_cert,
        &ClientOptions::default(),
    ));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    tls.write_all(format!("AUTH {ALICE_TOKEN}\nhello\n").as_bytes())
        .await
        .unwrap();
    let mut conn = upstream.next().await;
    let header = conn.read_header().await;
    assert_eq!(header.source, Some("203.0.113.9:5555".parse().unwrap()));
    assert_eq!(header.tlv_str(0xE0), "alice");
    assert_eq!(conn.read_frame().await.unwrap(), b"hello");
    let mut ok = [0u8; 9];
    tls.read_exact(&mut ok).await.unwrap();
    assert_eq!(&ok, b"OK alice\n");
}

/// The README's Python reader, as printed there.
fn readme_python_reader() -> String {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = readme
        .split("## Putting your service behind portcullis")
        .nth(1)
        .expect("README section");
    let block = section.split("```python\n").nth(1).expect("python block");
    block.split("```").next().unwrap().to_string()
}

#[tokio::test]
async fn the_readme_python_reader_works_as_an_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("reader.py");
    std::fs::write(&script, readme_python_reader()).unwrap();
    let port = support::free_port();
    let mut python = std::process::Command::new("python3")
        .arg(&script)
        .arg(port.to_string())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 (.ci/run installs it)");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // Wait until it listens, probing the way a health check does (a LOCAL header).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut probe = loop {
        if let Ok(tcp) = std::net::TcpStream::connect(addr) {
            break tcp;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the reader did not listen"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    std::io::Write::write_all(&mut probe, b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00").unwrap();
    drop(probe);
    let certs = TestCerts::new();
    let gateway = Process::gateway(&certs, &upstream_config(&[addr], ""));
    let mut client = Client::authed(gateway.addr, &certs).await;
    assert_eq!(client.request_line("hello").await, "alice: hello");
    assert_eq!(client.request_line("again").await, "alice: again");
    let me = client_addr(&client);
    drop(client);
    let _ = python.kill();
    let mut out = String::new();
    std::io::Read::read_to_string(python.stdout.as_mut().unwrap(), &mut out).unwrap();
    let _ = python.wait();
    let expected = format!(
        "client ('127.0.0.1', {}) identity alice method token",
        me.port()
    );
    assert!(out.contains(&expected), "{out}");
}

#[tokio::test]
async fn stream_mode_closes_only_when_both_directions_are_idle() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let certs = TestCerts::new();
    let extra = "mode = \"stream\"\n[limits]\nidle_timeout = \"1s\"\n";
    let (_upstream, gateway, mut client, mut conn) = relayed(&certs, extra).await;
    // Only the upstream talks, for twice the idle timeout: the connection stays.
    for _ in 0..8 {
        conn.stream.write_all(b"tick").await.unwrap();
        let mut tick = [0u8; 4];
        client.stream.read_exact(&mut tick).await.unwrap();
        assert_eq!(&tick, b"tick");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Then nobody does: it is closed as idle, the upstream too.
    let started = std::time::Instant::now();
    client.expect_closed().await;
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(
        conn.read_bytes(1).await.is_empty(),
        "the upstream is closed too"
    );
    assert_eq!(
        sample(
            &scrape(&gateway),
            "portcullis_connections_closed_total{reason=\"idle_timeout\"}"
        ),
        1.0
    );
}

/// A loopback listener whose accept queue is full and never drained: the kernel drops the
/// SYNs of a further connect, which then neither completes nor fails until its connector
/// gives up.
struct Blackhole {
    addr: SocketAddr,
    _listener: socket2::Socket,
    /// The connections that fill the queue.
    _queued: Vec<std::net::TcpStream>,
}

impl Blackhole {
    fn new() -> Blackhole {
        use socket2::{Domain, Socket, Type};
        let listener = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        listener.bind(&any.into()).unwrap();
        listener.listen(0).unwrap();
        let addr = listener.local_addr().unwrap().as_socket().unwrap();
        let mut queued = Vec::new();
        for _ in 0..16 {
            match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
                Ok(stream) => queued.push(stream),
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                    return Blackhole {
                        addr,
                        _listener: listener,
                        _queued: queued,
                    }
                }
                Err(e) => panic!("filling the accept queue: {e}"),
            }
        }
        panic!("the accept queue never filled");
    }
}

#[tokio::test]
async fn a_connect_that_never_completes_times_out_then_is_retried_once() {
    let certs = TestCerts::new();
    let (one, two) = (Blackhole::new(), Blackhole::new());
    let extra = "connect_timeout = \"1s\"\n";
    let gateway = Process::gateway(&certs, &upstream_config(&[one.addr, two.addr], extra));
    let mut client = Client::connect(gateway.addr, &certs).await;
    let started = std::time::Instant::now();
    assert_eq!(
        client.request_line(&format!("AUTH {ALICE_TOKEN}")).await,
        "OK alice"
    );
    let ok_after = started.elapsed();
    assert!(
        ok_after < Duration::from_secs(1),
        "the OK to AUTH does not wait for the connect ({ok_after:?})"
    );
    let reply = client.read_line().await;
    let waited = started.elapsed();
    assert!(reply.starts_with("ERR UPSTREAM_UNAVAILABLE"), "{reply}");
    // Two attempts, one per server, each ended by connect_timeout.
    assert!(
        waited >= Duration::from_millis(1950) && waited < Duration::from_secs(6),
        "answered after {waited:?}"
    );
    client.expect_closed().await;
    let metrics = scrape(&gateway);
    assert_samples(
        &metrics,
        &[
            (
                "portcullis_upstream_errors_total{reason=\"connect_timeout\"}",
                2.0,
            ),
            (
                "portcullis_upstream_connect_duration_seconds_count{result=\"timeout\"}",
                2.0,
            ),
            (
                "portcullis_upstream_errors_total{reason=\"unavailable\"}",
                1.0,
            ),
            (
                "portcullis_upstream_errors_total{reason=\"connect_failed\"}",
                0.0,
            ),
            (
                "portcullis_upstream_connect_duration_seconds_count{result=\"failed\"}",
                0.0,
            ),
        ],
    );
    // Each timed-out attempt took connect_timeout: the histogram's sum says so too.
    let sum = sample(
        &metrics,
        "portcullis_upstream_connect_duration_seconds_sum{result=\"timeout\"}",
    );
    assert!((1.95..4.0).contains(&sum), "timeout durations sum to {sum}");
}

#[tokio::test]
async fn with_forced_framing_an_mtls_client_is_connected_right_after_its_handshake() {
    let certs = TestCerts::new();
    let mut upstream = MockUpstream::start().await;
    let forced = "[protocol]\nframing = \"binary\"\n";
    let gateway = Process::gateway(&certs, &upstream_config(&[upstream.addr], forced));
    let mut client = Client::connect_with(gateway.addr, &certs, mtls(&certs))
        .await
        .unwrap();
    // The client has sent nothing but its handshake: the upstream hears of it all the same.
    let mut conn = upstream.next().await;
    let header = conn.read_header().await;
    assert!(!header.local);
    assert_eq!(header.source, Some(client_addr(&client)));
    assert_eq!(header.destination, Some(gateway.addr));
    assert_eq!(header.tlv_str(0xE0), "dev-client");
    assert_eq!(header.tlv_str(0xE1), "mtls");
    assert_eq!(header.tlv_str(0xE2), "binary");
    let (flags, subs) = header.ssl();
    assert_eq!(flags, 0x03, "PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN");
    assert!(subs.contains(&(0x22, "dev-client".to_string())), "{subs:?}");
    // The service may speak first; then messages flow both ways.
    conn.write_frame(b"welcome").await;
    assert_eq!(client.read_frame().await, b"welcome");
    client.send_frame(b"first").await;
    assert_eq!(conn.read_frame().await.unwrap(), b"first");
    assert_eq!(upstream.accepts(), 1);
}

#[tokio::test]
async fn messages_mode_stays_open_while_messages_flow_and_closes_as_idle_after_the_last() {
    let certs = TestCerts::new();
    let extra = "[limits]\nidle_timeout = \"1s\"\n";
    let (_upstream, gateway, mut client, mut conn) = relayed(&certs, extra).await;
    // Messages both ways for 2.5 times the idle timeout: its timer fires before the
    // deadline the traffic keeps moving, and must not close the connection.
    for i in 0..10 {
        client.send_line(&format!("m{i}")).await;
        assert_eq!(conn.read_frame().await, Some(format!("m{i}").into_bytes()));
        conn.write_frame(format!("r{i}").as_bytes()).await;
        assert_eq!(client.read_line().await, format!("r{i}"));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Three lines in one write arrive as three frames, in order.
    client.send(b"a\nb\nc\n").await;
    for line in ["a", "b", "c"] {
        assert_eq!(conn.read_frame().await, Some(line.as_bytes().to_vec()));
    }
    // Then silence: closed as idle, a full idle timeout after the last message.
    let quiet = std::time::Instant::now();
    client.expect_closed().await;
    let waited = quiet.elapsed();
    assert!(
        waited >= Duration::from_millis(900),
        "closed early: {waited:?}"
    );
    assert!(waited < Duration::from_secs(4), "closed late: {waited:?}");
    assert_eq!(
        sample(
            &scrape(&gateway),
            "portcullis_connections_closed_total{reason=\"idle_timeout\"}"
        ),
        1.0
    );
}

/// A relayed client that floods an upstream which reads nothing costs the gateway one read
/// chunk and one message past the queue's 8 KiB, not a second `max_write_buffer_bytes`
/// (1 MiB here): resident memory per connection, measured from outside.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_flooding_an_upstream_that_does_not_read_is_held_back_after_a_few_kib() {
    use tokio::io::AsyncWriteExt;
    const CONNECTIONS: usize = 30;
    const BOUND: usize = 256 * 1024;
    let certs = TestCerts::new();
    let mut upstream = MockUpstream::start().await;
    let extra = format!(
        "[protocol]\nmax_line_bytes = 16384\n\
         [limits]\nmax_write_buffer_bytes = 1048576\n\
         commands_per_second = 10000000\ncommands_burst = 10000000\n{}",
        upstream_config(&[upstream.addr], "max_reply_bytes = 16384\n")
    );
    let gateway = Process::gateway(&certs, &extra);
    let pid = gateway.child.id();
    let mut clients = Vec::new();
    let mut conns = Vec::new(); // held open, never read past the header
    for _ in 0..CONNECTIONS {
        clients.push(Client::authed(gateway.addr, &certs).await);
        let mut conn = upstream.next().await;
        conn.read_header().await;
        conns.push(conn);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let baseline = support::status_bytes(pid, "VmRSS");

    let line = format!("{}\n", "y".repeat(16_000));
    let mut flooding = tokio::task::JoinSet::new();
    for mut client in clients {
        let line = line.clone();
        flooding.spawn(async move {
            let mut written = 0;
            loop {
                let write = client.stream.write_all(line.as_bytes());
                match tokio::time::timeout(Duration::from_secs(1), write).await {
                    Ok(result) => result.expect("the gateway reads on"),
                    Err(_) => return (client, written), // held back
                }
                written += line.len();
                assert!(written < 64 << 20, "the gateway read {written} bytes ahead");
            }
        });
    }
    let held = flooding.join_all().await;
    let per_connection = support::status_bytes(pid, "VmRSS").saturating_sub(baseline) / CONNECTIONS;
    eprintln!("RSS +{per_connection} bytes per held-back relayed connection");
    assert!(
        per_connection <= BOUND,
        "{per_connection} bytes per held-back connection"
    );
    drop(held);
}

/// Messages flow both ways independently (SPEC 6): a client that reads more slowly than a
/// feed of small upstream messages arrives is still read, and its messages reach the
/// upstream at once. (It was read only when the upstream happened to pause: over a Unix
/// socket, whose feed never pauses, not at all.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_of_a_fast_feed_still_reaches_the_upstream() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let certs = TestCerts::new();
    let socket = certs.dir.path().join("feed.sock");
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let server = format!("unix:{}", socket.display());
    let extra = format!(
        "[upstream]\nservers = [\"{server}\"]\nhealth_interval = \"0s\"\nsend_proxy = \"off\"\n"
    );
    let gateway = Process::gateway(&certs, &extra);
    let mut client = Client::authed(gateway.addr, &certs).await;
    client.send_line("subscribe").await;
    let (upstream, _) = listener.accept().await.unwrap();
    let (mut from_client, mut to_client) = upstream.into_split();
    // The feed: 20-byte messages, without a pause.
    let feed = tokio::spawn(async move {
        let batch: Vec<u8> = (0..100).flat_map(|_| support::frame(&[b'f'; 20])).collect();
        while to_client.write_all(&batch).await.is_ok() {}
    });
    // The client reads about 200 KB/s of it.
    let (mut reading, mut writing) = tokio::io::split(client.stream);
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok(n) = reading.read(&mut buf).await {
            if n == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    assert_eq!(read_frame(&mut from_client).await, b"subscribe");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    writing.write_all(b"unsubscribe\n").await.unwrap();
    let arrived = tokio::time::timeout(Duration::from_secs(2), read_frame(&mut from_client)).await;
    assert_eq!(
        arrived.expect("the client's message is held behind the feed"),
        b"unsubscribe"
    );
    feed.abort();
    reader.abort();
}

/// One frame's payload from a raw upstream connection (no PROXY header).
async fn read_frame(from: &mut (impl tokio::io::AsyncRead + Unpin)) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut header = [0u8; 4];
    from.read_exact(&mut header).await.unwrap();
    let mut payload = vec![0u8; u32::from_be_bytes(header) as usize];
    from.read_exact(&mut payload).await.unwrap();
    payload
}
