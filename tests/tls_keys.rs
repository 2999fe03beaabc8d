//! Private keys in every PEM form operators have: PKCS#8 (rcgen), SEC1 and PKCS#1 (made
//! with the real `openssl`, which .ci/run installs).

mod support;

use std::path::Path;
use std::process::Command;

use support::*;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn serves_with(certs: &TestCerts, cert: &Path, key: &Path, ca: &Path) {
    let mut config = test_config(certs);
    config.tls.cert = cert.into();
    config.tls.key = key.into();
    let server = TestServer::start(config).await;
    let mut c = Client::connect_ca(server.addr, ca, ClientOptions::default())
        .await
        .unwrap();
    assert_eq!(c.request_line("PING").await, "OK PONG");
}

#[tokio::test]
async fn pkcs8_sec1_and_pkcs1_keys_load() {
    let certs = TestCerts::new();
    let dir = certs.dir.path();
    let p = &certs.paths;
    // PKCS#8, as rcgen writes it.
    assert!(std::fs::read_to_string(&p.server_key)
        .unwrap()
        .contains("BEGIN PRIVATE KEY"));
    serves_with(&certs, &p.server_cert, &p.server_key, &p.ca_cert).await;
    // SEC1 ("EC PRIVATE KEY") from the same key.
    let sec1 = dir.join("server-sec1.key");
    openssl(
        dir,
        &[
            "pkey",
            "-in",
            p.server_key.to_str().unwrap(),
            "-traditional",
            "-out",
            sec1.to_str().unwrap(),
        ],
    );
    assert!(std::fs::read_to_string(&sec1)
        .unwrap()
        .contains("BEGIN EC PRIVATE KEY"));
    serves_with(&certs, &p.server_cert, &sec1, &p.ca_cert).await;
    // PKCS#1 ("RSA PRIVATE KEY"): an RSA key and certificate signed by the test CA.
    let (ca, ca_key) = (p.ca_cert.to_str().unwrap(), p.ca_key.to_str().unwrap());
    std::fs::write(dir.join("ext.cnf"), "subjectAltName=DNS:localhost\n").unwrap();
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "rsa8.key",
            "-out",
            "rsa.csr",
            "-subj",
            "/CN=localhost",
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "rsa.csr",
            "-CA",
            ca,
            "-CAkey",
            ca_key,
            "-CAcreateserial",
            "-out",
            "rsa.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
    );
    openssl(
        dir,
        &["rsa", "-in", "rsa8.key", "-traditional", "-out", "rsa1.key"],
    );
    assert!(std::fs::read_to_string(dir.join("rsa1.key"))
        .unwrap()
        .contains("BEGIN RSA PRIVATE KEY"));
    serves_with(
        &certs,
        &dir.join("rsa.pem"),
        &dir.join("rsa1.key"),
        &p.ca_cert,
    )
    .await;
}
