//! Hot reload on SIGHUP and by polling: certificates (with new TLS connections opening all the
//! while), tokens, and the rest of the configuration file, applied to open connections too.

mod support;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use portcullis::bootstrap::{default_sans, generate_certs};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use support::*;
use tokio_rustls::TlsConnector;

fn serial_of(pem: &Path) -> String {
    let der = CertificateDer::from_pem_file(pem).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
    cert.raw_serial_as_string()
}

/// Replaces `to` with `from`'s contents atomically (write aside, then rename).
fn replace(from: &Path, to: &Path) {
    let aside = to.with_extension("new");
    std::fs::copy(from, &aside).unwrap();
    std::fs::rename(&aside, to).unwrap();
}

/// A client that trusts both CAs and reports the serial of the certificate it was served.
fn connector(cas: &[&Path]) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for ca in cas {
        roots
            .add(CertificateDer::from_pem_file(ca).unwrap())
            .unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    // Session tickets survive reloads (SPEC 7): a resumed session would show the
    // certificate of its first handshake, not the one served now.
    config.resumption = rustls::client::Resumption::disabled();
    TlsConnector::from(Arc::new(config))
}

async fn served_serial(
    connector: &TlsConnector,
    addr: std::net::SocketAddr,
) -> std::io::Result<String> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let tls = tokio::time::timeout(
        Duration::from_secs(5),
        connector.connect(ServerName::try_from("localhost").unwrap(), tcp),
    )
    .await??;
    let der = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
    let serial = cert.raw_serial_as_string();
    let mut tls = BufReader::new(tls);
    tls.get_mut().write_all(b"PING\n").await?;
    let mut line = String::new();
    tls.read_line(&mut line).await?;
    if line != "OK PONG\n" {
        return Err(std::io::Error::other(format!("bad reply {line:?}")));
    }
    Ok(serial)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_swaps_certificates_without_failing_a_handshake() {
    let certs = TestCerts::new();
    let other = generate_certs(&certs.dir.path().join("other"), &default_sans()).unwrap();
    let originals = certs.dir.path().join("originals");
    std::fs::create_dir(&originals).unwrap();
    std::fs::copy(&certs.paths.server_cert, originals.join("server.pem")).unwrap();
    std::fs::copy(&certs.paths.server_key, originals.join("server.key")).unwrap();
    let first_serial = serial_of(&certs.paths.server_cert);
    let other_serial = serial_of(&other.server_cert);

    // The loop below opens connections as fast as it can: lift the per-IP rate limit.
    let gateway = Process::gateway(
        &certs,
        "[limits]\nconnection_rate_per_ip = 100000\nconnection_burst_per_ip = 100000\n",
    );
    let connector = connector(&[&certs.paths.ca_cert, &other.ca_cert]);
    let addr = gateway.addr;

    // A connection opened before the reloads.
    let mut before = Client::authed(addr, &certs).await;

    // New connections in a loop, counting failures and the serials seen.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let handshakes = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(Mutex::new(std::collections::HashSet::new()));
    let looper = {
        let (stop, failures, handshakes, seen, connector) = (
            stop.clone(),
            failures.clone(),
            handshakes.clone(),
            seen.clone(),
            connector.clone(),
        );
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match served_serial(&connector, addr).await {
                    Ok(serial) => {
                        handshakes.fetch_add(1, Ordering::Relaxed);
                        seen.lock().unwrap().insert(serial);
                    }
                    Err(e) => {
                        eprintln!("handshake failed: {e}");
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        })
    };

    for round in 0..20 {
        let (cert, key) = if round % 2 == 0 {
            (&other.server_cert, &other.server_key)
        } else {
            (&originals.join("server.pem"), &originals.join("server.key"))
        };
        replace(cert, &certs.paths.server_cert);
        replace(key, &certs.paths.server_key);
        gateway.signal(libc::SIGHUP);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // 20 rounds end on the original certificate; one more makes it the other one.
    replace(&other.server_cert, &certs.paths.server_cert);
    replace(&other.server_key, &certs.paths.server_key);
    gateway.signal(libc::SIGHUP);
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    looper.await.unwrap();

    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "failed handshakes during reloads"
    );
    assert!(
        handshakes.load(Ordering::Relaxed) > 20,
        "too few handshakes to mean anything"
    );
    let seen = seen.lock().unwrap().clone();
    assert!(
        seen.contains(&first_serial) && seen.contains(&other_serial),
        "serials seen: {seen:?}"
    );
    assert_eq!(served_serial(&connector, addr).await.unwrap(), other_serial);
    assert_eq!(
        before.request_line("PING").await,
        "OK PONG",
        "a connection from before still works"
    );

    // A broken key: the reload fails, the old certificate keeps serving.
    std::fs::write(
        &certs.paths.server_key,
        "-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    replace(&originals.join("server.pem"), &certs.paths.server_cert);
    gateway.signal(libc::SIGHUP);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(served_serial(&connector, addr).await.unwrap(), other_serial);
    let admin = gateway.admin;
    let scrape = tokio::task::spawn_blocking(move || http_get(admin, "/metrics").unwrap().1)
        .await
        .unwrap();
    assert!(
        sample(&scrape, "portcullis_config_reloads_total{result=\"ok\"}") >= 21.0,
        "{scrape}"
    );
    assert!(
        sample(
            &scrape,
            "portcullis_config_reloads_total{result=\"failed\"}"
        ) >= 1.0
    );
    assert!(gateway.stderr().contains("reload failed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_reloaded_too() {
    let certs = TestCerts::new();
    let gateway = Process::gateway(&certs, "");
    let mut c = Client::connect(gateway.addr, &certs).await;
    assert_eq!(c.request_line("AUTH bob-token").await, "ERR AUTH_FAILED");
    let extra = format!(
        "[[auth.tokens]]\nname = \"bob\"\nsha256 = \"{}\"\n",
        portcullis::auth::token_digest_hex("bob-token")
    );
    write_config(&certs, &extra);
    gateway.signal(libc::SIGHUP);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(c.request_line("AUTH bob-token").await, "OK bob");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_interval_polls_the_files() {
    let certs = TestCerts::new();
    let other = generate_certs(&certs.dir.path().join("other"), &default_sans()).unwrap();
    // Through the environment, as an operator of a container would set it.
    let gateway =
        Process::gateway_with_env(&certs, "", &[("PORTCULLIS_TLS_RELOAD_INTERVAL", "200ms")]);
    let connector = connector(&[&certs.paths.ca_cert, &other.ca_cert]);
    assert_eq!(
        served_serial(&connector, gateway.addr).await.unwrap(),
        serial_of(&certs.paths.server_cert)
    );
    // Key first, then certificate: the poll may see a mismatched pair in between, which
    // fails and keeps the old one until the pair is whole.
    replace(&other.server_key, &certs.paths.server_key);
    replace(&other.server_cert, &certs.paths.server_cert);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        served_serial(&connector, gateway.addr).await.unwrap(),
        serial_of(&other.server_cert)
    );
}

/// Rewrites the gateway's configuration file with `extra` and sends SIGHUP; returns once the
/// reload has been counted with `result` (the `n`th such).
async fn reload_with(gateway: &Process, certs: &TestCerts, extra: &str, result: &str, n: f64) {
    write_config(certs, extra);
    gateway.signal(libc::SIGHUP);
    let series = format!("portcullis_config_reloads_total{{result=\"{result}\"}}");
    wait_for_sample(gateway.admin, &series, n).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_cidr_closes_its_open_connection_and_refuses_new_ones() {
    let certs = TestCerts::new();
    let gateway = Process::gateway(&certs, "");
    let mut doomed = Client::connect_with(gateway.addr, &certs, from(2))
        .await
        .unwrap();
    assert_eq!(doomed.request_line("PING").await, "OK PONG");
    let mut other = Client::connect_with(gateway.addr, &certs, from(3))
        .await
        .unwrap();
    assert_eq!(other.request_line("PING").await, "OK PONG");

    write_config(&certs, "[access]\ndeny = [\"127.0.0.2/32\"]\n");
    gateway.signal(libc::SIGHUP);

    // Closed at the reload, gracefully, without waiting for its idle timeout (60 s).
    doomed.expect_close_notify().await;
    assert!(
        refused_from(gateway.addr, &certs, 2).await,
        "new connections refused"
    );
    assert_eq!(
        other.request_line("PING").await,
        "OK PONG",
        "others untouched"
    );
    assert!(!refused_from(gateway.addr, &certs, 3).await);
    let scrape = wait_for_sample(
        gateway.admin,
        "portcullis_connections_closed_total{reason=\"denied\"}",
        1.0,
    )
    .await;
    assert_eq!(
        sample(&scrape, "portcullis_config_reloads_total{result=\"ok\"}"),
        1.0
    );
    assert!(
        sample(
            &scrape,
            "portcullis_connections_rejected_total{reason=\"denied\"}"
        ) >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lowered_connection_rate_is_enforced_after_sighup() {
    let certs = TestCerts::new();
    let gateway = Process::gateway(
        &certs,
        "[limits]\nconnection_rate_per_ip = 100\nconnection_burst_per_ip = 100\n",
    );
    for _ in 0..5 {
        assert!(!refused_from(gateway.addr, &certs, 4).await);
    }
    // A lower rate, and a key that needs a restart (logged, kept as it was).
    reload_with(
        &gateway,
        &certs,
        "[limits]\nconnection_rate_per_ip = 1\nconnection_burst_per_ip = 2\n[log]\nlevel = \"debug\"\n",
        "ok",
        1.0,
    )
    .await;
    assert!(!refused_from(gateway.addr, &certs, 4).await);
    assert!(!refused_from(gateway.addr, &certs, 4).await);
    assert!(
        refused_from(gateway.addr, &certs, 4).await,
        "the third connection within a second is over the new burst of 2"
    );
    assert!(
        !refused_from(gateway.addr, &certs, 5).await,
        "other addresses unaffected"
    );
    let stderr = gateway.stderr();
    assert!(
        stderr.contains("need a restart") && stderr.contains("log.level"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_file_changes_nothing() {
    let certs = TestCerts::new();
    let gateway = Process::gateway(&certs, "[access]\ndeny = [\"127.0.0.6/32\"]\n");
    let mut open = Client::authed(gateway.addr, &certs).await;
    assert!(refused_from(gateway.addr, &certs, 6).await);

    // Lifts the deny, but also holds an invalid value: nothing of it may apply.
    reload_with(
        &gateway,
        &certs,
        "[limits]\nmax_connections = 0\n",
        "failed",
        1.0,
    )
    .await;
    assert!(
        refused_from(gateway.addr, &certs, 6).await,
        "the deny still holds"
    );
    assert_eq!(
        open.request_line("WHOAMI").await.split(' ').nth(1),
        Some("identity=alice")
    );
    assert!(!refused_from(gateway.addr, &certs, 7).await);
    let scrape = wait_for_sample(
        gateway.admin,
        "portcullis_config_reloads_total{result=\"failed\"}",
        1.0,
    )
    .await;
    assert_eq!(
        sample(
            &scrape,
            "portcullis_config_reloads_total{result=\"failed\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(&scrape, "portcullis_config_reloads_total{result=\"ok\"}"),
        0.0
    );
    let stderr = gateway.stderr();
    assert!(
        stderr.contains("reload failed") && stderr.contains("limits.max_connections"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sighup_right_after_start_reloads_rather_than_ending_the_process() {
    let certs = TestCerts::new();
    let mut gateway = Process::gateway(&certs, "");
    // At once after the "serving" line, as a deploy script's reload would.
    gateway.signal(libc::SIGHUP);
    let series = "portcullis_config_reloads_total{result=\"ok\"}";
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        assert!(
            gateway.child.try_wait().unwrap().is_none(),
            "SIGHUP ended the gateway: {}",
            gateway.stderr()
        );
        let scrape = http_get(gateway.admin, "/metrics").map(|r| r.1);
        if sample(&scrape.unwrap_or_default(), series) >= 1.0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no reload counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut client = Client::authed(gateway.addr, &certs).await;
    assert_eq!(client.request_line("PING").await, "OK PONG");
}

/// `[upstream]` for `servers` plus `extra` upstream keys.
fn upstream_section(servers: &[std::net::SocketAddr], extra: &str) -> String {
    let list: Vec<String> = servers.iter().map(|a| format!("\"{a}\"")).collect();
    format!("[upstream]\nservers = [{}]\n{extra}", list.join(", "))
}

fn server_up(scrape: &str, server: std::net::SocketAddr) -> f64 {
    sample(
        scrape,
        &format!("portcullis_upstream_server_up{{server=\"{server}\"}}"),
    )
}

/// The next relayed (not health-check) connection an upstream accepts, past its header.
async fn next_relayed(
    upstream: &mut upstream::MockUpstream,
) -> (upstream::UpstreamConn, upstream::ProxyInfo) {
    loop {
        let mut conn = upstream.next().await;
        let header = conn.read_header().await;
        if !header.local {
            return (conn, header);
        }
    }
}

/// Waits until `upstream` has accepted at least `n` connections (fails after 10 s).
async fn wait_accepts(upstream: &upstream::MockUpstream, n: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while upstream.accepts() < n {
        assert!(
            std::time::Instant::now() < deadline,
            "{} accepts, wanted {n}",
            upstream.accepts()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_sends_new_connections_to_the_new_servers_and_leaves_open_ones_relaying() {
    let certs = TestCerts::new();
    let mut a = upstream::MockUpstream::start().await;
    let mut b = upstream::MockUpstream::start().await;
    let checks = "health_interval = \"100ms\"\n";
    let gateway = Process::gateway(&certs, &upstream_section(&[a.addr], checks));
    let mut on_a = Client::authed(gateway.addr, &certs).await;
    let (mut conn_a, _) = next_relayed(&mut a).await;

    reload_with(
        &gateway,
        &certs,
        &upstream_section(&[b.addr], checks),
        "ok",
        1.0,
    )
    .await;
    let mut on_b = Client::authed(gateway.addr, &certs).await;
    let (mut conn_b, header) = next_relayed(&mut b).await;
    assert_eq!(header.tlv_str(0xE0), "alice");
    on_b.send_line("to b").await;
    assert_eq!(conn_b.read_frame().await.unwrap(), b"to b");
    // The connection opened before the reload goes on through A, both ways.
    on_a.send_line("still to a").await;
    assert_eq!(conn_a.read_frame().await.unwrap(), b"still to a");
    conn_a.write_frame(b"from a").await;
    assert_eq!(on_a.read_line().await, "from a");

    // A is no longer checked, nor reported up; B is.
    let a_seen = a.accepts();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        a.accepts(),
        a_seen,
        "no more health checks on the removed server"
    );
    let scrape = http_get(gateway.admin, "/metrics").unwrap().1;
    assert_eq!(server_up(&scrape, a.addr), 0.0, "a removed server reads 0");
    assert_eq!(server_up(&scrape, b.addr), 1.0);
    assert_eq!(
        sample(&scrape, "portcullis_upstream_connections_active"),
        2.0
    );
    assert!(!gateway.stderr().contains("need a restart"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_fall_or_health_interval_takes_effect_at_a_reload() {
    let certs = TestCerts::new();
    // fall: a dead server checked every 100 ms stays up under fall = 1000.
    let dead: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let checks = "health_interval = \"100ms\"\nconnect_timeout = \"500ms\"\n";
    let gateway = Process::gateway(
        &certs,
        &upstream_section(&[dead], &format!("{checks}fall = 1000\n")),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(http_get(gateway.admin, "/readyz").unwrap().0, 200);
    reload_with(
        &gateway,
        &certs,
        &upstream_section(&[dead], &format!("{checks}fall = 2\n")),
        "ok",
        1.0,
    )
    .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while http_get(gateway.admin, "/readyz").unwrap().0 != 503 {
        assert!(std::time::Instant::now() < deadline, "never fell");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(gateway);

    // health_interval: from one check an hour to one every 100 ms.
    let live = upstream::MockUpstream::start().await;
    let gateway = Process::gateway(
        &certs,
        &upstream_section(&[live.addr], "health_interval = \"1h\"\n"),
    );
    wait_accepts(&live, 1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        live.accepts(),
        1,
        "one check at start, then none for an hour"
    );
    reload_with(
        &gateway,
        &certs,
        &upstream_section(&[live.addr], "health_interval = \"100ms\"\n"),
        "ok",
        1.0,
    )
    .await;
    wait_accepts(&live, 6).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_server_keeps_its_health_and_its_connections_across_a_reload() {
    let certs = TestCerts::new();
    let dead: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut a = upstream::MockUpstream::start().await;
    let mut b = upstream::MockUpstream::start().await;
    // Passive health only, so that nothing but real connections changes a server's state.
    let settings = "balance = \"round_robin\"\nmax_connections_per_server = 1\n\
                    health_interval = \"0s\"\nfall = 1\n";
    let gateway = Process::gateway(&certs, &upstream_section(&[dead, a.addr], settings));
    // Round-robin tries the dead server first: it falls, and the retry reaches A.
    let mut held = Client::authed(gateway.addr, &certs).await;
    let (mut conn_a, _) = next_relayed(&mut a).await;
    let failed = "portcullis_upstream_errors_total{reason=\"connect_failed\"}";
    let scrape = http_get(gateway.admin, "/metrics").unwrap().1;
    assert_eq!(sample(&scrape, failed), 1.0);
    assert_eq!(server_up(&scrape, dead), 0.0);

    reload_with(
        &gateway,
        &certs,
        &upstream_section(&[dead, a.addr, b.addr], settings),
        "ok",
        1.0,
    )
    .await;
    let scrape = http_get(gateway.admin, "/metrics").unwrap().1;
    assert_eq!(server_up(&scrape, dead), 0.0, "still down after the reload");
    assert_eq!(server_up(&scrape, a.addr), 1.0);
    // The dead server is not tried again, and A still holds its one connection of one.
    let mut second = Client::authed(gateway.addr, &certs).await;
    let (mut conn_b, _) = next_relayed(&mut b).await;
    second.send_line("to b").await;
    assert_eq!(conn_b.read_frame().await.unwrap(), b"to b");
    let mut third = Client::connect(gateway.addr, &certs).await;
    assert_eq!(
        third.request_line(&format!("AUTH {ALICE_TOKEN}")).await,
        "OK alice"
    );
    assert!(third
        .read_line()
        .await
        .starts_with("ERR UPSTREAM_UNAVAILABLE"));
    let scrape = http_get(gateway.admin, "/metrics").unwrap().1;
    assert_eq!(
        sample(&scrape, failed),
        1.0,
        "the dead server was not retried"
    );
    assert_eq!(
        a.accepts(),
        1,
        "A's count survived: max_connections_per_server held"
    );
    conn_a.write_frame(b"a still relays").await;
    assert_eq!(held.read_line().await, "a still relays");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_server_comes_back_with_its_connections_and_its_health() {
    let certs = TestCerts::new();
    let dead: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut a = upstream::MockUpstream::start().await;
    let b = upstream::MockUpstream::start().await;
    let settings = "balance = \"round_robin\"\nmax_connections_per_server = 1\n\
                    health_interval = \"0s\"\nfall = 1\n";
    let gateway = Process::gateway(&certs, &upstream_section(&[dead, a.addr], settings));
    // The dead server falls; A holds its one connection of one.
    let mut held = Client::authed(gateway.addr, &certs).await;
    let (mut conn_a, _) = next_relayed(&mut a).await;
    // An operator switches to B, then rolls back.
    reload_with(
        &gateway,
        &certs,
        &upstream_section(&[b.addr], settings),
        "ok",
        1.0,
    )
    .await;
    reload_with(
        &gateway,
        &certs,
        &upstream_section(&[dead, a.addr], settings),
        "ok",
        2.0,
    )
    .await;
    let scrape = http_get(gateway.admin, "/metrics").unwrap().1;
    assert_eq!(
        server_up(&scrape, dead),
        0.0,
        "still down after the rollback"
    );
    assert_eq!(server_up(&scrape, a.addr), 1.0);
    let mut second = Client::connect(gateway.addr, &certs).await;
    assert_eq!(
        second.request_line(&format!("AUTH {ALICE_TOKEN}")).await,
        "OK alice"
    );
    assert!(second
        .read_line()
        .await
        .starts_with("ERR UPSTREAM_UNAVAILABLE"));
    assert_eq!(
        a.accepts(),
        1,
        "max_connections_per_server held across both reloads"
    );
    let scrape = http_get(gateway.admin, "/metrics").unwrap().1;
    let failed = "portcullis_upstream_errors_total{reason=\"connect_failed\"}";
    assert_eq!(
        sample(&scrape, failed),
        1.0,
        "the down server was not tried again"
    );
    conn_a.write_frame(b"a still relays").await;
    assert_eq!(held.read_line().await, "a still relays");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_accepted_under_the_old_caps_is_delivered_after_they_are_lowered() {
    let certs = TestCerts::new();
    let mut a = upstream::MockUpstream::start().await;
    let addr = a.addr;
    let caps = |buffer: usize, reply: usize| {
        format!(
            "[protocol]\nmax_line_bytes = 1024\nmax_frame_bytes = 1024\n\
             [limits]\nmax_write_buffer_bytes = {buffer}\n{}",
            upstream_section(&[addr], &format!("max_reply_bytes = {reply}\n"))
        )
    };
    let gateway = Process::gateway(&certs, &caps(65536, 32768));
    let mut client = Client::authed(gateway.addr, &certs).await;
    let (mut conn, _) = next_relayed(&mut a).await;
    reload_with(&gateway, &certs, &caps(8192, 4096), "ok", 1.0).await;
    client.send_line("after the reload").await;
    assert_eq!(conn.read_frame().await.unwrap(), b"after the reload");
    // Within the 32 KiB this connection was opened under, over the new 8 KiB buffer.
    let reply = vec![b'x'; 16 * 1024];
    conn.write_frame(&reply).await;
    let line = tokio::time::timeout(Duration::from_secs(5), client.read_line()).await;
    assert_eq!(
        line.expect("the reply never came").len(),
        reply.len(),
        "delivered whole"
    );
    client.send_line("still relaying").await;
    assert_eq!(conn.read_frame().await.unwrap(), b"still relaying");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_that_does_not_resolve_holds_back_no_revocation() {
    let certs = TestCerts::new();
    let mut a = upstream::MockUpstream::start().await;
    let passive = "health_interval = \"0s\"\n";
    let bob_token = "bob-secret-token";
    let bob = format!(
        "[[auth.tokens]]\nname = \"bob\"\nsha256 = \"{}\"\n",
        portcullis::auth::token_digest_hex(bob_token)
    );
    let gateway = Process::gateway(
        &certs,
        &format!("{bob}{}", upstream_section(&[a.addr], passive)),
    );
    let mut doomed = Client::connect(gateway.addr, &certs).await;
    assert_eq!(
        doomed.request_line(&format!("AUTH {bob_token}")).await,
        "OK bob"
    );
    let (_conn, header) = next_relayed(&mut a).await;
    assert_eq!(header.tlv_str(0xE0), "bob");

    // Bob's token removed, in the same reload as a server whose name does not resolve
    // (a headless service with no ready pod): the token goes all the same.
    let unresolved = "no-such-host.invalid:7000";
    reload_with(
        &gateway,
        &certs,
        &format!(
            "[upstream]\nservers = [\"{unresolved}\", \"{}\"]\n{passive}",
            a.addr
        ),
        "ok",
        1.0,
    )
    .await;
    doomed.expect_close_notify().await;
    wait_for_sample(
        gateway.admin,
        "portcullis_connections_closed_total{reason=\"revoked\"}",
        1.0,
    )
    .await;
    let mut again = Client::connect(gateway.addr, &certs).await;
    assert_eq!(
        again.request_line(&format!("AUTH {bob_token}")).await,
        "ERR AUTH_FAILED"
    );
    // The server that resolves serves; the other is left out, reported down and logged.
    let mut client = Client::authed(gateway.addr, &certs).await;
    let (mut conn, _) = next_relayed(&mut a).await;
    client.send_line("one").await;
    assert_eq!(conn.read_frame().await.unwrap(), b"one");
    let scrape = http_get(gateway.admin, "/metrics").unwrap().1;
    let gauge = format!("portcullis_upstream_server_up{{server=\"{unresolved}\"}}");
    assert_eq!(sample(&scrape, &gauge), 0.0);
    let stderr = gateway.stderr();
    assert!(
        stderr.contains("does not resolve") && stderr.contains(unresolved),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_only_upstream_change_keeps_the_running_servers() {
    let certs = TestCerts::new();
    let mut a = upstream::MockUpstream::start().await;
    let passive = "health_interval = \"0s\"\n";
    let gateway = Process::gateway(&certs, &upstream_section(&[a.addr], passive));
    // Turning the upstream off, or changing its mode, needs a restart.
    reload_with(
        &gateway,
        &certs,
        &format!("[upstream]\nservers = []\nmode = \"stream\"\n{passive}"),
        "ok",
        1.0,
    )
    .await;
    let mut client = Client::authed(gateway.addr, &certs).await;
    let (mut conn, _) = next_relayed(&mut a).await;
    client.send_line("two").await;
    assert_eq!(
        conn.read_frame().await.unwrap(),
        b"two",
        "still relayed to A, message by message"
    );
    let stderr = gateway.stderr();
    assert!(
        stderr.contains("need a restart")
            && stderr.contains("upstream.mode")
            && stderr.contains("turning the upstream on or off"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_stuck_reading_a_file_holds_up_no_connection_nor_the_exit() {
    let certs = TestCerts::new();
    // One worker: a reload run on it would stop every connection while it waits.
    let mut gateway = Process::gateway_with_env(&certs, "", &[("PORTCULLIS_SERVER_WORKERS", "1")]);
    let mut client = Client::authed(gateway.addr, &certs).await;
    // The new file names a client CA that is a FIFO nobody writes to yet: reading it waits,
    // like a resolver or a network mount that does not answer.
    let fifo = certs.dir.path().join("ca.fifo");
    let path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo(3) on a NUL-terminated path; no memory is shared.
    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
    let config = certs.dir.path().join("portcullis.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let ca = format!("{:?}", certs.paths.ca_cert);
    assert!(text.contains(&ca));
    std::fs::write(&config, text.replace(&ca, &format!("{fifo:?}"))).unwrap();
    gateway.signal(libc::SIGHUP);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !gateway.stderr().contains("SIGHUP: reloading") {
        assert!(std::time::Instant::now() < deadline, "no reload began");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let served = tokio::time::timeout(Duration::from_secs(3), client.request_line("PING")).await;
    assert_eq!(
        served.ok().as_deref(),
        Some("OK PONG"),
        "open connections are served during the reload"
    );
    let mut other = Client::authed(gateway.addr, &certs).await;
    assert_eq!(other.request_line("PING").await, "OK PONG");
    // SIGTERM: the gateway exits although the reload still waits on the file.
    drop((client, other));
    gateway.signal(libc::SIGTERM);
    let status = gateway.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
}

/// A reload that lowers `max_write_buffer_bytes` and `max_reply_bytes` under a relayed
/// connection whose client has replies waiting: the connection keeps the caps it opened
/// under. It is not closed (SPEC 9: a reload drops no connection; with two replies waiting
/// it was closed as `write_overflow`), and it reads its client only as far as the upstream
/// takes the messages (with one reply waiting it stopped forwarding at the new cap but read
/// on: 2 GB in 4 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_lowering_the_caps_leaves_relayed_connections_open_and_bounded() {
    const REPLY: usize = 900_000;
    const FLOOD: usize = 256 << 20;
    const BOUND: usize = 64 << 20;
    let rate = "[limits]\ncommands_per_second = 10000000\ncommands_burst = 10000000\n";
    for waiting in [1, 2] {
        let certs = TestCerts::new();
        let mut upstream = upstream::MockUpstream::start().await;
        let passive = "health_interval = \"0s\"\n";
        let large = format!(
            "{rate}max_write_buffer_bytes = 2000000\n{}",
            upstream_section(
                &[upstream.addr],
                &format!("{passive}max_reply_bytes = 1000000\n")
            )
        );
        let gateway = Process::gateway(&certs, &large);
        let mut client = Client::authed(gateway.addr, &certs).await;
        let (mut conn, _) = next_relayed(&mut upstream).await;
        for _ in 0..waiting {
            conn.write_frame(&vec![b'r'; REPLY]).await;
        }
        // Taken from the upstream: waiting in the write buffer of a client that reads nothing.
        let taken = "portcullis_upstream_messages_total{direction=\"from_upstream\"}";
        wait_for_sample(gateway.admin, taken, waiting as f64).await;

        let defaults = format!("{rate}{}", upstream_section(&[upstream.addr], passive));
        reload_with(&gateway, &certs, &defaults, "ok", 1.0).await;
        // The client floods an upstream that reads nothing: its writes must stall.
        let line = format!("{}\n", "y".repeat(4000));
        let written = flood_until_held_back(&mut client, &line, FLOOD).await;
        assert!(
            written < BOUND,
            "{waiting} waiting: the gateway read {written} bytes ahead"
        );
        // Nothing lost either way.
        for _ in 0..waiting {
            assert_eq!(client.read_line().await.len(), REPLY);
        }
        assert_eq!(conn.read_frame().await.unwrap().len(), 4000);
        assert_eq!(write_overflows(&gateway), 0.0);
    }
}

/// `auth.mode` going from "none" to "token" by a reload: a connection relayed without
/// authentication has no right to the upstream any more and is closed as revoked, in
/// stream mode (it stayed open) as in messages mode (it waited for its auth deadline).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_requiring_authentication_closes_anonymous_relays() {
    for mode in ["stream", "messages"] {
        let certs = TestCerts::new();
        let mut upstream = upstream::MockUpstream::start().await;
        let relay = format!("health_interval = \"0s\"\nmode = \"{mode}\"\n");
        let relay = upstream_section(&[upstream.addr], &relay);
        let section = |auth: &str| format!("[auth]\nmode = \"{auth}\"\n{relay}");
        let gateway = Process::gateway(&certs, &section("none"));
        let mut client = Client::connect(gateway.addr, &certs).await;
        client.send_line("anonymous").await;
        let (mut conn, _) = next_relayed(&mut upstream).await;
        match mode {
            "stream" => assert_eq!(conn.read_bytes(10).await, b"anonymous\n"),
            _ => assert_eq!(conn.read_frame().await.unwrap(), b"anonymous"),
        }

        reload_with(&gateway, &certs, &section("token"), "ok", 1.0).await;
        client.expect_close_notify().await;
        let revoked = "portcullis_connections_closed_total{reason=\"revoked\"}";
        wait_for_sample(gateway.admin, revoked, 1.0).await;
    }
}

/// A stream relay takes a reload's `max_connection_lifetime` and `idle_timeout` as messages
/// mode does (it kept the values it started with: 60 s of idleness, no lifetime).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_applies_its_time_limits_to_open_stream_relays() {
    let cases = [
        ("max_connection_lifetime", "lifetime"),
        ("idle_timeout", "idle_timeout"),
    ];
    for (key, reason) in cases {
        let certs = TestCerts::new();
        let mut upstream = upstream::MockUpstream::start().await;
        let relay = upstream_section(
            &[upstream.addr],
            "health_interval = \"0s\"\nmode = \"stream\"\n",
        );
        let gateway = Process::gateway(&certs, &relay);
        let mut client = Client::authed(gateway.addr, &certs).await;
        let (_conn, _) = next_relayed(&mut upstream).await;
        // Open, and quiet, for longer than the new limit when the reload comes.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let limits = format!("[limits]\n{key} = \"1s\"\n{relay}");
        reload_with(&gateway, &certs, &limits, "ok", 1.0).await;
        let reloaded = std::time::Instant::now();
        client.expect_close_notify().await;
        assert!(
            reloaded.elapsed() < Duration::from_secs(3),
            "{key}: closed {:?} after the reload",
            reloaded.elapsed()
        );
        let closed = format!("portcullis_connections_closed_total{{reason=\"{reason}\"}}");
        wait_for_sample(gateway.admin, &closed, 1.0).await;
    }
}

/// A reload's `idle_timeout` applies to open connections from their last activity, in
/// messages mode too (the deadline set under the old value stood).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_moves_the_idle_deadline_of_open_connections() {
    let certs = TestCerts::new();
    let mut upstream = upstream::MockUpstream::start().await;
    let relay = upstream_section(&[upstream.addr], "health_interval = \"0s\"\n");
    let gateway = Process::gateway(&certs, &relay);
    let mut relayed = Client::authed(gateway.addr, &certs).await;
    relayed.send_line("first").await;
    let (mut conn, _) = next_relayed(&mut upstream).await;
    assert_eq!(conn.read_frame().await.unwrap(), b"first");
    let mut plain = Client::connect(gateway.addr, &certs).await;
    assert_eq!(plain.request_line("PING").await, "OK PONG");
    // Quiet for longer than the new limit when the reload comes.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let limits = format!("[limits]\nidle_timeout = \"1s\"\n{relay}");
    reload_with(&gateway, &certs, &limits, "ok", 1.0).await;
    let reloaded = std::time::Instant::now();
    relayed.expect_close_notify().await;
    plain.expect_close_notify().await;
    assert!(
        reloaded.elapsed() < Duration::from_secs(3),
        "closed {:?} after the reload",
        reloaded.elapsed()
    );
    let idled = "portcullis_connections_closed_total{reason=\"idle_timeout\"}";
    wait_for_sample(gateway.admin, idled, 2.0).await;
}

/// `auth.mode` going to "none" by a reload: a client that had not authenticated is served
/// as authenticated, with the full message caps (it was held to `max_preauth_bytes`); and
/// back to "token": one still unauthenticated is held to `max_preauth_bytes` again (it kept
/// the full caps).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_of_auth_mode_moves_the_message_caps_of_waiting_clients() {
    let certs = TestCerts::new();
    let mut upstream = upstream::MockUpstream::start().await;
    let relay = upstream_section(&[upstream.addr], "health_interval = \"0s\"\n");
    let gateway = Process::gateway(&certs, &relay);
    let mut client = Client::connect(gateway.addr, &certs).await;
    assert_eq!(client.request_line("PING").await, "OK PONG");
    // Silent: under "none" a client whose framing is known is relayed at once.
    let mut waiting = Client::connect(gateway.addr, &certs).await;

    let open = format!("[auth]\nmode = \"none\"\n{relay}");
    reload_with(&gateway, &certs, &open, "ok", 1.0).await;
    // Each connection applies the reload at its next wake: before its next message, unless
    // that message is already on its way.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let long = "z".repeat(2000);
    client.send_line(&long).await;
    let (mut conn, _) = next_relayed(&mut upstream).await;
    assert_eq!(conn.read_frame().await.unwrap(), long.as_bytes());

    reload_with(&gateway, &certs, &relay, "ok", 2.0).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    waiting.send_line(&format!("ECHO {long}")).await;
    assert_eq!(waiting.read_line().await, "ERR TOO_LARGE 1024");
}

/// A relayed client whose write buffer the upstream's replies filled to within a few bytes
/// of its cap, then sends messages over its command rate: the gateway's `ERR RATE_LIMITED`
/// must not count as the client's overflow (it was closed as write_overflow). Its messages
/// wait until it reads, and a flood of them is not read ahead either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusing_a_relayed_message_never_overflows_a_buffer_full_of_replies() {
    use tokio::io::AsyncWriteExt;
    const REPLIES: usize = 40_000;
    const FLOOD: usize = 64 << 20;
    const BOUND: usize = 16 << 20;
    let certs = TestCerts::new();
    let mut upstream = upstream::MockUpstream::start().await;
    let extra = format!(
        "[protocol]\nmax_line_bytes = 1000\nmax_frame_bytes = 1000\n\
         [limits]\nmax_write_buffer_bytes = 10000\nsocket_send_buffer = 4096\n\
         commands_per_second = 1\ncommands_burst = 2\n{}",
        upstream_section(
            &[upstream.addr],
            "health_interval = \"0s\"\nmax_reply_bytes = 1000\n"
        )
    );
    let gateway = Process::gateway(&certs, &extra);
    let mut client = Client::authed(gateway.addr, &certs).await;
    client.send_line("open").await;
    let (mut conn, _) = next_relayed(&mut upstream).await;
    assert_eq!(conn.read_frame().await.unwrap(), b"open");
    // 10-byte replies, 440 KB of them as text, to a client that reads nothing: past what
    // the kernel's queues and TLS hold, its write buffer fills as far as replies may fill it.
    let mut replies = Vec::new();
    for _ in 0..REPLIES {
        replies.extend_from_slice(&support::frame(b"0123456789"));
    }
    conn.stream.write_all(&replies).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Over the rate (one per second, the burst of two spent on AUTH and "open"), and many.
    let line = format!("{}\n", "o".repeat(100));
    let written = flood_until_held_back(&mut client, &line, FLOOD).await;
    assert!(written < BOUND, "the gateway read {written} bytes ahead");

    // Still open both ways: the client reads the replies, the refusals, then a later reply.
    let mut refused = 0;
    loop {
        match client.read_line().await.as_str() {
            "0123456789" => {}
            line if line.starts_with("ERR RATE_LIMITED") => refused += 1,
            "still open" => break,
            other => panic!("unexpected reply {other:?}"),
        }
        if refused == 2 {
            conn.write_frame(b"still open").await;
        }
    }
    assert!(refused >= 2, "the messages over the rate were refused");
    assert_eq!(write_overflows(&gateway), 0.0);
}

/// Writes `line` over and over until a write stalls for 2 s (the gateway stopped reading)
/// or `limit` bytes went out; the bytes written. Panics if the connection is closed.
async fn flood_until_held_back(client: &mut Client, line: &str, limit: usize) -> usize {
    use tokio::io::AsyncWriteExt;
    let mut written = 0;
    while written < limit {
        let write = client.stream.write_all(line.as_bytes());
        match tokio::time::timeout(Duration::from_secs(2), write).await {
            Ok(result) => result.expect("the relayed connection was closed"),
            Err(_) => break, // held back
        }
        written += line.len();
    }
    written
}

/// Connections the gateway closed as `write_overflow`.
fn write_overflows(gateway: &Process) -> f64 {
    let scrape = http_get(gateway.admin, "/metrics").unwrap().1;
    sample(
        &scrape,
        "portcullis_connections_closed_total{reason=\"write_overflow\"}",
    )
}
