//! `portcullis certs generate`, as an operator runs it: the certificates pass strict X.509
//! validation (the real `openssl verify -x509_strict` and a Python `ssl` client with
//! `VERIFY_X509_STRICT`, both installed by .ci/run), existing files are never replaced
//! without `--force`, and keys are private from their first byte.

mod support;

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use support::*;

fn show(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `portcullis certs generate --out DIR` with `extra` arguments.
fn generate(dir: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["certs", "generate", "--out"])
        .arg(dir)
        .args(extra)
        .output()
        .expect("run portcullis")
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn generated_certificates_pass_openssl_strict_verification() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("certs");
    let out = generate(&dir, &[]);
    assert!(out.status.success(), "{}", show(&out));
    for (leaf, purpose) in [("server.pem", "sslserver"), ("client.pem", "sslclient")] {
        let out = Command::new("openssl")
            .args(["verify", "-x509_strict", "-purpose", purpose, "-CAfile"])
            .arg(dir.join("ca.pem"))
            .arg(dir.join(leaf))
            .output()
            .expect("openssl is installed (.ci/run installs it)");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains(": OK"),
            "openssl verify -x509_strict {leaf}: {}",
            show(&out)
        );
    }
    // The CA itself, checked as its own anchor.
    let out = Command::new("openssl")
        .args(["verify", "-x509_strict", "-CAfile"])
        .arg(dir.join("ca.pem"))
        .arg(dir.join("ca.pem"))
        .output()
        .unwrap();
    assert!(out.status.success(), "CA: {}", show(&out));
}

/// A Python client as of 3.13's defaults (`VERIFY_X509_STRICT`), presenting the dev client
/// certificate, connects and is authenticated by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_client_with_strict_verification_connects() {
    let certs = TestCerts::new();
    let server = TestServer::start(test_config(&certs)).await;
    let p = &certs.paths;
    let script = r#"
import socket, ssl, sys
ca, cert, key, port = sys.argv[1:5]
ctx = ssl.create_default_context(cafile=ca)
ctx.verify_flags |= ssl.VERIFY_X509_STRICT
ctx.load_cert_chain(cert, key)
with socket.create_connection(("127.0.0.1", int(port)), timeout=5) as raw:
    with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(b"WHOAMI\n")
        print(tls.recv(256).decode().strip())
"#;
    let args = [
        p.ca_cert.clone(),
        p.client_cert.clone(),
        p.client_key.clone(),
    ];
    let port = server.addr.port().to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg("-c")
            .arg(script)
            .args(&args)
            .arg(port)
            .output()
            .expect("python3 is installed (.ci/run installs it)")
    });
    let out = tokio::time::timeout(Duration::from_secs(20), out)
        .await
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.starts_with("OK identity=dev-client "),
        "{}",
        show(&out)
    );
}

#[test]
fn certs_generate_never_replaces_a_file_without_force() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("certs");
    std::fs::create_dir(&dir).unwrap();
    let ca_key = dir.join("ca.key");
    std::fs::write(&ca_key, "the CA key every certificate depends on").unwrap();

    let out = generate(&dir, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("ca.key") && stderr.contains("--force"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(&ca_key).unwrap(),
        "the CA key every certificate depends on"
    );
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["ca.key"], "nothing else was written");

    // A key file someone made world-readable, and holds open, before `--force`: the new
    // key goes to a new file (0600 from its first byte), never into theirs.
    std::fs::set_permissions(&ca_key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut held = std::fs::File::open(&ca_key).unwrap();
    let out = generate(&dir, &["--force"]);
    assert!(out.status.success(), "{}", show(&out));
    for key in ["ca.key", "server.key", "client.key"] {
        assert_eq!(mode(&dir.join(key)), 0o600, "{key}");
        let text = std::fs::read_to_string(dir.join(key)).unwrap();
        assert!(text.contains("BEGIN PRIVATE KEY"), "{key}: {text}");
    }
    let mut seen = String::new();
    held.read_to_string(&mut seen).unwrap();
    assert_eq!(seen, "the CA key every certificate depends on");
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}
