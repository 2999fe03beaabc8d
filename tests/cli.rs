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

#[test]
fn a_bad_duration_shows_a_valid_one_and_names_its_variable() {
    let certs = TestCerts::new();
    let example = r#"use e.g. "10s", "5m", "1h30m""#;
    let bad = write_config_named(&certs, "bad.toml", "[limits]\nidle_timeout = \"soon\"\n");
    let out = portcullis(&["check-config", "--config", bad.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("limits.idle_timeout"),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains(example), "{}", stderr(&out));

    let good = write_config(&certs, "");
    let out = portcullis(
        &["check-config", "--config", good.to_str().unwrap()],
        &[("PORTCULLIS_LIMITS_IDLE_TIMEOUT", "soon")],
    );
    assert_eq!(out.status.code(), Some(1));
    let text = stderr(&out);
    assert!(
        text.contains("environment variable PORTCULLIS_LIMITS_IDLE_TIMEOUT: limits.idle_timeout"),
        "{text}"
    );
    assert!(text.contains(example), "{text}");
}

#[test]
fn a_missing_config_file_is_said_once() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.toml");
    for command in ["serve", "check-config"] {
        let out = portcullis(&[command, "--config", missing.to_str().unwrap()], &[]);
        assert_eq!(out.status.code(), Some(1), "{command}");
        let text = stderr(&out);
        assert!(text.contains("nope.toml"), "{command}: {text}");
        assert_eq!(
            text.matches("No such file or directory").count(),
            1,
            "{command}: {text}"
        );
    }
}

#[test]
fn an_invalid_log_level_is_an_error() {
    let certs = TestCerts::new();
    let config = write_config(&certs, "");
    for command in ["serve", "check-config"] {
        let out = portcullis(
            &[
                command,
                "--config",
                config.to_str().unwrap(),
                "--log-level",
                "verbose",
            ],
            &[],
        );
        assert_eq!(out.status.code(), Some(1), "{command}: {}", stderr(&out));
        let text = stderr(&out);
        assert!(
            text.contains("--log-level: \"verbose\" is not a log level"),
            "{command}: {text}"
        );
    }
    // A real filter is accepted.
    let out = portcullis(
        &[
            "check-config",
            "--config",
            config.to_str().unwrap(),
            "--log-level",
            "info,portcullis=debug",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn a_port_in_use_is_said_once() {
    let certs = TestCerts::new();
    let config = write_config(&certs, "");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = portcullis(
        &[
            "serve",
            "--config",
            config.to_str().unwrap(),
            "--listen",
            &addr,
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let text = stderr(&out);
    assert!(text.contains(&addr), "{text}");
    assert_eq!(text.matches("Address already in use").count(), 1, "{text}");
}
