//! Observability: every path shows in `/metrics`, promtool accepts the scrape, a real
//! Prometheus scrapes it, `/readyz` follows the drain, and security logs are rate-limited.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use portcullis::config::Config;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn scrape(admin: SocketAddr) -> String {
    tokio::task::spawn_blocking(move || http_get(admin, "/metrics"))
        .await
        .unwrap()
        .expect("scrape")
        .1
}

async fn server_with(certs: &TestCerts, edit: impl FnOnce(&mut Config)) -> TestServer {
    let mut config = test_config(certs);
    edit(&mut config);
    TestServer::start(config).await
}

/// Connects from `source` and waits until the gateway closes the socket.
async fn refused(addr: SocketAddr, source: u8) {
    // A reset can arrive before connect() returns: that is a refusal too.
    let Ok(mut tcp) = tcp_connect(addr, src(source)).await else {
        return;
    };
    let _ = tcp.write_all(&[0x16]).await;
    let mut buf = [0u8; 8];
    let r = tokio::time::timeout(Duration::from_secs(3), tcp.read(&mut buf)).await;
    assert!(
        matches!(r, Ok(Ok(0)) | Ok(Err(_))),
        "connection from .{source} was not refused"
    );
}

/// This binary's tests share one process-wide recorder: this one test drives every path
/// in sequence and compares a scrape before and after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_path_is_counted() {
    let certs = TestCerts::new();
    let main = server_with(&certs, |c| {
        c.limits.idle_timeout = Duration::from_millis(300)
    })
    .await;
    let before = scrape(main.admin).await;

    // Commands, token and mTLS auth, both framings.
    let mut c = Client::connect_with(main.addr, &certs, from(40))
        .await
        .unwrap();
    for line in [
        "PING",
        "HELP",
        "AUTH wrong",
        &format!("AUTH {ALICE_TOKEN}"),
        "ECHO x",
        "WHOAMI",
        "NOPE",
        "QUIT",
    ] {
        c.request_line(line).await;
    }
    let mtls = ClientOptions {
        identity: Some((
            certs.paths.client_cert.clone(),
            certs.paths.client_key.clone(),
        )),
        source: src(41),
        ..Default::default()
    };
    let mut m = Client::connect_with(main.addr, &certs, mtls).await.unwrap();
    assert_eq!(m.request_frame(b"ECHO bin").await, b"OK bin");
    // Oversize frame and line.
    let mut f = Client::connect_with(main.addr, &certs, from(42))
        .await
        .unwrap();
    f.send(&[0, 0xFF, 0xFF, 0xFF]).await;
    f.read_frame().await;
    drop(f); // ends the gateway's discard phase, so the close is counted now
    let mut l = Client::connect_with(main.addr, &certs, from(43))
        .await
        .unwrap();
    l.send(&[b'x'; 5000]).await;
    l.read_line().await;
    drop(l);
    // Idle timeout.
    let mut idle = Client::connect_with(main.addr, &certs, from(44))
        .await
        .unwrap();
    idle.expect_closed().await;
    drop(m);

    // Each rejection reason, on a gateway configured to trigger it.
    let s = server_with(&certs, |c| {
        c.access.deny = vec!["127.0.0.45/32".parse().unwrap()]
    })
    .await;
    refused(s.addr, 45).await;
    let s = server_with(&certs, |c| c.auth.max_failures = 1).await;
    let mut b = Client::connect_with(s.addr, &certs, from(46))
        .await
        .unwrap();
    b.request_line("AUTH x").await;
    b.request_line("AUTH y").await;
    refused(s.addr, 46).await;
    let s = server_with(&certs, |c| c.limits.connection_burst_per_ip = 1).await;
    let _held = tcp_connect(s.addr, src(47)).await.unwrap();
    wait_active(&s.gateway, 1).await;
    refused(s.addr, 47).await;
    let s = server_with(&certs, |c| c.limits.max_connections_per_ip = 1).await;
    let _held = tcp_connect(s.addr, src(48)).await.unwrap();
    wait_active(&s.gateway, 1).await;
    refused(s.addr, 48).await;
    let s = server_with(&certs, |c| c.limits.max_connections = 1).await;
    let _held = tcp_connect(s.addr, src(49)).await.unwrap();
    wait_active(&s.gateway, 1).await;
    refused(s.addr, 50).await;
    let s = server_with(&certs, |c| c.limits.max_handshakes_per_ip = 1).await;
    let mut stall = tcp_connect(s.addr, src(51)).await.unwrap();
    stall.write_all(&[0x16]).await.unwrap();
    for _ in 0..1000 {
        if s.gateway.admission.handshakes_in_flight() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    refused(s.addr, 51).await;

    let after = scrape(main.admin).await;
    let delta = |series: &str| sample(&after, series) - sample(&before, series);
    for reason in [
        "denied",
        "banned",
        "rate_limited",
        "per_ip_cap",
        "max_connections",
        "handshake_capacity",
    ] {
        let rejected = format!("portcullis_connections_rejected_total{{reason=\"{reason}\"}}");
        assert!(delta(&rejected) >= 1.0, "{rejected} did not move");
        let event = format!("portcullis_security_events_total{{kind=\"{reason}\"}}");
        assert!(delta(&event) >= 1.0, "{event} did not move");
    }
    for kind in ["oversize_frame", "oversize_line", "auth_failed"] {
        let event = format!("portcullis_security_events_total{{kind=\"{kind}\"}}");
        assert!(delta(&event) >= 1.0, "{event} did not move");
    }
    for (series, at_least) in [
        ("portcullis_connections_accepted_total", 10.0),
        // The accept loop times every accepted connection, refused ones included.
        ("portcullis_accept_duration_seconds_count", 10.0),
        (
            "portcullis_connections_closed_total{reason=\"too_large\"}",
            2.0,
        ),
        (
            "portcullis_connections_closed_total{reason=\"idle_timeout\"}",
            1.0,
        ),
        ("portcullis_connections_closed_total{reason=\"quit\"}", 1.0),
        (
            "portcullis_connections_closed_total{reason=\"banned\"}",
            1.0,
        ),
        (
            "portcullis_auth_total{method=\"token\",result=\"failed\"}",
            1.0,
        ),
        ("portcullis_auth_total{method=\"token\",result=\"ok\"}", 1.0),
        ("portcullis_auth_total{method=\"mtls\",result=\"ok\"}", 1.0),
        (
            "portcullis_tls_handshakes_total{result=\"ok\",version=\"TLSv1_3\"}",
            5.0,
        ),
        ("portcullis_tls_handshake_duration_seconds_count", 5.0),
        ("portcullis_frames_total{direction=\"in\"}", 8.0),
        ("portcullis_bytes_total{direction=\"out\"}", 20.0),
        (
            "portcullis_commands_total{command=\"unknown\",result=\"error\"}",
            1.0,
        ),
        (
            "portcullis_commands_total{command=\"auth\",result=\"error\"}",
            1.0,
        ),
    ] {
        assert!(
            delta(series) >= at_least,
            "{series} moved by {} (want >= {at_least})",
            delta(series)
        );
    }
    for command in ["ping", "echo", "auth", "whoami", "help", "quit"] {
        let ok = format!("portcullis_commands_total{{command=\"{command}\",result=\"ok\"}}");
        assert!(delta(&ok) >= 1.0, "{ok} did not move");
        let count = format!("portcullis_command_duration_seconds_count{{command=\"{command}\"}}");
        assert!(delta(&count) >= 1.0, "{count} did not move");
    }
    assert!(sample(&after, "portcullis_cert_not_after_timestamp_seconds") > 1.7e9);
    let build_info = format!(
        "portcullis_build_info{{version=\"0.1.0\",rustls=\"{}\",commit=\"{}\"}}",
        locked_rustls_version(),
        source_commit()
    );
    assert_eq!(sample(&after, &build_info), 1.0, "{build_info} in {after}");
    assert!(after.contains("portcullis_limiter_keys{limiter=\"connection_rate\"}"));
    assert!(after.contains("# HELP portcullis_connections_rejected_total"));
    assert!(after.contains("# TYPE portcullis_command_duration_seconds histogram"));

    // No label value is an IP address, a token or an identity.
    for line in after.lines().filter(|l| !l.starts_with('#')) {
        let Some(labels) = line
            .split_once('{')
            .and_then(|(_, rest)| rest.split_once('}'))
            .map(|(l, _)| l)
        else {
            continue;
        };
        for pair in labels.split(',') {
            let value = pair
                .split_once('=')
                .map(|(_, v)| v.trim_matches('"'))
                .unwrap_or("");
            assert!(
                value.parse::<IpAddr>().is_err(),
                "label value is an IP: {line}"
            );
            assert!(
                !value.contains(ALICE_TOKEN) && value != "alice" && value != "dev-client",
                "{line}"
            );
        }
    }

    // connections_active is exact: back to zero once everything is closed.
    drop((c, idle, b, stall));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = scrape(main.admin).await;
        if sample(&now, "portcullis_connections_active") == 0.0 || Instant::now() > deadline {
            assert_eq!(sample(&now, "portcullis_connections_active"), 0.0);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The admin listener's other answers.
    let admin = main.admin;
    let (health, ready, missing) = tokio::task::spawn_blocking(move || {
        (
            http_get(admin, "/healthz").unwrap().0,
            http_get(admin, "/readyz").unwrap().0,
            http_get(admin, "/nope").unwrap().0,
        )
    })
    .await
    .unwrap();
    assert_eq!((health, ready, missing), (200, 200, 404));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_and_a_real_prometheus_accept_the_metrics() {
    let certs = TestCerts::new();
    let gateway = Process::gateway(&certs, "");
    let mut c = Client::authed(gateway.addr, &certs).await;
    for _ in 0..20 {
        assert_eq!(c.request_line("PING").await, "OK PONG");
    }
    let admin = gateway.admin;
    let scrape = tokio::task::spawn_blocking(move || http_get(admin, "/metrics").unwrap().1)
        .await
        .unwrap();

    // promtool check metrics reads the exposition from stdin.
    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool is installed (.ci/run installs the prometheus package)");
    use std::io::Write;
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(scrape.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // A real Prometheus scraping the admin port.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: portcullis\n    static_configs:\n      - targets: ['{admin}']\n"
        ),
    )
    .unwrap();
    let prom_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut prometheus = std::process::Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address={prom_addr}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("prometheus is installed");
    let result = tokio::task::spawn_blocking(move || {
        let query = |q: &str| http_get(prom_addr, &format!("/api/v1/query?query={}", urlencode(q)));
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut up = false;
        while Instant::now() < deadline {
            if let Ok((200, body)) = query("up{job=\"portcullis\"} == 1") {
                if body.contains("\"result\":[{") {
                    up = true;
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        let accepted = query("portcullis_connections_accepted_total").map(|r| r.1).unwrap_or_default();
        let quantile = query("histogram_quantile(0.5, sum by (le) (portcullis_command_duration_seconds_bucket{command=\"ping\"}))")
            .map(|r| r.1)
            .unwrap_or_default();
        (up, accepted, quantile)
    })
    .await
    .unwrap();
    let _ = prometheus.kill();
    let _ = prometheus.wait();
    let (up, accepted, quantile) = result;
    assert!(up, "Prometheus never reported the target up");
    assert!(
        accepted.contains("\"result\":[{"),
        "no accepted series: {accepted}"
    );
    assert!(
        quantile.contains("\"result\":[{"),
        "no quantile: {quantile}"
    );
    assert!(
        !quantile.contains("NaN"),
        "quantile has no data: {quantile}"
    );
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_turns_503_on_sigterm_while_healthz_stays_200() {
    let certs = TestCerts::new();
    let mut gateway = Process::gateway(&certs, "");
    let admin = gateway.admin;
    let get = move |path: &'static str| http_get(admin, path).map(|r| r.0).unwrap_or(0);
    assert_eq!(
        tokio::task::spawn_blocking(move || (get("/healthz"), get("/readyz")))
            .await
            .unwrap(),
        (200, 200)
    );
    // A request in flight keeps the process draining for a while.
    let mut busy = Client::authed(gateway.addr, &certs).await;
    busy.send(b"ECHO half").await;
    gateway.signal(libc::SIGTERM);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        tokio::task::spawn_blocking(move || (get("/healthz"), get("/readyz")))
            .await
            .unwrap(),
        (200, 503)
    );
    busy.send(b"\n").await;
    assert_eq!(busy.read_line().await, "OK half");
    let status = tokio::task::spawn_blocking(move || gateway.wait_exit(Duration::from_secs(10)))
        .await
        .unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_refusals_writes_few_log_lines() {
    let certs = TestCerts::new();
    let gateway = Process::gateway(&certs, "[access]\ndeny = [\"127.0.0.60/32\"]\n");
    for _ in 0..1000 {
        if let Ok(tcp) = tcp_connect(gateway.addr, src(60)).await {
            drop(tcp);
        }
    }
    // The summary of held-back lines comes once their one-second window is over.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !gateway.stderr().contains("suppressed") && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let admin = gateway.admin;
    let scrape = tokio::task::spawn_blocking(move || http_get(admin, "/metrics").unwrap().1)
        .await
        .unwrap();
    let refused = sample(
        &scrape,
        "portcullis_connections_rejected_total{reason=\"denied\"}",
    );
    assert!(refused >= 900.0, "only {refused} refusals counted");
    let stderr = gateway.stderr();
    let lines = stderr
        .lines()
        .filter(|l| l.contains("security event"))
        .count();
    assert!(lines > 0, "no security log at all: {stderr}");
    assert!(lines < 100, "{lines} log lines for 1000 refusals");
    assert!(
        stderr.contains("suppressed"),
        "no summary of suppressed lines"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_connections_are_capped_and_idle_ones_closed() {
    let certs = TestCerts::new();
    let server = server_with(&certs, |c| {
        c.admin.max_connections = 4;
        c.admin.idle_timeout = Duration::from_millis(1500);
    })
    .await;
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(tcp_connect(server.admin, None).await.unwrap());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // At the cap a new connection is served and the oldest one is closed to make room.
    let admin = server.admin;
    let status = tokio::task::spawn_blocking(move || http_get(admin, "/healthz").unwrap().0)
        .await
        .unwrap();
    assert_eq!(status, 200, "a fifth admin connection is served");
    let mut buf = [0u8; 16];
    let mut oldest = idle.remove(0);
    // Well before its idle timeout: it was evicted.
    let r = tokio::time::timeout(Duration::from_millis(300), oldest.read(&mut buf)).await;
    assert!(
        matches!(r, Ok(Ok(0)) | Ok(Err(_))),
        "the oldest admin connection was kept: {r:?}"
    );
    // The idle ones are closed after admin.idle_timeout, and the listener answers again.
    for mut tcp in idle {
        let r = tokio::time::timeout(Duration::from_secs(4), tcp.read(&mut buf)).await;
        assert!(
            matches!(r, Ok(Ok(0)) | Ok(Err(_))),
            "an idle admin connection was kept: {r:?}"
        );
    }
    let status = tokio::task::spawn_blocking(move || http_get(admin, "/healthz").unwrap().0)
        .await
        .unwrap();
    assert_eq!(status, 200);
}

/// The rustls version Cargo.lock pins (what `cargo build --locked` built).
fn locked_rustls_version() -> String {
    let lock = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.lock")).unwrap();
    let at = lock
        .find("name = \"rustls\"\nversion = \"")
        .expect("rustls in Cargo.lock");
    let (_, rest) = lock[at..].split_once("version = \"").unwrap();
    rest.split('"').next().unwrap().to_string()
}

/// The commit the build came from, as `git` says, or "unknown" without git.
fn source_commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// The soft RLIMIT_NOFILE of a process, from /proc.
fn soft_nofile(pid: u32) -> f64 {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files");
    line.split_whitespace().nth(3).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_metrics_describe_the_gateway_process_at_each_scrape() {
    let certs = TestCerts::new();
    let gateway = Process::gateway(&certs, "");
    let pid = gateway.child.id();
    let before = scrape(gateway.admin).await;
    for (name, kind) in [
        ("process_cpu_seconds_total", "counter"),
        ("process_resident_memory_bytes", "gauge"),
        ("process_open_fds", "gauge"),
        ("process_max_fds", "gauge"),
        ("process_start_time_seconds", "gauge"),
    ] {
        assert!(
            before.contains(&format!("# TYPE {name} {kind}")),
            "{name}: {before}"
        );
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let started = sample(&before, "process_start_time_seconds");
    assert!(
        started > now - 120.0 && started <= now + 1.0,
        "started {started}, now {now}"
    );
    assert!(sample(&before, "process_resident_memory_bytes") > 1e6);
    assert_eq!(sample(&before, "process_max_fds"), soft_nofile(pid));
    let open_before = sample(&before, "process_open_fds");
    assert!(open_before > 0.0 && open_before < sample(&before, "process_max_fds"));

    // Twenty more connections are twenty more descriptors, seen by the next scrape.
    let mut held = Vec::new();
    for _ in 0..20 {
        held.push(Client::authed(gateway.addr, &certs).await);
    }
    let after = scrape(gateway.admin).await;
    assert_eq!(sample(&after, "portcullis_connections_active"), 20.0);
    let open_after = sample(&after, "process_open_fds");
    assert!(
        open_after >= open_before + 20.0,
        "{open_before} -> {open_after}"
    );
    assert!(
        sample(&after, "process_cpu_seconds_total") >= sample(&before, "process_cpu_seconds_total")
    );
    drop(held);
}
