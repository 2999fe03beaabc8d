//! Every log line a peer can cause is rate-limited, the libraries' own included (SPEC 9):
//! rustls warns about each ClientHello that carries an IP address as SNI, which a scanner
//! sends by the thousand.

mod support;

use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const HANDSHAKES: usize = 1000;

/// A ClientHello whose SNI is the IP address 127.0.0.1, which no TLS library sends on its
/// own: rustls' hello for a 9-letter host name, with the name's bytes replaced (the lengths
/// stay right). Its cipher suites are replaced by one the server does not offer, so the
/// server refuses it right after parsing (where rustls warns), without any key exchange:
/// the flood takes well under a second even against a debug build, and the line count
/// measures the limit, not the machine's speed.
fn client_hello_with_ip_sni(certs: &TestCerts) -> Vec<u8> {
    let config = client_config(&certs.paths.ca_cert, &ClientOptions::default());
    let name = ServerName::try_from("aaaaaaaaa").unwrap();
    let mut client = rustls::ClientConnection::new(config, name).unwrap();
    let mut hello = Vec::new();
    client.write_tls(&mut hello).unwrap();
    let at = hello
        .windows(9)
        .position(|w| w == b"aaaaaaaaa")
        .expect("the SNI is in the hello");
    hello[at..at + 9].copy_from_slice(b"127.0.0.1");
    // Record header (5), handshake header (4), version (2), random (32), session id.
    let session_id = 5 + 4 + 2 + 32;
    let suites = session_id + 1 + hello[session_id] as usize;
    let len = u16::from_be_bytes([hello[suites], hello[suites + 1]]) as usize;
    for suite in hello[suites + 2..suites + 2 + len].chunks_mut(2) {
        suite.copy_from_slice(&[0x00, 0x0a]); // TLS_RSA_WITH_3DES_EDE_CBC_SHA
    }
    hello
}

/// The flood's sources: 125 loopback addresses with 8 connections each, within every
/// per-address default (rate, concurrency, handshakes in flight), so each connection
/// reaches the TLS stage.
const SOURCES: std::ops::RangeInclusive<u8> = 2..=126;

/// 1,000 sockets here and 1,000 in the gateway (which inherits the limit): the soft limit
/// goes up to the hard one.
fn raise_open_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed by reference.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
    assert!(
        limit.rlim_cur >= 2 * HANDSHAKES as u64 + 100,
        "hard NOFILE limit too low"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_ip_address_snis_write_few_log_lines() {
    raise_open_file_limit();
    let certs = TestCerts::new();
    let gateway = Process::gateway(&certs, "");
    let hello = client_hello_with_ip_sni(&certs);

    // Connect first (nothing is logged for a connection that has sent nothing yet), then
    // send the 1,000 hellos at once: the log sees one burst, as from a scanner farm.
    let mut sockets = Vec::with_capacity(HANDSHAKES);
    for source in SOURCES {
        for _ in 0..HANDSHAKES / SOURCES.len() {
            sockets.push(
                tcp_connect(gateway.addr, src(source))
                    .await
                    .expect("connect"),
            );
        }
    }
    let started = Instant::now();
    for tcp in &mut sockets {
        tcp.write_all(&hello).await.expect("send the hello");
    }
    // Each is answered (an alert: no common cipher suite), so rustls parsed every one.
    let mut answered = 0;
    for tcp in &mut sockets {
        let mut buf = [0u8; 64];
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf)).await {
            answered += usize::from(n > 0);
        }
    }
    let flood = started.elapsed();
    drop(sockets);
    assert!(
        answered > HANDSHAKES * 9 / 10,
        "only {answered} hellos answered"
    );

    // The summary of held-back lines comes once their second is over.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !gateway.stderr().contains("log lines suppressed") && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stderr = gateway.stderr();
    assert!(
        stderr.contains("Illegal SNI extension"),
        "rustls never saw an IP address as SNI: {stderr}"
    );
    let lines = stderr.lines().count();
    assert!(
        lines < 50,
        "{lines} log lines for {HANDSHAKES} handshakes in {flood:?}:\n{stderr}"
    );
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("log lines suppressed") && l.contains("rustls")),
        "no summary of rustls' held-back lines: {stderr}"
    );
}
