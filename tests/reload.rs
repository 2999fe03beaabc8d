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
