//! The command line as an operator meets it, through the built binary: what the
//! environment may hold (Kubernetes service links), and what an error says.

mod support;

use std::process::{Command, Output};

use support::*;

/// The variables Kubernetes injects into every pod of a namespace that has a Service named
/// `portcullis`.
const SERVICE_LINKS: &[(&str, &str)] = &[
    ("PORTCULLIS_PORT", "tcp://10.0.0.1:8443"),
    ("PORTCULLIS_SERVICE_HOST", "10.0.0.1"),
];
const WARNING: &str = "ignoring environment variables that name no configuration key: \
                       PORTCULLIS_PORT, PORTCULLIS_SERVICE_HOST";

fn portcullis(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_portcullis"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PORTCULLIS_") {
            command.env_remove(key);
        }
    }
    command
        .args(args)
        .envs(env.iter().copied())
        .env_remove("RUST_LOG")
        .output()
        .expect("run portcullis")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_kubernetes_service_links_starts_and_warns_once() {
    let certs = TestCerts::new();
    let gateway = Process::gateway_with_env(&certs, "", SERVICE_LINKS);
    let mut client = Client::authed(gateway.addr, &certs).await;
    assert_eq!(client.request_line("PING").await, "OK PONG");
    let log = gateway.stderr();
    assert_eq!(log.matches(WARNING).count(), 1, "{log}");
    assert!(log.contains("WARN"), "logged as a warning: {log}");
}

#[test]
fn check_config_with_kubernetes_service_links_passes_and_warns_once() {
    let certs = TestCerts::new();
    let config = write_config(&certs, "");
    let out = portcullis(
        &["check-config", "--config", config.to_str().unwrap()],
        SERVICE_LINKS,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stderr(&out).matches(WARNING).count(), 1, "{}", stderr(&out));
}

#[test]
fn an_invalid_value_of_a_real_key_still_fails_naming_the_variable() {
    let certs = TestCerts::new();
    let config = write_config(&certs, "");
    let mut env = SERVICE_LINKS.to_vec();
    env.push(("PORTCULLIS_LIMITS_MAX_CONNECTIONS", "lots"));
    let out = portcullis(
        &["check-config", "--config", config.to_str().unwrap()],
        &env,
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("environment variable PORTCULLIS_LIMITS_MAX_CONNECTIONS"),
        "{}",
        stderr(&out)
    );
    let out = portcullis(&["serve", "--config", config.to_str().unwrap()], &env);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("PORTCULLIS_LIMITS_MAX_CONNECTIONS"),
        "{}",
        stderr(&out)
    );
}
