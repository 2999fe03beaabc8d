//! Shared test plumbing: certificates made with rcgen, an in-process gateway on port 0, and
//! a tokio-rustls client that speaks both framings.
#![allow(dead_code)] // each test binary uses a different part of this module

pub mod admin_api;
pub mod redis_server;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub mod upstream;

use bytes::{Buf, BytesMut};
use portcullis::bootstrap::{generate_certs, CertPaths};
use portcullis::config::{Config, TokenEntry};
use portcullis::gateway::Gateway;
use portcullis::server::Server;
use portcullis::shutdown::Shutdown;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

pub const ALICE_TOKEN: &str = "alice-secret-token";
/// How long a test waits for any one reply before failing (never a hang).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// A CA, server and client certificates in a temporary folder, plus a client certificate
/// from a CA the gateway does not trust.
pub struct TestCerts {
    pub dir: tempfile::TempDir,
    pub paths: CertPaths,
    pub untrusted: CertPaths,
}

impl TestCerts {
    pub fn new() -> TestCerts {
        let dir = tempfile::tempdir().expect("tempdir");
        let sans = portcullis::bootstrap::default_sans();
        let paths = generate_certs(&dir.path().join("trusted"), &sans).expect("certs");
        let untrusted = generate_certs(&dir.path().join("untrusted"), &sans).expect("certs");
        TestCerts {
            dir,
            paths,
            untrusted,
        }
    }
}

/// A configuration for tests: loopback, port 0, the test certificates, one token (alice)
/// and mTLS available.
pub fn test_config(certs: &TestCerts) -> Config {
    let mut c = Config::default();
    c.server.listen = "127.0.0.1:0".parse().unwrap();
    c.admin.listen = "127.0.0.1:0".parse().unwrap();
    c.server.drain_timeout = Duration::from_secs(5);
    c.tls.cert = certs.paths.server_cert.clone();
    c.tls.key = certs.paths.server_key.clone();
    c.tls.client_ca = certs.paths.ca_cert.clone();
    c.auth.tokens = vec![TokenEntry {
        name: "alice".into(),
        sha256: portcullis::auth::token_digest_hex(ALICE_TOKEN),
    }];
    c
}

/// A gateway serving in the test's runtime.
pub struct TestServer {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub shutdown: Shutdown,
    pub gateway: Arc<Gateway>,
    pub task: tokio::task::JoinHandle<()>,
}

impl TestServer {
    pub async fn start(config: Config) -> TestServer {
        config.validate().expect("valid test config");
        let shutdown = Shutdown::new();
        let server = Server::bind(config, shutdown.clone()).expect("bind");
        let addr = server.local_addr().unwrap();
        let admin = server.admin_addr().unwrap();
        let gateway = server.gateway().clone();
        let task = tokio::spawn(server.run());
        TestServer {
            addr,
            admin,
            shutdown,
            gateway,
            task,
        }
    }
}

/// Options of a test client.
#[derive(Default, Clone)]
pub struct ClientOptions {
    /// A client certificate and key to present.
    pub identity: Option<(PathBuf, PathBuf)>,
    /// Bind to this source address (127.0.0.2, ...) before connecting.
    pub source: Option<IpAddr>,
    /// Only TLS 1.2.
    pub tls12_only: bool,
    /// Offer only these key-exchange groups, in this order (default: the provider's).
    pub groups: Option<Vec<&'static dyn rustls::crypto::SupportedKxGroup>>,
    /// Offer only these cipher suites, in this order (default: the provider's).
    pub suites: Option<Vec<rustls::SupportedCipherSuite>>,
}

pub fn client_config(ca: &Path, options: &ClientOptions) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    if let Some(groups) = &options.groups {
        provider.kx_groups = groups.clone();
    }
    if let Some(suites) = &options.suites {
        provider.cipher_suites = suites.clone();
    }
    let provider = Arc::new(provider);
    let versions: &[&rustls::SupportedProtocolVersion] = if options.tls12_only {
        &[&rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots);
    let config = match &options.identity {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .unwrap()
                .map(|c| c.unwrap())
                .collect();
            let key = PrivateKeyDer::from_pem_file(key).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    Arc::new(config)
}

/// Opens a TCP connection, from `source` when given.
pub async fn tcp_connect(addr: SocketAddr, source: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    socket.connect(addr).await
}

/// A TLS client speaking the gateway's protocol.
pub struct Client {
    pub stream: TlsStream<TcpStream>,
    buf: BytesMut,
}

impl Client {
    pub async fn connect(addr: SocketAddr, certs: &TestCerts) -> Client {
        Client::connect_with(addr, certs, ClientOptions::default())
            .await
            .expect("connect")
    }

    pub async fn connect_with(
        addr: SocketAddr,
        certs: &TestCerts,
        options: ClientOptions,
    ) -> std::io::Result<Client> {
        Client::connect_ca(addr, &certs.paths.ca_cert, options).await
    }

    /// Connects trusting the CA in `ca`.
    pub async fn connect_ca(
        addr: SocketAddr,
        ca: &Path,
        options: ClientOptions,
    ) -> std::io::Result<Client> {
        let tcp = tcp_connect(addr, options.source).await?;
        let connector = TlsConnector::from(client_config(ca, &options));
        let name = ServerName::try_from("localhost").unwrap();
        let stream = tokio::time::timeout(REPLY_TIMEOUT, connector.connect(name, tcp))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "handshake timed out")
            })??;
        Ok(Client {
            stream,
            buf: BytesMut::new(),
        })
    }

    /// Connects and authenticates as alice with a token.
    pub async fn authed(addr: SocketAddr, certs: &TestCerts) -> Client {
        let mut c = Client::connect(addr, certs).await;
        assert_eq!(
            c.request_line(&format!("AUTH {ALICE_TOKEN}")).await,
            "OK alice"
        );
        c
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
        self.stream.flush().await.expect("flush");
    }

    pub async fn send_line(&mut self, line: &str) {
        self.send(format!("{line}\n").as_bytes()).await;
    }

    pub async fn send_frame(&mut self, payload: &[u8]) {
        self.send(&frame(payload)).await;
    }

    /// Reads more bytes into the buffer; `Ok(0)` at EOF.
    async fn fill(&mut self) -> std::io::Result<usize> {
        self.buf.reserve(8192);
        tokio::time::timeout(REPLY_TIMEOUT, self.stream.read_buf(&mut self.buf))
            .await
            .expect("the gateway did not answer in time")
    }

    /// Reads one `\n`-terminated reply, without the `\n`.
    pub async fn read_line(&mut self) -> String {
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let line = self.buf.split_to(pos + 1);
                return String::from_utf8_lossy(&line[..pos]).into_owned();
            }
            let n = self.fill().await.expect("read");
            assert!(
                n > 0,
                "connection closed while waiting for a line; got {:?}",
                self.buf
            );
        }
    }

    /// Reads one binary reply frame's payload.
    pub async fn read_frame(&mut self) -> Vec<u8> {
        loop {
            if self.buf.len() >= 4 {
                let len = u32::from_be_bytes(self.buf[..4].try_into().unwrap()) as usize;
                if self.buf.len() >= 4 + len {
                    self.buf.advance(4);
                    return self.buf.split_to(len).to_vec();
                }
            }
            let n = self.fill().await.expect("read");
            assert!(n > 0, "connection closed while waiting for a frame");
        }
    }

    pub async fn request_line(&mut self, line: &str) -> String {
        self.send_line(line).await;
        self.read_line().await
    }

    pub async fn request_frame(&mut self, payload: &[u8]) -> Vec<u8> {
        self.send_frame(payload).await;
        self.read_frame().await
    }

    /// Asserts that the gateway closes the connection (close_notify, EOF or reset) without
    /// sending anything more.
    pub async fn expect_closed(&mut self) {
        match self.fill().await {
            Ok(0) | Err(_) => {}
            Ok(_) => panic!(
                "expected the connection to close, got more bytes: {:?}",
                self.buf
            ),
        }
    }

    /// Asserts that the gateway ends the connection gracefully: close_notify (a clean EOF
    /// through TLS) with nothing sent before it.
    pub async fn expect_close_notify(&mut self) {
        match self.fill().await {
            Ok(0) => {}
            Ok(_) => panic!("expected close_notify, got more bytes: {:?}", self.buf),
            Err(e) => panic!("expected close_notify, got an error: {e}"),
        }
    }

    /// True when the connection is closed (as opposed to more data).
    pub async fn is_closed(&mut self) -> bool {
        matches!(self.fill().await, Ok(0) | Err(_))
    }
}

/// A binary frame: u32 big-endian length, then the payload.
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = (payload.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(payload);
    out
}

/// The built `portcullis` binary, running in a child process, its stderr collected.
pub struct Process {
    pub child: std::process::Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    stdout: Arc<std::sync::Mutex<String>>,
    stderr: Arc<std::sync::Mutex<String>>,
}

impl Process {
    /// Starts a gateway on `write_config(certs, extra)`, admin on a free loopback port.
    pub fn gateway(certs: &TestCerts, extra: &str) -> Process {
        Process::gateway_with_env(certs, extra, &[])
    }

    /// The same, with `PORTCULLIS_*` overrides in its environment.
    pub fn gateway_with_env(certs: &TestCerts, extra: &str, env: &[(&str, &str)]) -> Process {
        let config = write_config(certs, extra);
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"));
        command
            .args([
                "--config",
                config.to_str().expect("utf-8 path"),
                "--admin-listen",
                "127.0.0.1:0",
            ])
            .current_dir(certs.dir.path())
            .envs(env.iter().copied());
        Process::spawn_command(command)
    }

    /// Starts the binary in `dir` with `args` and waits for its "serving" log line.
    pub fn spawn(dir: &Path, args: &[&str]) -> Process {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"));
        command.args(args).current_dir(dir);
        Process::spawn_command(command)
    }

    /// The gateway binary on `config` (admin on a free port) with its open-file limit, soft
    /// and hard, set to `nofile` before it starts.
    pub fn gateway_with_nofile(config: &Path, nofile: libc::rlim_t) -> Process {
        use std::os::unix::process::CommandExt;
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"));
        command.arg("--config").arg(config);
        command.args(["--admin-listen", "127.0.0.1:0"]);
        // SAFETY: setrlimit is async-signal-safe and touches only the child's limits.
        unsafe {
            command.pre_exec(move || {
                let limit = libc::rlimit {
                    rlim_cur: nofile,
                    rlim_max: nofile,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Process::spawn_command(command)
    }

    /// Starts a prepared command and waits for its "serving" log line.
    pub fn spawn_command(mut command: std::process::Command) -> Process {
        use std::io::{BufRead, BufReader};
        use std::process::Stdio;
        let mut child = command
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn portcullis");
        let stderr = Arc::new(std::sync::Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let mut err = BufReader::new(child.stderr.take().unwrap());
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut line = String::new();
            while err.read_line(&mut line).unwrap_or(0) > 0 {
                let field = |name: &str| {
                    let value = line.split(name).nth(1)?.split_whitespace().next()?;
                    Some(value.trim_matches('"').to_string())
                };
                if let (Some(listen), Some(admin)) = (field("listen="), field("admin=")) {
                    let _ = tx.send((listen, admin));
                }
                sink.lock().unwrap().push_str(&line);
                line.clear();
            }
        });
        let (addr, admin) = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok((listen, admin)) => (
                listen.parse().expect("listen address"),
                admin.parse().expect("admin address"),
            ),
            Err(_) => {
                let _ = child.kill();
                panic!("portcullis did not start: {}", stderr.lock().unwrap());
            }
        };
        let stdout = Arc::new(std::sync::Mutex::new(String::new()));
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let sink = stdout.clone();
        std::thread::spawn(move || {
            let mut line = String::new();
            while out.read_line(&mut line).unwrap_or(0) > 0 {
                sink.lock().unwrap().push_str(&line);
                line.clear();
            }
        });
        Process {
            child,
            addr,
            admin,
            stdout,
            stderr,
        }
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        let rc = unsafe { libc::kill(self.child.id() as i32, signal) };
        assert_eq!(rc, 0, "kill failed");
    }

    /// Waits up to `limit` for the process to exit, and returns its status.
    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "portcullis did not exit within {limit:?}: {}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What the process printed to stdout, once it holds `marker` (waits up to 5 s).
    pub fn stdout_with(&self, marker: &str) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let out = self.stdout.lock().unwrap().clone();
            if out.contains(marker) || std::time::Instant::now() > deadline {
                return out;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain HTTP/1.1 GET (the admin endpoints, Prometheus' API): status and body.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut tcp = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        tcp,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    tcp.read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok((status, body))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

/// The value of one sample line (`name{labels} value`) in a Prometheus text scrape; 0 when
/// the series is absent.
pub fn sample(scrape: &str, series: &str) -> f64 {
    scrape
        .lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

/// Asserts each `(series, value)` of `expected` in a Prometheus text scrape (see [`sample`]).
pub fn assert_samples(scrape: &str, expected: &[(&str, f64)]) {
    for (series, value) in expected {
        assert_eq!(sample(scrape, series), *value, "{series}");
    }
}

/// Writes a config file for a spawned gateway: loopback port 0, the test certificates,
/// alice's token, and `extra` TOML appended.
pub fn write_config(certs: &TestCerts, extra: &str) -> std::path::PathBuf {
    write_config_named(certs, "portcullis.toml", extra)
}

pub fn write_config_named(certs: &TestCerts, name: &str, extra: &str) -> std::path::PathBuf {
    let p = &certs.paths;
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ndrain_timeout = \"5s\"\n\
         [tls]\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\n\
         [[auth.tokens]]\nname = \"alice\"\nsha256 = \"{}\"\n{extra}",
        p.server_cert,
        p.server_key,
        p.ca_cert,
        portcullis::auth::token_digest_hex(ALICE_TOKEN),
    );
    let path = certs.dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Waits until the gateway holds at least `n` connections (their tasks ran admission), so a
/// test that holds connections open knows they are in before it opens the next one.
pub async fn wait_active(gateway: &Gateway, n: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while gateway.admission.active() < n {
        assert!(
            std::time::Instant::now() < deadline,
            "only {} connections admitted",
            gateway.admission.active()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The rest of admission follows in the same poll of the connection's task.
    tokio::time::sleep(Duration::from_millis(20)).await;
}

/// Scrapes the admin `/metrics` of a gateway until `series` reaches `at_least` (a reload
/// or close has been counted), and returns that scrape; panics after 5 s.
pub async fn wait_for_sample(admin: SocketAddr, series: &str, at_least: f64) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let scrape = tokio::task::spawn_blocking(move || http_get(admin, "/metrics"))
            .await
            .expect("scrape task")
            .map(|(_, body)| body)
            .unwrap_or_default();
        if sample(&scrape, series) >= at_least {
            return scrape;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{series} did not reach {at_least}: {scrape}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The loopback source address 127.0.0.`last`, to test per-address limits.
pub fn src(last: u8) -> Option<IpAddr> {
    Some(IpAddr::from([127, 0, 0, last]))
}

/// Client options connecting from 127.0.0.`last`.
pub fn from(last: u8) -> ClientOptions {
    ClientOptions {
        source: src(last),
        ..Default::default()
    }
}

/// Options presenting the test client certificate: the trusted CA's, or (`trusted` false)
/// one from a CA the gateway does not know.
pub fn with_cert(certs: &TestCerts, trusted: bool) -> ClientOptions {
    let p = if trusted {
        &certs.paths
    } else {
        &certs.untrusted
    };
    ClientOptions {
        identity: Some((p.client_cert.clone(), p.client_key.clone())),
        ..Default::default()
    }
}

/// True when a connection attempt was refused: at connect, or (under TLS 1.3, where the
/// client finishes first) closed before the reply to its first request.
pub async fn refused(result: std::io::Result<Client>) -> bool {
    match result {
        Err(_) => true,
        Ok(mut c) => {
            let _ = c.stream.write_all(b"PING\n").await;
            let _ = c.stream.flush().await;
            c.is_closed().await
        }
    }
}

/// True when a connection from 127.0.0.`source` is refused (see [`refused`]).
pub async fn refused_from(addr: SocketAddr, certs: &TestCerts, source: u8) -> bool {
    refused(Client::connect_with(addr, certs, from(source)).await).await
}

/// A loopback port that was free a moment ago (for programs that cannot bind port 0 and
/// report it, such as Prometheus).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A field of `/proc/<pid>/status` in bytes (`VmRSS`, `VmHWM`, `VmPeak`).
pub fn status_bytes(pid: u32, field: &str) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: usize = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    kib * 1024
}
