//! The built binary, spawned: dev bootstrap, graceful shutdown on SIGTERM, and the real
//! `openssl s_client` (installed by .ci/run).

mod support;

use std::time::Duration;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_requests_closes_idle_ones_and_exits_0() {
    let certs = TestCerts::new();
    let mut gateway = Process::gateway(&certs, "");

    let mut idle = Client::authed(gateway.addr, &certs).await;
    let mut busy = Client::authed(gateway.addr, &certs).await;
    busy.send(b"ECHO in-fl").await; // half a request: in flight
    tokio::time::sleep(Duration::from_millis(100)).await;

    gateway.signal(libc::SIGTERM);
    // The idle connection is closed with close_notify...
    idle.expect_closed().await;
    // ...the in-flight request completes and gets its reply, then the close.
    tokio::time::sleep(Duration::from_millis(200)).await;
    busy.send(b"ight\n").await;
    assert_eq!(busy.read_line().await, "OK in-flight");
    busy.expect_closed().await;
    // New connections are no longer accepted.
    assert!(
        tcp_connect(gateway.addr, None).await.is_err() || {
            let r = Client::connect_with(gateway.addr, &certs, ClientOptions::default()).await;
            r.is_err()
        }
    );
    let status = tokio::task::spawn_blocking(move || gateway.wait_exit(Duration::from_secs(10)))
        .await
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_skips_the_drain_wait() {
    let certs = TestCerts::new();
    let mut gateway = Process::gateway(&certs, "");
    let mut busy = Client::authed(gateway.addr, &certs).await;
    busy.send(b"ECHO never-finished").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    gateway.signal(libc::SIGTERM);
    tokio::time::sleep(Duration::from_millis(200)).await;
    gateway.signal(libc::SIGINT);
    // drain_timeout is 5 s; the second signal ends it at once.
    let status = tokio::task::spawn_blocking(move || gateway.wait_exit(Duration::from_secs(3)))
        .await
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
    busy.expect_closed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_bootstrap_in_an_empty_directory_prints_a_working_token() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"];
    let mut first = Process::spawn(dir.path(), &args);
    let out = first.stdout_with("connect:");
    let token = out
        .lines()
        .find_map(|l| l.strip_prefix("dev token:"))
        .map(|t| t.trim().to_string())
        .unwrap_or_else(|| panic!("no token printed: {out}"));
    // The hint names the address actually bound.
    let connect = format!(
        "openssl s_client -connect {} -CAfile certs/ca.pem -quiet",
        first.addr
    );
    assert!(out.contains(&connect), "{out}");
    for file in [
        "ca.pem",
        "server.pem",
        "server.key",
        "client.pem",
        "client.key",
        "dev-token",
    ] {
        assert!(
            dir.path().join("certs").join(file).exists(),
            "{file} missing"
        );
    }
    let ca = dir.path().join("certs/ca.pem");
    let mut c = Client::connect_ca(first.addr, &ca, ClientOptions::default())
        .await
        .unwrap();
    assert_eq!(c.request_line("PING").await, "OK PONG");
    assert_eq!(c.request_line(&format!("AUTH {token}")).await, "OK dev");
    first.signal(libc::SIGTERM);
    let status = tokio::task::spawn_blocking(move || first.wait_exit(Duration::from_secs(10)))
        .await
        .unwrap();
    assert!(status.success());

    // A second run reuses everything and prints the same token.
    let second = Process::spawn(dir.path(), &args);
    let out = second.stdout_with("connect:");
    assert!(out.contains(&token), "{out}");
    assert!(!out.contains("created"), "{out}");
    let mut c = Client::connect_ca(second.addr, &ca, ClientOptions::default())
        .await
        .unwrap();
    assert_eq!(c.request_line(&format!("AUTH {token}")).await, "OK dev");
}

#[tokio::test]
async fn check_config_accepts_valid_and_names_the_bad_key() {
    let certs = TestCerts::new();
    let good = write_config(&certs, "");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["check-config", "--config", good.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("max_frame_bytes = 65536"));

    let bad = write_config_named(
        &certs,
        "bad.toml",
        "[protocol]\nmax_frame_bytes = 16777216\n",
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["check-config", "--config", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("protocol.max_frame_bytes"));

    std::fs::write(&certs.paths.server_key, "not a key").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["check-config", "--config", good.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("tls.key"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A duration too long for an `Instant` used to pass `check-config` and then panic every
/// connection; it is refused at load, naming the variable that set it.
#[tokio::test]
async fn check_config_refuses_a_huge_duration_naming_its_variable() {
    let certs = TestCerts::new();
    let config = write_config(&certs, "");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["check-config", "--config", config.to_str().unwrap()])
        .env("PORTCULLIS_LIMITS_IDLE_TIMEOUT", "400000000000y")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("PORTCULLIS_LIMITS_IDLE_TIMEOUT"),
        "{stderr}"
    );
    assert!(stderr.contains("365 days"), "{stderr}");

    let bad = write_config_named(&certs, "zero.toml", "[admin]\nidle_timeout = \"0s\"\n");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["check-config", "--config", bad.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("admin.idle_timeout"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_s_client_speaks_text_mode() {
    let certs = TestCerts::new();
    let server = TestServer::start(test_config(&certs)).await;
    let input = format!("PING\nAUTH {ALICE_TOKEN}\nECHO hello from openssl\nWHOAMI\nQUIT\n");
    let ca = certs.paths.ca_cert.clone();
    let connect = server.addr.to_string();
    let output = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        use std::process::{Command, Stdio};
        let mut child = Command::new("openssl")
            .args([
                "s_client",
                "-connect",
                &connect,
                "-CAfile",
                ca.to_str().unwrap(),
                "-quiet",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("openssl is installed (.ci/run installs it)");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    });
    let output = tokio::time::timeout(Duration::from_secs(20), output)
        .await
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("verify return:1"),
        "certificate not verified: {stderr}"
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 5, "{stdout}");
    assert_eq!(
        &lines[..3],
        ["OK PONG", "OK alice", "OK hello from openssl"]
    );
    assert!(
        lines[3].starts_with("OK identity=alice ip=127.0.0.1 tls=TLSv1_3"),
        "{stdout}"
    );
    assert_eq!(lines[4], "OK BYE");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_loop_survives_running_out_of_file_descriptors() {
    let certs = TestCerts::new();
    let config = write_config(
        &certs,
        "[limits]\nconnection_rate_per_ip = 1000\nconnection_burst_per_ip = 1000\n",
    );
    let gateway = Process::gateway_with_nofile(&config, 48);
    // Far more connections than descriptors: accept fails with EMFILE for a while.
    let mut held = Vec::new();
    for _ in 0..80 {
        if let Ok(tcp) = tcp_connect(gateway.addr, None).await {
            held.push(tcp);
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(held);
    // Once descriptors are free again, the gateway serves as before.
    let mut served = false;
    for _ in 0..50 {
        if let Ok(mut c) =
            Client::connect_with(gateway.addr, &certs, ClientOptions::default()).await
        {
            if c.request_line("PING").await == "OK PONG" {
                served = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        served,
        "the gateway stopped serving after EMFILE: {}",
        gateway.stderr()
    );
    assert!(
        gateway.stderr().contains("accept failed"),
        "EMFILE was not hit: {}",
        gateway.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_command_reports_the_admin_endpoint() {
    let certs = TestCerts::new();
    let gateway = Process::gateway(&certs, "");
    let run = |url: String| {
        std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args(["healthcheck", "--url", &url])
            .output()
            .unwrap()
    };
    let ok = run(format!("http://{}/healthz", gateway.admin));
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let not_found = run(format!("http://{}/nope", gateway.admin));
    assert_eq!(not_found.status.code(), Some(1));
    drop(gateway);
    let down = run("http://127.0.0.1:1/healthz".to_string());
    assert_eq!(down.status.code(), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_delay_keeps_serving_new_connections_with_readyz_503() {
    let certs = TestCerts::new();
    let mut gateway = Process::gateway_with_env(
        &certs,
        "",
        &[("PORTCULLIS_SERVER_SHUTDOWN_DELAY", "1500ms")],
    );
    gateway.signal(libc::SIGTERM);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let admin = gateway.admin;
    let ready = tokio::task::spawn_blocking(move || http_get(admin, "/readyz").unwrap().0)
        .await
        .unwrap();
    assert_eq!(ready, 503);
    // Within the delay a new connection is served as usual, request after request.
    let mut late = Client::authed(gateway.addr, &certs).await;
    for _ in 0..3 {
        assert_eq!(late.request_line("PING").await, "OK PONG");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // After it, the idle connection is closed and the process exits 0.
    late.expect_closed().await;
    let status = tokio::task::spawn_blocking(move || gateway.wait_exit(Duration::from_secs(10)))
        .await
        .unwrap();
    assert!(status.success());
}

/// As the image's HEALTHCHECK runs it: `portcullis healthcheck` with no `--url` finds the
/// admin listener from `PORTCULLIS_ADMIN_LISTEN`, with no configuration file at all, and
/// from `./portcullis.toml` in its working directory (the image's WORKDIR).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_without_url_follows_the_environment_and_the_config() {
    let certs = TestCerts::new();
    let gateway = Process::gateway(&certs, "");
    let admin = gateway.admin.to_string();
    let healthcheck = move |dir: std::path::PathBuf, env: Vec<(&'static str, String)>| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"));
        cmd.arg("healthcheck").current_dir(dir).envs(env);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PORTCULLIS_") {
                cmd.env_remove(key);
            }
        }
        cmd.output().unwrap()
    };
    let empty = tempfile::tempdir().unwrap();
    let run = |dir: &std::path::Path, env: Vec<(&'static str, String)>| {
        let dir = dir.to_path_buf();
        tokio::task::spawn_blocking(move || healthcheck(dir, env))
    };
    let out = run(
        empty.path(),
        vec![("PORTCULLIS_ADMIN_LISTEN", admin.clone())],
    )
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "no config file, PORTCULLIS_ADMIN_LISTEN={admin}: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let workdir = tempfile::tempdir().unwrap();
    std::fs::write(
        workdir.path().join("portcullis.toml"),
        format!("[admin]\nlisten = \"{admin}\"\n"),
    )
    .unwrap();
    let out = run(workdir.path(), Vec::new()).await.unwrap();
    assert!(
        out.status.success(),
        "./portcullis.toml with admin.listen = {admin}: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // And it fails when the variable points where nothing answers.
    let out = run(
        empty.path(),
        vec![("PORTCULLIS_ADMIN_LISTEN", "127.0.0.1:1".to_string())],
    )
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
}
