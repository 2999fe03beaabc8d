//! Revocation takes effect on open connections (SPEC section 9): a reload that removes a
//! token or changes the client CA closes the connections they authenticated, a CRL refuses
//! revoked client certificates at the handshake (and closes open connections at the reload
//! that brings it), and `max_connection_lifetime` ends every connection in time.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use portcullis::auth::token_digest_hex;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use support::*;

const BOB_TOKEN: &str = "bob-secret-token";

fn bob_entry() -> String {
    format!(
        "[[auth.tokens]]\nname = \"bob\"\nsha256 = \"{}\"\n",
        token_digest_hex(BOB_TOKEN)
    )
}

fn identity(whoami: &str) -> Option<&str> {
    whoami.split(' ').nth(1)?.strip_prefix("identity=")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_token_closes_the_connection_it_authenticated() {
    let certs = TestCerts::new();
    let gateway = Process::gateway(&certs, &bob_entry());
    let mut bob = Client::connect(gateway.addr, &certs).await;
    assert_eq!(
        bob.request_line(&format!("AUTH {BOB_TOKEN}")).await,
        "OK bob"
    );
    assert_eq!(identity(&bob.request_line("WHOAMI").await), Some("bob"));
    let mut alice = Client::authed(gateway.addr, &certs).await;

    // Bob's entry removed: the attack was that his open connection went on as bob.
    write_config(&certs, "");
    gateway.signal(libc::SIGHUP);
    bob.expect_close_notify().await;

    assert_eq!(identity(&alice.request_line("WHOAMI").await), Some("alice"));
    let mut again = Client::connect(gateway.addr, &certs).await;
    assert_eq!(
        again.request_line(&format!("AUTH {BOB_TOKEN}")).await,
        "ERR AUTH_FAILED"
    );
    let scrape = wait_for_sample(
        gateway.admin,
        "portcullis_connections_closed_total{reason=\"revoked\"}",
        1.0,
    )
    .await;
    assert_eq!(
        sample(
            &scrape,
            "portcullis_connections_closed_total{reason=\"revoked\"}"
        ),
        1.0,
        "alice's connection stays"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_ca_change_closes_connections_whose_certificate_no_longer_verifies() {
    let certs = TestCerts::new();
    // The clients keep trusting the server through a copy of the original CA.
    let server_ca = certs.dir.path().join("server-ca.pem");
    std::fs::copy(&certs.paths.ca_cert, &server_ca).unwrap();
    let gateway = Process::gateway(&certs, "");
    let mut mtls = Client::connect_ca(gateway.addr, &server_ca, with_cert(&certs, true))
        .await
        .unwrap();
    assert_eq!(
        identity(&mtls.request_line("WHOAMI").await),
        Some("dev-client")
    );
    let mut token = Client::connect_ca(gateway.addr, &server_ca, ClientOptions::default())
        .await
        .unwrap();
    assert_eq!(
        token.request_line(&format!("AUTH {ALICE_TOKEN}")).await,
        "OK alice"
    );

    // The configured client CA now holds another CA only.
    std::fs::copy(&certs.untrusted.ca_cert, &certs.paths.ca_cert).unwrap();
    gateway.signal(libc::SIGHUP);
    mtls.expect_close_notify().await;
    assert_eq!(token.request_line("PING").await, "OK PONG");
    assert!(
        refused(Client::connect_ca(gateway.addr, &server_ca, with_cert(&certs, true)).await).await
    );
    wait_for_sample(
        gateway.admin,
        "portcullis_connections_closed_total{reason=\"revoked\"}",
        1.0,
    )
    .await;
}

/// A CRL signed by the test CA revoking the certificates with these serials, as PEM and DER.
fn crl_revoking(certs: &TestCerts, revoked: &[&Path]) -> (String, Vec<u8>) {
    let ca_pem = std::fs::read_to_string(&certs.paths.ca_cert).unwrap();
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(&certs.paths.ca_key).unwrap()).unwrap();
    let ca = rcgen::CertificateParams::from_ca_cert_pem(&ca_pem)
        .unwrap()
        .self_signed(&ca_key)
        .unwrap();
    let now = time::OffsetDateTime::now_utc();
    let revoked_certs = revoked
        .iter()
        .map(|pem| {
            let der = CertificateDer::from_pem_file(pem).unwrap();
            let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
            rcgen::RevokedCertParams {
                serial_number: rcgen::SerialNumber::from_slice(cert.raw_serial()),
                revocation_time: now - time::Duration::minutes(1),
                reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                invalidity_date: None,
            }
        })
        .collect();
    let crl = rcgen::CertificateRevocationListParams {
        this_update: now - time::Duration::minutes(1),
        next_update: now + time::Duration::days(1),
        crl_number: rcgen::SerialNumber::from(1u64),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    }
    .signed_by(&ca, &ca_key)
    .unwrap();
    (crl.pem().unwrap(), crl.der().to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crl_refuses_a_revoked_client_certificate_and_reloads() {
    let certs = TestCerts::new();
    let crl = certs.dir.path().join("client.crl.pem");
    let (empty, _) = crl_revoking(&certs, &[]);
    std::fs::write(&crl, empty).unwrap();
    let crl_var = crl.to_str().unwrap();
    let gateway = Process::gateway_with_env(&certs, "", &[("PORTCULLIS_TLS_CLIENT_CRL", crl_var)]);
    let mut open = Client::connect_with(gateway.addr, &certs, with_cert(&certs, true))
        .await
        .unwrap();
    assert_eq!(
        identity(&open.request_line("WHOAMI").await),
        Some("dev-client")
    );

    let (revoking, _) = crl_revoking(&certs, &[&certs.paths.client_cert]);
    std::fs::write(&crl, revoking).unwrap();
    gateway.signal(libc::SIGHUP);
    open.expect_close_notify().await;
    assert!(
        refused(Client::connect_with(gateway.addr, &certs, with_cert(&certs, true)).await).await
    );
    // Clients without a certificate are not affected.
    let mut alice = Client::authed(gateway.addr, &certs).await;
    assert_eq!(alice.request_line("PING").await, "OK PONG");
    wait_for_sample(
        gateway.admin,
        "portcullis_connections_closed_total{reason=\"revoked\"}",
        1.0,
    )
    .await;
}

#[tokio::test]
async fn a_der_crl_given_at_start_refuses_the_revoked_certificate() {
    let certs = TestCerts::new();
    let crl = certs.dir.path().join("client.crl");
    let (_, der) = crl_revoking(&certs, &[&certs.paths.client_cert]);
    std::fs::write(&crl, der).unwrap();
    let mut config = test_config(&certs);
    config.tls.client_crl = vec![crl];
    let server = TestServer::start(config).await;
    assert!(
        refused(Client::connect_with(server.addr, &certs, with_cert(&certs, true)).await).await
    );
    let mut alice = Client::authed(server.addr, &certs).await;
    assert_eq!(alice.request_line("PING").await, "OK PONG");
}

#[tokio::test]
async fn max_connection_lifetime_closes_a_busy_connection_gracefully() {
    let certs = TestCerts::new();
    let mut config = test_config(&certs);
    config.limits.max_connection_lifetime = Duration::from_millis(800);
    let server = TestServer::start(config).await;
    let started = Instant::now();
    let mut c = Client::authed(server.addr, &certs).await;
    // Busy all the while: the idle timeout never fires, the lifetime does.
    while started.elapsed() < Duration::from_millis(500) {
        assert_eq!(c.request_line("PING").await, "OK PONG");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.expect_close_notify().await;
    let lived = started.elapsed();
    assert!(
        lived >= Duration::from_millis(750) && lived < Duration::from_secs(4),
        "closed after {lived:?}"
    );
    let scrape = wait_for_sample(
        server.admin,
        "portcullis_connections_closed_total{reason=\"lifetime\"}",
        1.0,
    )
    .await;
    assert_eq!(
        sample(
            &scrape,
            "portcullis_connections_closed_total{reason=\"lifetime\"}"
        ),
        1.0
    );
}

#[test]
fn a_crl_without_a_client_ca_is_refused_by_check_config() {
    let mut config = portcullis::config::Config::default();
    config.tls.client_crl = vec!["crl.pem".into()];
    let err = config.validate().unwrap_err().to_string();
    assert!(err.starts_with("tls.client_crl"), "{err}");
}

/// `[upstream]` in stream mode in front of `upstream`, passive health only.
fn stream_upstream(upstream: &support::upstream::MockUpstream) -> String {
    format!(
        "[upstream]\nservers = [\"{}\"]\nmode = \"stream\"\nhealth_interval = \"0s\"\n",
        upstream.addr
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relayed_stream_is_closed_when_its_token_is_removed() {
    let certs = TestCerts::new();
    let mut upstream = support::upstream::MockUpstream::start().await;
    let relay = stream_upstream(&upstream);
    let gateway = Process::gateway(&certs, &format!("{}{relay}", bob_entry()));
    let mut bob = Client::connect(gateway.addr, &certs).await;
    assert_eq!(
        bob.request_line(&format!("AUTH {BOB_TOKEN}")).await,
        "OK bob"
    );
    let mut conn = upstream.next().await;
    conn.read_header().await;
    bob.send(b"raw bytes\n").await;
    assert_eq!(conn.read_bytes(10).await, b"raw bytes\n");

    // The attack: once relaying, the connection no longer looked at reloads.
    write_config(&certs, &relay);
    gateway.signal(libc::SIGHUP);
    bob.expect_close_notify().await;
    wait_for_sample(
        gateway.admin,
        "portcullis_connections_closed_total{reason=\"revoked\"}",
        1.0,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connection_lifetime_ends_a_relayed_stream() {
    let certs = TestCerts::new();
    let mut upstream = support::upstream::MockUpstream::start().await;
    let extra = format!(
        "{}[limits]\nmax_connection_lifetime = \"800ms\"\n",
        stream_upstream(&upstream)
    );
    let gateway = Process::gateway(&certs, &extra);
    let started = Instant::now();
    let mut client = Client::authed(gateway.addr, &certs).await;
    let mut conn = upstream.next().await;
    conn.read_header().await;
    // Busy all the while: the idle timeout never fires, the lifetime does.
    while started.elapsed() < Duration::from_millis(500) {
        client.send(b"tick\n").await;
        assert_eq!(conn.read_bytes(5).await, b"tick\n");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    client.expect_close_notify().await;
    let lived = started.elapsed();
    assert!(
        lived >= Duration::from_millis(750) && lived < Duration::from_secs(4),
        "closed after {lived:?}"
    );
    wait_for_sample(
        gateway.admin,
        "portcullis_connections_closed_total{reason=\"lifetime\"}",
        1.0,
    )
    .await;
}
