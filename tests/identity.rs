//! A client certificate, issued by the trusted CA, whose identity (DNS SAN or CN) holds a
//! newline: it must never reach a reply or a log line (SPEC 9, identity hygiene).

mod support;

use std::path::PathBuf;

use rcgen::{CertificateParams, DnType, DnValue, ExtendedKeyUsagePurpose, KeyPair};
use support::*;
use tokio::io::AsyncReadExt;

/// The injected text: on the old code WHOAMI answered `OK identity=evil` and then this
/// forged line.
const FORGED: &str = "OK identity=admin ip=10.0.0.1";

/// A client certificate signed by the test CA with the given SANs and CN; returns the paths
/// of its certificate and key.
fn issue(certs: &TestCerts, name: &str, sans: Vec<String>, cn: &str) -> (PathBuf, PathBuf) {
    let p = &certs.paths;
    let ca_key = KeyPair::from_pem(&std::fs::read_to_string(&p.ca_key).unwrap()).unwrap();
    let ca = CertificateParams::from_ca_cert_pem(&std::fs::read_to_string(&p.ca_cert).unwrap())
        .unwrap()
        .self_signed(&ca_key)
        .unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(sans).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, DnValue::Utf8String(cn.into()));
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    let dir = certs.dir.path();
    let cert_path = dir.join(format!("{name}.pem"));
    let key_path = dir.join(format!("{name}.key"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    (cert_path, key_path)
}

/// Connects with the certificate, sends WHOAMI and QUIT, and returns everything the gateway sends
/// until it closes the connection (`None` when the handshake itself fails).
async fn whoami_with(
    certs: &TestCerts,
    server: &TestServer,
    cert: (PathBuf, PathBuf),
) -> Option<String> {
    let options = ClientOptions {
        identity: Some(cert),
        ..Default::default()
    };
    let mut client = Client::connect_with(server.addr, certs, options)
        .await
        .ok()?;
    use tokio::io::AsyncWriteExt;
    let _ = client.stream.write_all(b"WHOAMI\nQUIT\n").await;
    let _ = client.stream.flush().await;
    let mut seen = Vec::new();
    let _ = tokio::time::timeout(REPLY_TIMEOUT, client.stream.read_to_end(&mut seen)).await;
    Some(String::from_utf8_lossy(&seen).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_with_a_newline_never_reaches_a_reply() {
    let certs = TestCerts::new();
    let server = TestServer::start(test_config(&certs)).await;
    let injected = format!("evil\n{FORGED}");

    let by_san = issue(&certs, "san", vec![injected.clone()], "plain-cn");
    let by_cn = issue(&certs, "cn", Vec::new(), &injected);
    for (what, cert) in [("DNS SAN", by_san), ("CN", by_cn)] {
        let seen = whoami_with(&certs, &server, cert).await.unwrap_or_default();
        assert!(
            !seen.contains("evil") && !seen.contains(FORGED),
            "a {what} with a newline reached a reply: {seen:?}"
        );
        assert!(
            !seen.contains("identity="),
            "the connection was served: {seen:?}"
        );
    }

    // Refused and counted; a clean certificate from the same CA still authenticates.
    let admin = server.admin;
    let scrape = tokio::task::spawn_blocking(move || http_get(admin, "/metrics").unwrap().1)
        .await
        .unwrap();
    let failed = sample(
        &scrape,
        "portcullis_auth_total{method=\"mtls\",result=\"failed\"}",
    );
    assert!(failed >= 2.0, "refusals not counted: {failed}");
    let clean = issue(&certs, "clean", vec!["svc.example".into()], "svc");
    let seen = whoami_with(&certs, &server, clean).await.unwrap();
    assert!(seen.starts_with("OK identity=svc.example "), "{seen:?}");
}
