//! SPEC 9 (issue 13, finding 5): an unauthenticated client is cheap. Before authentication
//! a message may hold at most `protocol.max_preauth_bytes`, and a client that pipelines tiny
//! requests without reading its replies costs at most `max_write_buffer_bytes` +
//! 2 × `socket_send_buffer` + one 8 KiB read chunk. The real binary is measured from
//! outside: its resident memory (`/proc/<pid>/status`) and each of its sockets' send queue
//! (`/proc/net/tcp`, what `ss -tn` shows as Send-Q).

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpSocket;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// Non-reading unauthenticated connections held at once.
const CONNECTIONS: usize = 500;
/// Source addresses they come from (127.0.0.100 + i), within `max_connections_per_ip`.
const SOURCES: usize = 16;
/// Each connection pipelines this many one-byte binary requests, this many times: each gets
/// a 47-byte `ERR NOAUTH …` or 30-byte `ERR RATE_LIMITED …` reply, about 57 KB in all, more
/// than the kernel's queue, TLS and the client's receive buffer together hold, while each
/// batch's replies stay below `max_write_buffer_bytes` (over it the connection is closed).
const REQUESTS: usize = 600;
const BATCHES: usize = 3;
const MAX_WRITE_BUFFER: usize = 64 * 1024;
const SOCKET_SEND_BUFFER: usize = 16 * 1024;
const READ_CHUNK: usize = 8 * 1024;

fn config() -> String {
    format!(
        "[protocol]\nmax_frame_bytes = 16384\n\
         [limits]\nmax_write_buffer_bytes = {MAX_WRITE_BUFFER}\n\
         socket_send_buffer = {SOCKET_SEND_BUFFER}\n\
         connection_rate_per_ip = 10000\nconnection_burst_per_ip = 10000\n\
         [auth]\nauth_timeout = \"120s\"\n\
         [upstream]\nmax_reply_bytes = 16384\n"
    )
}

/// The send queue (bytes not yet acknowledged by the client) of every established socket
/// whose local end is `server`, as `ss -tn` reports it in Send-Q.
fn server_send_queues(server: SocketAddr) -> Vec<usize> {
    let local = format!(":{:04X}", server.port());
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap()
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // local_address rem_address st tx_queue:rx_queue; 01 = ESTABLISHED.
            let established = fields.get(3) == Some(&"01");
            if !established || !fields.get(1)?.ends_with(&local) {
                return None;
            }
            let tx = fields.get(4)?.split(':').next()?;
            usize::from_str_radix(tx, 16).ok()
        })
        .collect()
}

/// A TLS connection from `source` whose receive buffer is small, like a client that does not
/// read: the kernel does not absorb the gateway's replies on its behalf.
async fn non_reader(
    addr: SocketAddr,
    source: u8,
    connector: TlsConnector,
) -> std::io::Result<TlsStream<tokio::net::TcpStream>> {
    let socket = TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(4096)?;
    socket.bind(SocketAddr::new([127, 0, 0, source].into(), 0))?;
    let tcp = socket.connect(addr).await?;
    let name = ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await?;
    send_batch(&mut tls).await?;
    Ok(tls)
}

/// [`REQUESTS`] one-byte binary requests in one write, their replies left unread.
async fn send_batch(tls: &mut TlsStream<tokio::net::TcpStream>) -> std::io::Result<()> {
    let requests = frame(b"P").repeat(REQUESTS);
    tls.write_all(&requests).await?;
    tls.flush().await
}

/// Requests the gateway has read so far (0 while a scrape fails on a busy machine).
async fn frames_in(admin: SocketAddr) -> f64 {
    let scrape = tokio::task::spawn_blocking(move || http_get(admin, "/metrics"))
        .await
        .unwrap();
    scrape.map_or(0.0, |(_, body)| {
        sample(&body, "portcullis_frames_total{direction=\"in\"}")
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_64_kib_frame_before_authentication_is_refused_at_the_preauth_cap() {
    let certs = TestCerts::new();
    let gateway = Process::gateway(&certs, "");
    let mut c = Client::connect(gateway.addr, &certs).await;
    // The header announces 64 KiB (within max_frame_bytes); only part of it follows.
    let mut bytes = (64u32 * 1024).to_be_bytes().to_vec();
    bytes.extend_from_slice(&[b'x'; 100]);
    c.send(&bytes).await;
    assert_eq!(c.read_frame().await, b"ERR TOO_LARGE 1024");
    c.expect_closed().await;
    // Once authenticated, the full caps apply: the same 64 KiB frame is served.
    let mut c = Client::connect(gateway.addr, &certs).await;
    assert_eq!(
        c.request_frame(format!("AUTH {ALICE_TOKEN}").as_bytes())
            .await,
        b"OK alice"
    );
    let mut echo = b"ECHO ".to_vec();
    echo.resize(64 * 1024, b'y');
    assert_eq!(c.request_frame(&echo).await.len(), 64 * 1024 - 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_reading_unauthenticated_connections_cost_at_most_the_spec_bound() {
    let certs = TestCerts::new();
    let gateway = Process::gateway(&certs, &config());
    let pid = gateway.child.id();
    let connector = TlsConnector::from(client_config(
        &certs.paths.ca_cert,
        &ClientOptions::default(),
    ));
    // Warm up (TLS tickets, allocator arenas) before the baseline.
    let mut warm = Client::connect(gateway.addr, &certs).await;
    assert_eq!(warm.request_line("PING").await, "OK PONG");
    drop(warm);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let baseline = status_bytes(pid, "VmRSS");

    let started = Instant::now();
    let mut held = Vec::with_capacity(CONNECTIONS);
    let mut batch = tokio::task::JoinSet::new();
    for i in 0..CONNECTIONS {
        let source = 100 + (i % SOURCES) as u8;
        batch.spawn(non_reader(gateway.addr, source, connector.clone()));
        if batch.len() == 50 || i + 1 == CONNECTIONS {
            for result in batch.join_all().await {
                held.push(result.expect("a non-reading client connects and sends"));
            }
            batch = tokio::task::JoinSet::new();
        }
    }
    // The later batches, once every connection is in.
    for _ in 1..BATCHES {
        for tls in &mut held {
            send_batch(tls).await.expect("the gateway reads on");
        }
    }
    // Every request was read and answered (into buffers, as the clients do not read).
    let expected = (CONNECTIONS * REQUESTS * BATCHES) as f64;
    let deadline = Instant::now() + Duration::from_secs(60);
    while frames_in(gateway.admin).await < expected {
        assert!(
            Instant::now() < deadline,
            "requests not all read: {}",
            gateway.stderr()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("all requests read after {:?}", started.elapsed());
    // Let the last replies move into TLS and the kernel.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let queues = server_send_queues(gateway.addr);
    let rss = status_bytes(pid, "VmRSS");
    let peak = status_bytes(pid, "VmHWM");
    let per_connection = rss.saturating_sub(baseline) / CONNECTIONS;
    let peak_per_connection = peak.saturating_sub(baseline) / CONNECTIONS;
    let largest_queue = queues.iter().copied().max().unwrap_or(0);
    let total_queue: usize = queues.iter().sum();
    eprintln!(
        "{} sockets; send queue largest {largest_queue}, mean {}; RSS +{per_connection} per \
         connection (peak +{peak_per_connection})",
        queues.len(),
        total_queue / queues.len().max(1)
    );
    assert!(
        queues.len() >= CONNECTIONS * 9 / 10,
        "only {} of {CONNECTIONS} connections still open",
        queues.len()
    );
    // The kernel's part: Linux reserves twice the requested buffer.
    assert!(
        largest_queue <= 2 * SOCKET_SEND_BUFFER,
        "a send queue of {largest_queue} bytes exceeds 2 x socket_send_buffer"
    );
    assert!(
        largest_queue > SOCKET_SEND_BUFFER / 2,
        "the clients did not fill the send queues ({largest_queue}): the test proves nothing"
    );
    // The whole: process memory per connection plus the kernel's queue per connection.
    let bound = MAX_WRITE_BUFFER + 2 * SOCKET_SEND_BUFFER + READ_CHUNK;
    assert!(
        peak_per_connection <= bound,
        "peak RSS grew {peak_per_connection} bytes per connection, over the bound of {bound}"
    );
    drop(held);
}
