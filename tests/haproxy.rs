//! The compose topology, natively on loopback: a client → HAProxy (send-proxy-v2, health
//! checks on /readyz) → two portcullis replicas → scraped by Prometheus. It runs the very
//! files docker/compose.yaml mounts (haproxy.cfg, portcullis.toml, prometheus.yml), with
//! loopback addresses given through the environment as compose gives container names.

mod support;

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use portcullis::bootstrap::{default_sans, generate_certs, CertPaths};
use support::redis_server::RedisServer;
use support::*;

fn docker_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("docker")
        .join(name)
}

/// A child process whose output is collected; killed on drop.
struct Service {
    child: Child,
    output: Arc<Mutex<String>>,
}

impl Service {
    fn spawn(mut command: Command) -> Service {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("installed by .ci/run");
        let output = Arc::new(Mutex::new(String::new()));
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let sink = output.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    sink.lock().unwrap().push_str(&line);
                    sink.lock().unwrap().push('\n');
                }
            });
        }
        Service { child, output }
    }

    fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A replica running docker/portcullis.toml, with loopback addresses from the environment
/// (Redis included).
fn replica(dir: &Path, redis: &RedisServer) -> Process {
    let mut command = Command::new(env!("CARGO_BIN_EXE_portcullis"));
    command
        .args(["--config", dir.join("portcullis.toml").to_str().unwrap()])
        .env("PORTCULLIS_SERVER_LISTEN", "127.0.0.1:0")
        .env("PORTCULLIS_ADMIN_LISTEN", "127.0.0.1:0")
        .env("PORTCULLIS_PROXY_PROTOCOL_TRUSTED", "127.0.0.1/32")
        .env("PORTCULLIS_LOG_FORMAT", "text")
        .env("PORTCULLIS_SERVER_SHUTDOWN_DELAY", "2s")
        .env("PORTCULLIS_SERVER_DRAIN_TIMEOUT", "5s")
        .env("PORTCULLIS_CLUSTER_REDIS", redis.url())
        .env("PORTCULLIS_LIMITS_CONNECTION_RATE_PER_IP", RATE.to_string())
        .env(
            "PORTCULLIS_LIMITS_CONNECTION_BURST_PER_IP",
            BURST.to_string(),
        );
    Process::spawn_command(command)
}

/// The per-client connection rate and burst of each replica.
const RATE: u32 = 2;
const BURST: u32 = 8;

fn client_options(certs: &CertPaths, source: [u8; 4]) -> ClientOptions {
    ClientOptions {
        identity: Some((certs.client_cert.clone(), certs.client_key.clone())),
        source: Some(IpAddr::from(source)),
        ..Default::default()
    }
}

/// Connect through HAProxy from `source` and ask WHOAMI (mTLS authenticates).
async fn whoami(haproxy: SocketAddr, certs: &CertPaths, source: [u8; 4]) -> Option<String> {
    let mut c = Client::connect_ca(haproxy, &certs.ca_cert, client_options(certs, source))
        .await
        .ok()?;
    c.send_line("WHOAMI").await;
    let mut buf = [0u8; 256];
    use tokio::io::AsyncReadExt;
    let n = tokio::time::timeout(Duration::from_secs(5), c.stream.read(&mut buf))
        .await
        .ok()?
        .ok()?;
    (n > 0).then(|| String::from_utf8_lossy(&buf[..n]).trim_end().to_string())
}

fn prometheus_query(addr: SocketAddr, query: &str) -> String {
    let encoded: String = query
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    http_get(addr, &format!("/api/v1/query?query={encoded}"))
        .map(|r| r.1)
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_two_replicas_and_prometheus() {
    let dir = tempfile::tempdir().unwrap();
    let certs = generate_certs(&dir.path().join("certs"), &default_sans()).unwrap();
    std::fs::copy(
        docker_file("portcullis.toml"),
        dir.path().join("portcullis.toml"),
    )
    .unwrap();
    let redis = RedisServer::start();
    let mut replicas = vec![replica(dir.path(), &redis), replica(dir.path(), &redis)];

    let haproxy_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut command = Command::new("haproxy");
    command
        .args(["-db", "-f", docker_file("haproxy.cfg").to_str().unwrap()])
        .env("HAPROXY_BIND", haproxy_addr.to_string())
        .env("HAPROXY_MAXCONN", "1000");
    for (i, r) in replicas.iter().enumerate() {
        command.env(format!("PORTCULLIS{}_ADDR", i + 1), r.addr.to_string());
        command.env(
            format!("PORTCULLIS{}_ADMIN_PORT", i + 1),
            r.admin.port().to_string(),
        );
    }
    let haproxy = Service::spawn(command);

    let prom_dir = tempfile::tempdir().unwrap();
    let scrape_config = std::fs::read_to_string(docker_file("prometheus.yml"))
        .unwrap()
        .replace("portcullis1:9464", &replicas[0].admin.to_string())
        .replace("portcullis2:9464", &replicas[1].admin.to_string());
    std::fs::write(prom_dir.path().join("prometheus.yml"), scrape_config).unwrap();
    let prom_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut command = Command::new("prometheus");
    command
        .arg(format!(
            "--config.file={}",
            prom_dir.path().join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            prom_dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address={prom_addr}"));
    let _prometheus = Service::spawn(command);

    // Wait for HAProxy to pass traffic.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut first = None;
    while first.is_none() && Instant::now() < deadline {
        first = whoami(haproxy_addr, &certs, [127, 0, 0, 2]).await;
        if first.is_none() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let first = first.unwrap_or_else(|| panic!("no service through HAProxy: {}", haproxy.output()));
    assert!(
        first.starts_with("OK identity=dev-client ip=127.0.0.2 "),
        "{first}"
    );

    // The per-IP rate limit holds across both replicas (cluster mode): 127.0.0.2, pressing
    // through HAProxy (round robin) for 8 s, gets at most 1.25 × (10 × RATE + BURST) in
    // all, where two standalone replicas would each grant BURST + 8 × RATE (48 in all) ...
    let mut served = 1;
    let mut refused = 0;
    let until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < until {
        if whoami(haproxy_addr, &certs, [127, 0, 0, 2]).await.is_some() {
            served += 1;
        } else {
            refused += 1;
        }
    }
    let bound = (10 * RATE + BURST) * 5 / 4;
    eprintln!("127.0.0.2: {served} served, {refused} refused in 8 s");
    assert!(
        refused > 0,
        "127.0.0.2 was never rate limited ({served} served)"
    );
    assert!(
        served <= bound,
        "{served} served through both replicas, over the cluster-wide bound {bound}"
    );
    assert!(served >= BURST, "refused too early, after {served}");
    // ... while 127.0.0.3 is still served.
    let other = whoami(haproxy_addr, &certs, [127, 0, 0, 3])
        .await
        .expect("127.0.0.3 served");
    assert!(other.contains(" ip=127.0.0.3 "), "{other}");

    // Prometheus scrapes both replicas.
    let up = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            let body = prometheus_query(prom_addr, "sum(up{job=\"portcullis\"})");
            if body.contains("\"2\"]") || Instant::now() > deadline {
                return body;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    })
    .await
    .unwrap();
    assert!(
        up.contains("\"2\"]"),
        "Prometheus does not see both replicas up: {up}"
    );

    // SIGTERM replica 1 while a client loop runs through HAProxy.
    let mut victim = replicas.remove(0);
    let loop_certs = certs.clone();
    let client_loop = tokio::spawn(async move {
        let (mut ok, mut failed) = (0, 0);
        let until = Instant::now() + Duration::from_secs(4);
        let mut i = 0u8;
        while Instant::now() < until {
            // Rotate source addresses: this loop is not what the rate limit is about.
            let source = [127, 0, 1, 10 + i % 40];
            i = i.wrapping_add(1);
            match whoami(haproxy_addr, &loop_certs, source).await {
                Some(reply) if reply.starts_with("OK identity=dev-client") => ok += 1,
                _ => failed += 1,
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        (ok, failed)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    victim.signal(libc::SIGTERM);
    let status = tokio::task::spawn_blocking(move || {
        let status = victim.wait_exit(Duration::from_secs(15));
        (status, victim.stderr())
    })
    .await
    .unwrap();
    let (ok, failed) = client_loop.await.unwrap();
    assert!(
        status.0.success(),
        "the replica did not exit 0: {}",
        status.1
    );
    assert_eq!(
        failed, 0,
        "{failed} requests failed ({ok} served) while a replica drained"
    );
    assert!(ok > 20, "the loop barely ran: {ok}");
    let log = haproxy.output();
    assert!(
        log.contains("portcullis1 is DOWN"),
        "HAProxy never marked the replica down: {log}"
    );
}
