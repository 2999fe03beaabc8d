//! End-to-end load benchmark: a tokio-rustls client driving a TLS server with the
//! scenarios below, each printing one machine-readable `key=value` line.
//!
//! * `handshake` — W workers loop: new TCP connection, full TLS 1.3 handshake (resumption
//!   off), one ECHO, close. Handshakes/s, p50/p99.
//! * `handshake_pq` — the same, offering the post-quantum hybrid X25519MLKEM768 first, as
//!   browsers and OpenSSL 3.5 do (`handshake` offers the classical curves, X25519 first);
//!   each handshake line says which group was negotiated.
//! * `resume` — the same with session resumption (tickets) on.
//! * `steady` — C persistent connections, ECHO of 64 bytes in a closed loop. Requests/s,
//!   p50/p99/p99.9.
//! * `idle` — N idle connections (each has completed one PING); the server's RSS per
//!   connection (needs the server's pid). `--idle 1000,18000` opens them in steps and
//!   prints a line at each count, with the bytes per connection since the previous count
//!   (`step_bytes_per_connection`): flat when both figures stay the same as N grows.
//! * `scale` — `steady` again with more and more idle connections open (`--scale-idle`,
//!   e.g. `0,5000,15000`; each idle connection completed a handshake and one PING): how
//!   the latency of active clients grows with the number of quiet ones.
//! * `reject` — one source address floods new TCP connections; refusals/s, and the p99 of
//!   a legitimate client's PING from another address meanwhile.
//! * `relay` — like `steady`, but each request is one binary frame of 64 bytes that a
//!   relaying gateway forwards to the raw echo backend (`raw-echo`), which sends it back.
//!   For portcullis in messages mode that is one framed message each way, validated on
//!   both sides; for a byte relay (portcullis stream mode, HAProxy, nginx) the same bytes.
//! * `relay_handshake` — like `handshake`, with one relayed frame: the cost of a new client
//!   connection including the gateway's connection to the backend.
//!
//! The client does not verify the server's certificate chain or handshake signature unless
//! `--verify` ([`SkipServerVerification`]): a load-generator choice that applies to every
//! server equally and keeps the client's CPU per handshake below the server's. Each line
//! ends with the server's CPU time (per operation too) and the load tool's own CPU share:
//! near 1.0 the load tool, not the server, was the bottleneck.
//!
//! `cargo bench --bench load` with no arguments starts the built `portcullis` itself (one
//! worker thread, auth mode none) and runs every scenario briefly; `--redis URL` starts it
//! in cluster mode on that Redis. Against another server
//! (benches/compare.sh): `--target ADDR --ca FILE --pid PID --label NAME`. `backend ADDR`
//! runs the plaintext echo backend that HAProxy and stunnel forward to in the comparison;
//! `raw-echo ADDR` the byte echo that every gateway relays to in benches/relay.sh.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;

#[derive(Parser)]
struct Args {
    /// Server to load; when absent, the built portcullis is started for the run.
    #[arg(long)]
    target: Option<SocketAddr>,
    /// CA that signed the server certificate.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// The server's pid, for RSS (idle scenario).
    #[arg(long)]
    pid: Option<u32>,
    /// portcullis' admin listener: after each scenario, the accept loop's time per
    /// connection is read from its `portcullis_accept_duration_seconds` histogram.
    #[arg(long)]
    admin: Option<SocketAddr>,
    /// Name printed in each result line.
    #[arg(long, default_value = "portcullis")]
    label: String,
    /// Scenarios to run (comma-separated): handshake,handshake_pq,resume,steady,idle,reject.
    #[arg(
        long,
        default_value = "handshake,handshake_pq,resume,steady,idle,reject"
    )]
    scenarios: String,
    #[arg(long, default_value_t = 4)]
    workers: usize,
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Idle connections to hold (idle scenario); several, comma-separated, are reached in
    /// turn with a result line at each.
    #[arg(long, value_delimiter = ',', default_value = "2000")]
    idle: Vec<usize>,
    /// The `scale` scenario's idle-connection counts, ascending (comma-separated).
    #[arg(long, default_value = "0,1000", value_delimiter = ',')]
    scale_idle: Vec<usize>,
    /// Seconds per timed scenario.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Cluster mode for the started portcullis: share its state through this Redis
    /// (`redis://127.0.0.1:6379/0`), to compare with standalone.
    #[arg(long)]
    redis: Option<String>,
    /// Verify the server's certificate chain and handshake signature as a real client does.
    /// Off by default: the load tool then skips that work (see [`SkipServerVerification`])
    /// so that it, not the server under test, is not the bottleneck.
    #[arg(long)]
    verify: bool,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the text protocol in plaintext (PING, ECHO, AUTH → OK): the backend behind
    /// HAProxy and stunnel in the comparison.
    Backend { listen: SocketAddr },
    /// Send back every byte as it arrives: the backend of the relay comparison.
    RawEcho { listen: SocketAddr },
    /// Time the crypto a TLS 1.3 server cannot avoid in one full handshake, with the
    /// provider portcullis uses (rustls on aws-lc-rs): the CertificateVerify signature with
    /// the server's key, and its side of each key exchange group (X25519: a key pair and the
    /// agreement; X25519MLKEM768: that plus the ML-KEM-768 encapsulation). Prints one
    /// `scenario=floor` line per group, in CPU microseconds of this thread.
    Floor {
        /// The server's private key (PEM), e.g. the `server.key` of `portcullis certs generate`.
        #[arg(long)]
        key: PathBuf,
    },
}

fn main() {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        match args.command {
            Some(Command::Backend { listen }) => return backend(listen).await,
            Some(Command::RawEcho { listen }) => return raw_echo(listen).await,
            Some(Command::Floor { key }) => return crypto_floor(&key),
            None => {}
        }
        let local = match args.target {
            Some(_) => None,
            None => Some(LocalServer::start(args.redis.as_deref())),
        };
        let target = args
            .target
            .or(local.as_ref().map(|l| l.addr))
            .expect("a target");
        let ca = args
            .ca
            .clone()
            .or(local.as_ref().map(|l| l.ca.clone()))
            .expect("--ca");
        let pid = args.pid.or(local.as_ref().map(|l| l.child.id()));
        let bench = Bench {
            target,
            ca,
            label: args.label.clone(),
            pid,
            verify: args.verify,
        };
        let admin = args.admin.or(local.as_ref().map(|l| l.admin));
        let duration = Duration::from_secs_f64(args.seconds);
        let (workers, connections) = (args.workers, args.connections);
        for scenario in args.scenarios.split(',') {
            let accepts_before = match admin {
                Some(admin) => accept_times(admin).await,
                None => None,
            };
            match scenario.trim() {
                "handshake" => {
                    bench
                        .handshakes(workers, duration, Exchange::Handshake)
                        .await
                }
                "handshake_pq" => {
                    bench
                        .handshakes(workers, duration, Exchange::HandshakePq)
                        .await
                }
                "resume" => bench.handshakes(workers, duration, Exchange::Resume).await,
                "relay_handshake" => bench.handshakes(workers, duration, Exchange::Relay).await,
                "steady" => {
                    bench
                        .steady(connections, duration, Exchange::Handshake)
                        .await
                }
                "relay" => bench.steady(connections, duration, Exchange::Relay).await,
                "idle" => bench.idle(&args.idle, pid).await,
                "scale" => bench.scale(&args.scale_idle, connections, duration).await,
                "reject" => bench.reject(duration).await,
                other => eprintln!("unknown scenario {other}"),
            }
            if let (Some(admin), Some(before)) = (admin, accepts_before) {
                if let Some(after) = accept_times(admin).await {
                    after.since(&before).print(&args.label, scenario.trim());
                }
            }
        }
        drop(local);
    });
}

struct Bench {
    target: SocketAddr,
    ca: PathBuf,
    label: String,
    /// The server's pid: its CPU time makes results comparable even when the load tool,
    /// not the server, is the bottleneck.
    pid: Option<u32>,
    /// Whether the client verifies the server (`--verify`).
    verify: bool,
}

/// What one request is, and how a connection is set up for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exchange {
    /// A full handshake, then `ECHO` of 64 bytes answered `OK …` (the built-in command).
    Handshake,
    /// The same, offering X25519MLKEM768 first.
    HandshakePq,
    /// The same with session resumption on.
    Resume,
    /// A full handshake, then a 64-byte binary frame echoed back as it is (a relay).
    Relay,
}

impl Exchange {
    fn resumption(self) -> bool {
        self == Exchange::Resume
    }

    /// The key-exchange groups offered, in order: the classical curves, X25519 first, as in
    /// the comparison with HAProxy and stunnel, or the post-quantum hybrid first.
    fn groups(self) -> Vec<&'static dyn rustls::crypto::SupportedKxGroup> {
        use rustls::crypto::aws_lc_rs::kx_group::{SECP256R1, SECP384R1, X25519, X25519MLKEM768};
        match self {
            Exchange::HandshakePq => vec![X25519MLKEM768, X25519],
            _ => vec![X25519, SECP256R1, SECP384R1],
        }
    }

    fn request(self) -> Vec<u8> {
        match self {
            Exchange::Relay => relay_frame(),
            _ => echo_request(),
        }
    }

    /// Reads one reply to [`Exchange::request`]; false when it is not the expected one.
    async fn read_reply<R: tokio::io::AsyncBufRead + Unpin>(
        self,
        reader: &mut R,
        buf: &mut Vec<u8>,
    ) -> std::io::Result<bool> {
        buf.clear();
        match self {
            Exchange::Relay => {
                buf.resize(relay_frame().len(), 0);
                reader.read_exact(buf).await?;
                Ok(*buf == relay_frame())
            }
            _ => {
                let n = reader.read_until(b'\n', buf).await?;
                Ok(n > 0 && buf.starts_with(b"OK "))
            }
        }
    }
}

/// The most idle connections: one source address each, 127.0.20.x to 127.0.97.x (the
/// `reject` scenario uses 127.0.98.1 and 127.0.99.1).
const MAX_IDLE: usize = 78 * 250;

/// One binary frame: `u32` big-endian length 64, then 64 payload bytes.
fn relay_frame() -> Vec<u8> {
    let mut frame = 64u32.to_be_bytes().to_vec();
    frame.extend(std::iter::repeat_n(b'y', 64));
    frame
}

/// The request every scenario sends: ECHO with a 64-byte payload.
fn echo_request() -> Vec<u8> {
    let mut line = b"ECHO ".to_vec();
    line.extend(std::iter::repeat_n(b'x', 64));
    line.push(b'\n');
    line
}

impl Bench {
    fn connector(&self, resumption: bool) -> TlsConnector {
        self.connector_with(resumption, Exchange::Handshake.groups())
    }

    fn connector_with(
        &self,
        resumption: bool,
        groups: Vec<&'static dyn rustls::crypto::SupportedKxGroup>,
    ) -> TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(&self.ca).expect("ca file") {
            roots.add(cert.expect("ca pem")).expect("ca cert");
        }
        let provider = rustls::crypto::CryptoProvider {
            kx_groups: groups,
            ..rustls::crypto::aws_lc_rs::default_provider()
        };
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_root_certificates(roots)
            .with_no_client_auth();
        if !resumption {
            config.resumption = rustls::client::Resumption::disabled();
        }
        if !self.verify {
            let verifier = SkipServerVerification(config.crypto_provider().clone());
            config
                .dangerous()
                .set_certificate_verifier(Arc::new(verifier));
        }
        TlsConnector::from(Arc::new(config))
    }

    async fn connect(
        &self,
        connector: &TlsConnector,
        source: Option<IpAddr>,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let tcp = tcp_from(self.target, source).await?;
        let _ = tcp.set_nodelay(true);
        connector
            .connect(ServerName::try_from("localhost").expect("name"), tcp)
            .await
    }

    /// W workers: connect, handshake, one request, close.
    async fn handshakes(&self, workers: usize, duration: Duration, exchange: Exchange) {
        let connector = self.connector_with(exchange.resumption(), exchange.groups());
        let cpu = self.server_cpu();
        let until = Instant::now() + duration;
        let mut tasks = Vec::new();
        for w in 0..workers {
            let connector = connector.clone();
            let this = Bench {
                target: self.target,
                ca: self.ca.clone(),
                label: String::new(),
                pid: None,
                verify: self.verify,
            };
            tasks.push(tokio::spawn(async move {
                let (mut latencies, mut errors, mut resumed) = (Vec::new(), 0u64, 0u64);
                let mut group = None;
                let mut n = 0u32;
                while Instant::now() < until {
                    // Spread sources over 127.0.x.y so per-IP limits do not shape the result.
                    let source = IpAddr::from([127, 0, 2 + (w as u8), 1 + (n % 200) as u8]);
                    n += 1;
                    let started = Instant::now();
                    match one_request(&this, &connector, source, exchange).await {
                        Ok((was_resumed, negotiated)) => {
                            latencies.push(started.elapsed().as_micros() as u32);
                            resumed += u64::from(was_resumed);
                            group = group.or(negotiated);
                        }
                        Err(_) => errors += 1,
                    }
                }
                (latencies, errors, resumed, group)
            }));
        }
        let (mut all, mut errors, mut resumed, mut group) = (Vec::new(), 0, 0, None);
        for t in tasks {
            let (l, e, r, g) = t.await.expect("worker");
            all.extend(l);
            errors += e;
            resumed += r;
            group = group.or(g);
        }
        let name = match exchange {
            Exchange::Handshake => "handshake",
            Exchange::HandshakePq => "handshake_pq",
            Exchange::Resume => "resume",
            Exchange::Relay => "relay_handshake",
        };
        let group = group.map_or("none".to_string(), |g| format!("{g:?}"));
        println!(
            "scenario={name} server={} workers={workers} group={group} handshakes={} errors={errors} resumed={resumed} rate={:.0} {} {}",
            self.label,
            all.len(),
            all.len() as f64 / duration.as_secs_f64(),
            percentiles(&mut all),
            cpu.report(all.len())
        );
    }

    /// C persistent connections, one 64-byte request at a time in a closed loop.
    async fn steady(&self, connections: usize, duration: Duration, exchange: Exchange) {
        let name = if exchange == Exchange::Relay {
            "relay"
        } else {
            "steady"
        };
        self.steady_as(name, "", connections, duration, exchange)
            .await;
    }

    /// `steady` with each count of `idle_steps` idle connections open in turn (the count
    /// only grows: connections are added, never closed between steps).
    async fn scale(&self, idle_steps: &[usize], connections: usize, duration: Duration) {
        if idle_steps.iter().any(|&n| n > MAX_IDLE) {
            eprintln!("scale: at most {MAX_IDLE} idle connections (one source address each)");
            return;
        }
        let mut held = Vec::new();
        for &idle in idle_steps {
            if let Err(e) = self.open_idle(&mut held, idle).await {
                eprintln!(
                    "scale: opening idle connection {} of {idle}: {e}",
                    held.len() + 1
                );
                return;
            }
            // Let the server settle after the burst of handshakes.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let idle = format!("idle={} ", held.len());
            self.steady_as("scale", &idle, connections, duration, Exchange::Handshake)
                .await;
        }
    }

    /// Opens idle connections (each does one PING) until `held` has `count` of them, each
    /// from its own address ([`idle_source`]); a few at a time.
    async fn open_idle(
        &self,
        held: &mut Vec<tokio_rustls::client::TlsStream<TcpStream>>,
        count: usize,
    ) -> std::io::Result<()> {
        const PARALLEL: usize = 8;
        let connector = self.connector(true);
        while held.len() < count {
            let mut batch = tokio::task::JoinSet::new();
            for i in (held.len()..count).take(PARALLEL) {
                batch.spawn(open_pinged(self.target, connector.clone(), idle_source(i)));
            }
            while let Some(opened) = batch.join_next().await {
                held.push(opened.map_err(std::io::Error::other)??);
            }
        }
        Ok(())
    }

    /// `steady`, its line named `name`, with `extra` (`key=value `) after the server.
    async fn steady_as(
        &self,
        name: &str,
        extra: &str,
        connections: usize,
        duration: Duration,
        exchange: Exchange,
    ) {
        let connector = self.connector(true);
        let mut tasks = Vec::new();
        let mut streams = Vec::new();
        for c in 0..connections {
            let source = IpAddr::from([127, 0, 10, 1 + (c % 250) as u8]);
            streams.push(
                self.connect(&connector, Some(source))
                    .await
                    .expect("connect"),
            );
        }
        let cpu = self.server_cpu();
        let until = Instant::now() + duration;
        for stream in streams {
            tasks.push(tokio::spawn(async move {
                let request = exchange.request();
                let mut stream = BufReader::new(stream);
                let mut reply = Vec::with_capacity(128);
                let mut latencies = Vec::new();
                while Instant::now() < until {
                    let started = Instant::now();
                    if stream.get_mut().write_all(&request).await.is_err() {
                        break;
                    }
                    if !matches!(exchange.read_reply(&mut stream, &mut reply).await, Ok(true)) {
                        break;
                    }
                    latencies.push(started.elapsed().as_micros() as u32);
                }
                latencies
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.expect("connection"));
        }
        println!(
            "scenario={name} server={} {extra}connections={connections} requests={} rate={:.0} {} {}",
            self.label,
            all.len(),
            all.len() as f64 / duration.as_secs_f64(),
            percentiles(&mut all),
            cpu.report(all.len())
        );
    }

    /// Idle connections that each completed one PING, opened up to each of `counts` in
    /// turn; at each, the server's RSS per connection since the start and since the
    /// previous count.
    async fn idle(&self, counts: &[usize], pid: Option<u32>) {
        let Some(pid) = pid else {
            eprintln!("idle: needs --pid");
            return;
        };
        let mut counts = counts.to_vec();
        counts.sort_unstable();
        if counts.last().is_some_and(|&n| n > MAX_IDLE) {
            eprintln!("idle: at most {MAX_IDLE} connections (one source address each)");
            return;
        }
        let connector = self.connector(true);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = rss_kib(pid);
        let (mut previous, mut previous_rss) = (0, before);
        let mut held = Vec::with_capacity(counts.last().copied().unwrap_or(0));
        for count in counts {
            for i in held.len()..count {
                held.push(self.idle_connection(&connector, i).await);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            let after = rss_kib(pid);
            let per = |kib: u64, n: usize| (kib * 1024) as f64 / n.max(1) as f64;
            println!(
                "scenario=idle server={} connections={count} rss_before_kib={before} rss_after_kib={after} bytes_per_connection={:.0} step_bytes_per_connection={:.0}",
                self.label,
                per(after.saturating_sub(before), count),
                per(after.saturating_sub(previous_rss), count - previous),
            );
            (previous, previous_rss) = (count, after);
        }
        drop(held);
    }

    /// The `i`th idle connection: its own source address ([`idle_source`]), one PING
    /// answered, then silence.
    async fn idle_connection(
        &self,
        connector: &TlsConnector,
        i: usize,
    ) -> tokio_rustls::client::TlsStream<TcpStream> {
        let mut stream = self
            .connect(connector, Some(idle_source(i)))
            .await
            .expect("connect");
        stream.write_all(b"PING\n").await.expect("write");
        let mut buf = [0u8; 16];
        let n = stream.read(&mut buf).await.expect("read");
        assert!(buf[..n].starts_with(b"OK"), "bad reply");
        stream
    }

    /// One source floods new TCP connections; another measures PING latency meanwhile.
    async fn reject(&self, duration: Duration) {
        let connector = self.connector(true);
        let stop = Arc::new(AtomicBool::new(false));
        let refused = Arc::new(AtomicU64::new(0));
        let attempts = Arc::new(AtomicU64::new(0));
        let mut floods = Vec::new();
        for _ in 0..4 {
            let (stop, refused, attempts, target) =
                (stop.clone(), refused.clone(), attempts.clone(), self.target);
            floods.push(tokio::spawn(async move {
                let flooder = Some(IpAddr::from([127, 0, 99, 1]));
                while !stop.load(Ordering::Relaxed) {
                    attempts.fetch_add(1, Ordering::Relaxed);
                    match tcp_from(target, flooder).await {
                        Ok(mut tcp) => {
                            // A refusal is a close (or reset) before any byte; an accepted
                            // connection would wait for a ClientHello.
                            let _ = tcp.write_all(&[0x16, 0x03, 0x01]).await;
                            let mut b = [0u8; 1];
                            if let Ok(Ok(0) | Err(_)) =
                                tokio::time::timeout(Duration::from_millis(50), tcp.read(&mut b))
                                    .await
                            {
                                refused.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(_) => {
                            refused.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }));
        }
        let mut legit = BufReader::new(
            self.connect(&connector, Some(IpAddr::from([127, 0, 98, 1])))
                .await
                .expect("legit"),
        );
        let until = Instant::now() + duration;
        let mut latencies = Vec::new();
        let mut line = Vec::new();
        while Instant::now() < until {
            let started = Instant::now();
            legit.get_mut().write_all(b"PING\n").await.expect("ping");
            line.clear();
            legit.read_until(b'\n', &mut line).await.expect("pong");
            latencies.push(started.elapsed().as_micros() as u32);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        stop.store(true, Ordering::Relaxed);
        for f in floods {
            let _ = f.await;
        }
        println!(
            "scenario=reject server={} attempts={} refusals={} refusals_per_s={:.0} legit_pings={} legit_{}",
            self.label,
            attempts.load(Ordering::Relaxed),
            refused.load(Ordering::Relaxed),
            refused.load(Ordering::Relaxed) as f64 / duration.as_secs_f64(),
            latencies.len(),
            percentiles(&mut latencies).replace(' ', " legit_")
        );
    }
}

/// The server's and the load tool's own CPU time (user + system, all threads) at the start
/// of a scenario.
struct CpuMark {
    pid: Option<u32>,
    ticks: u64,
    own_ticks: u64,
    started: Instant,
}

impl Bench {
    fn server_cpu(&self) -> CpuMark {
        CpuMark {
            pid: self.pid,
            ticks: self.pid.map_or(0, cpu_ticks),
            own_ticks: stat_ticks("/proc/self/stat"),
            started: Instant::now(),
        }
    }
}

impl CpuMark {
    /// `server_cpu_s=… per_server_cpu_s=… server_us_per_op=…`: how many operations one
    /// second of the server's CPU did, independent of whether the load tool kept the server
    /// busy; then `client_cpu_share=…`, the load tool's own CPU time over the elapsed time:
    /// near 1.0 (it is pinned to one core) the load tool, not the server, sets the rate.
    fn report(&self, operations: usize) -> String {
        let elapsed = self.started.elapsed().as_secs_f64();
        let own = stat_ticks("/proc/self/stat").saturating_sub(self.own_ticks) as f64 / 100.0;
        let client = format!(
            "client_cpu_s={own:.2} client_cpu_share={:.2}",
            own / elapsed.max(1e-9)
        );
        let Some(pid) = self.pid else {
            return format!("server_cpu_s=0 per_server_cpu_s=0 server_us_per_op=0 {client}");
        };
        // Linux reports CPU time in clock ticks of 1/100 s (USER_HZ).
        let seconds = cpu_ticks(pid).saturating_sub(self.ticks) as f64 / 100.0;
        let per = if seconds > 0.0 {
            operations as f64 / seconds
        } else {
            0.0
        };
        let us_per_op = if operations > 0 {
            seconds * 1e6 / operations as f64
        } else {
            0.0
        };
        format!(
            "server_cpu_s={seconds:.2} per_server_cpu_s={per:.0} server_us_per_op={us_per_op:.0} {client}"
        )
    }
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    stat_ticks(&format!("/proc/{pid}/stat"))
}

/// utime + stime of a `/proc/…/stat` file, in clock ticks.
fn stat_ticks(path: &str) -> u64 {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let field = |n: usize| {
        fields
            .get(n - 3)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(14) + field(15)
}

/// The load tool's server-certificate verifier unless `--verify`: it accepts the server's
/// chain and its handshake signature without checking either. A benchmark-only choice, made
/// the same for every server measured: each server still does all of its own work (it
/// sends its chain and signs the handshake with its key); only the client skips two ECDSA
/// verifications and the chain walk, about as much CPU as the server's whole handshake,
/// which otherwise made the load tool, not the server, set the handshake rate. Never a
/// verifier for anything but a load test.
#[derive(Debug)]
struct SkipServerVerification(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for SkipServerVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    /// The provider's schemes, so the server picks the signature it would pick for a real
    /// client.
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Connect, handshake, one request, close; returns whether the session was resumed and the
/// key-exchange group used.
async fn one_request(
    bench: &Bench,
    connector: &TlsConnector,
    source: IpAddr,
    exchange: Exchange,
) -> std::io::Result<(bool, Option<rustls::NamedGroup>)> {
    let mut stream = bench.connect(connector, Some(source)).await?;
    let conn = stream.get_ref().1;
    let resumed = conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    let group = conn.negotiated_key_exchange_group().map(|g| g.name());
    stream.write_all(&exchange.request()).await?;
    let mut reply = BufReader::new(stream);
    let mut buf = Vec::new();
    if !exchange.read_reply(&mut reply, &mut buf).await? {
        return Err(std::io::Error::other("bad reply"));
    }
    let _ = reply.get_mut().shutdown().await;
    Ok((resumed, group))
}

async fn tcp_from(target: SocketAddr, source: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    socket.connect(target).await
}

/// The source address of the `i`th idle connection (`i` < [`MAX_IDLE`]): 127.0.20.1 to
/// 127.0.97.250, 250 per /24, so per-address limits never refuse it.
fn idle_source(i: usize) -> IpAddr {
    IpAddr::from([127, 0, 20 + (i / 250) as u8, 1 + (i % 250) as u8])
}

/// A new connection from `source` that has done one PING.
async fn open_pinged(
    target: SocketAddr,
    connector: TlsConnector,
    source: IpAddr,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = tcp_from(target, Some(source)).await?;
    let _ = tcp.set_nodelay(true);
    let mut stream = connector
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await?;
    stream.write_all(b"PING\n").await?;
    let mut buf = [0u8; 16];
    let n = stream.read(&mut buf).await?;
    if !buf[..n].starts_with(b"OK") {
        return Err(std::io::Error::other("bad reply to PING"));
    }
    Ok(stream)
}

/// `p50_us=… p99_us=… p999_us=…` of latencies in microseconds.
fn percentiles(latencies: &mut [u32]) -> String {
    if latencies.is_empty() {
        return "p50_us=0 p99_us=0 p999_us=0".into();
    }
    latencies.sort_unstable();
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    format!(
        "p50_us={} p99_us={} p999_us={}",
        at(0.50),
        at(0.99),
        at(0.999)
    )
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The plaintext backend for HAProxy and stunnel: the same replies portcullis gives.
async fn backend(listen: SocketAddr) {
    let listener = TcpListener::bind(listen).await.expect("bind backend");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let (rd, mut wr) = stream.into_split();
            let mut rd = BufReader::new(rd);
            let mut line = Vec::new();
            let mut out = Vec::new();
            loop {
                line.clear();
                match rd.read_until(b'\n', &mut line).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                out.clear();
                match line.strip_prefix(b"ECHO ") {
                    Some(data) => {
                        out.extend_from_slice(b"OK ");
                        out.extend_from_slice(data);
                    }
                    None => out.extend_from_slice(b"OK PONG\n"),
                }
                if wr.write_all(&out).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// Sends back every byte as it arrives, through one fixed buffer per connection.
async fn raw_echo(listen: SocketAddr) {
    let listener = TcpListener::bind(listen).await.expect("bind raw echo");
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let (mut rd, mut wr) = stream.split();
            let _ = tokio::io::copy(&mut rd, &mut wr).await;
        });
    }
}

/// How many rounds each floor operation is timed in; the fastest round counts (the least
/// disturbed by other processes: the floor is what the operation needs, not what it got).
const FLOOR_ROUNDS: usize = 7;
/// The thread CPU time each round runs for.
const FLOOR_ROUND: Duration = Duration::from_millis(60);

/// Prints the server's unavoidable crypto per full TLS 1.3 handshake, per group.
fn crypto_floor(key: &std::path::Path) {
    use rustls::crypto::aws_lc_rs::kx_group::{X25519, X25519MLKEM768};
    use rustls::pki_types::PrivateKeyDer;
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let key = PrivateKeyDer::from_pem_file(key).expect("server key (PEM)");
    let key = provider
        .key_provider
        .load_private_key(key)
        .expect("a key aws-lc-rs can sign with");
    let signer = key
        .choose_scheme(&[
            rustls::SignatureScheme::ECDSA_NISTP256_SHA256,
            rustls::SignatureScheme::ECDSA_NISTP384_SHA384,
            rustls::SignatureScheme::ED25519,
            rustls::SignatureScheme::RSA_PSS_SHA256,
        ])
        .expect("a TLS 1.3 signature scheme for the key");
    // What a TLS 1.3 server signs: 64 spaces, the context string, a zero byte and the
    // transcript hash (RFC 8446 section 4.4.3).
    let mut message = vec![0x20; 64];
    message.extend_from_slice(b"TLS 1.3, server CertificateVerify\0");
    message.extend_from_slice(&[0x5a; 32]);
    let sign_us = cpu_us_per_op(|| {
        signer.sign(&message).expect("sign");
    });
    for group in [X25519, X25519MLKEM768] {
        // The client's share is made once; the server's side of the exchange is timed.
        let client = group.start().expect("client key share");
        let share = client.pub_key().to_vec();
        let kx_us = cpu_us_per_op(|| {
            group.start_and_complete(&share).expect("key exchange");
        });
        println!(
            "scenario=floor group={:?} scheme={:?} sign_us={sign_us:.1} kx_us={kx_us:.1} floor_us={:.1}",
            group.name(),
            signer.scheme(),
            sign_us + kx_us
        );
    }
}

/// CPU microseconds of this thread per call of `op`: the fastest of [`FLOOR_ROUNDS`] rounds.
fn cpu_us_per_op(mut op: impl FnMut()) -> f64 {
    (0..FLOOR_ROUNDS)
        .map(|_| {
            let start = thread_cpu();
            let mut calls = 0u32;
            while thread_cpu() - start < FLOOR_ROUND {
                op();
                calls += 1;
            }
            (thread_cpu() - start).as_secs_f64() * 1e6 / f64::from(calls)
        })
        .fold(f64::INFINITY, f64::min)
}

/// This thread's CPU time (user + system).
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant Linux knows.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// A scrape of the gateway's accept-loop histogram: cumulative counts per bucket bound
/// (seconds), sum (seconds) and count.
struct AcceptTimes {
    buckets: Vec<(f64, u64)>,
    sum: f64,
    count: u64,
}

/// Reads `portcullis_accept_duration_seconds` from the admin listener's `/metrics`.
async fn accept_times(admin: SocketAddr) -> Option<AcceptTimes> {
    const NAME: &str = "portcullis_accept_duration_seconds";
    let mut stream = TcpStream::connect(admin).await.ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n")
        .await
        .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await.ok()?;
    let mut times = AcceptTimes {
        buckets: Vec::new(),
        sum: 0.0,
        count: 0,
    };
    for line in text.lines().filter(|l| l.starts_with(NAME)) {
        let (series, value) = line.rsplit_once(' ')?;
        match &series[NAME.len()..] {
            "_sum" => times.sum = value.parse().ok()?,
            "_count" => times.count = value.parse().ok()?,
            bucket => {
                let le = bucket.strip_prefix("_bucket{le=\"")?.strip_suffix("\"}")?;
                times.buckets.push((le.parse().ok()?, value.parse().ok()?));
            }
        }
    }
    (times.count > 0 || !times.buckets.is_empty()).then_some(times)
}

impl AcceptTimes {
    /// What was recorded between `before` and this scrape.
    fn since(&self, before: &AcceptTimes) -> AcceptTimes {
        let earlier = |le: f64| {
            let found = before.buckets.iter().find(|(b, _)| *b == le);
            found.map_or(0, |(_, n)| *n)
        };
        AcceptTimes {
            buckets: self
                .buckets
                .iter()
                .map(|&(le, n)| (le, n - earlier(le)))
                .collect(),
            sum: self.sum - before.sum,
            count: self.count - before.count,
        }
    }

    /// The smallest bucket bound holding the fraction `q` of the connections.
    fn quantile_bound(&self, q: f64) -> f64 {
        let wanted = (self.count as f64 * q).ceil() as u64;
        let found = self.buckets.iter().find(|(_, n)| *n >= wanted);
        found.map_or(f64::INFINITY, |(le, _)| *le)
    }

    fn print(&self, label: &str, scenario: &str) {
        let mean_us = self.sum / self.count.max(1) as f64 * 1e6;
        println!(
            "scenario=accept_{scenario} server={label} connections={} mean_us={mean_us:.2} p99_le_us={} max_le_us={}",
            self.count,
            self.quantile_bound(0.99) * 1e6,
            self.quantile_bound(1.0) * 1e6,
        );
    }
}

/// The built portcullis, started for a self-contained run: one worker thread, auth off,
/// limits raised except for the `reject` scenario's flooding source.
struct LocalServer {
    child: std::process::Child,
    addr: SocketAddr,
    admin: SocketAddr,
    ca: PathBuf,
    _dir: tempfile::TempDir,
}

impl LocalServer {
    /// Starts it, in cluster mode on `redis` when given.
    fn start(redis: Option<&str>) -> LocalServer {
        use std::io::BufRead;
        let dir = tempfile::tempdir().expect("tempdir");
        let certs = portcullis::bootstrap::generate_certs(
            &dir.path().join("certs"),
            &portcullis::bootstrap::default_sans(),
        )
        .expect("certs");
        let config = dir.path().join("portcullis.toml");
        std::fs::write(&config, BENCH_CONFIG).expect("config");
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args([
                "--config",
                config.to_str().expect("path"),
                "--log-level",
                "warn,portcullis=info",
            ])
            .env("PORTCULLIS_CLUSTER_REDIS", redis.unwrap_or(""))
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("portcullis");
        let stderr = std::io::BufReader::new(child.stderr.take().expect("stderr"));
        let field = |line: &str, key: &str| -> Option<SocketAddr> {
            let rest = line.split(key).nth(1)?;
            rest.split_whitespace().next()?.parse().ok()
        };
        let serving = stderr
            .lines()
            .map_while(Result::ok)
            .find_map(|line| Some((field(&line, "listen=")?, field(&line, "admin=")?)));
        let (addr, admin) = serving.expect("portcullis started");
        LocalServer {
            child,
            addr,
            admin,
            ca: certs.ca_cert,
            _dir: dir,
        }
    }
}

impl Drop for LocalServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The configuration of a benchmark run, shared with benches/compare.sh.
const BENCH_CONFIG: &str = include_str!("bench.toml");
