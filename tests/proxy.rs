//! PROXY protocol v1 and v2, sent directly by a test client from a trusted address
//! (127.0.0.1) and an untrusted one (127.0.0.2).

mod support;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use portcullis::config::ProxyMode;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const UNTRUSTED: [u8; 4] = [127, 0, 0, 2];

async fn server(
    certs: &TestCerts,
    mode: ProxyMode,
    edit: impl FnOnce(&mut portcullis::config::Config),
) -> TestServer {
    let mut config = test_config(certs);
    config.proxy_protocol.mode = mode;
    config.proxy_protocol.trusted = vec!["127.0.0.1/32".parse().unwrap()];
    config.proxy_protocol.header_timeout = Duration::from_millis(500);
    edit(&mut config);
    TestServer::start(config).await
}

fn v2_header(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        (source, destination),
    )
    .build()
    .unwrap()
}

fn v2_local() -> Vec<u8> {
    ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Local,
        ppp::v2::Protocol::Unspecified,
        ppp::v2::Addresses::Unspecified,
    )
    .build()
    .unwrap()
}

/// Sends `header` and the TLS ClientHello in ONE write (so the gateway reads past the
/// header), finishes the handshake with a blocking rustls client, authenticates and asks
/// WHOAMI. Returns the reply, or None when the gateway closed the connection.
async fn whoami_through(
    addr: SocketAddr,
    certs: &TestCerts,
    source: [u8; 4],
    header: Vec<u8>,
) -> Option<String> {
    let ca = certs.paths.ca_cert.clone();
    tokio::task::spawn_blocking(move || {
        let config = client_config(&ca, &ClientOptions::default());
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::clone(&config), name).unwrap();
        let mut hello = Vec::new();
        conn.write_tls(&mut hello).unwrap();
        let mut tcp = blocking_connect(addr, source)?;
        tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        tcp.write_all(&[header, hello].concat()).ok()?;
        let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
        tls.write_all(format!("AUTH {ALICE_TOKEN}\nWHOAMI\n").as_bytes())
            .ok()?;
        let mut text = String::new();
        let mut buf = [0u8; 512];
        while text.matches('\n').count() < 2 {
            match tls.read(&mut buf) {
                Ok(0) | Err(_) => return None,
                Ok(n) => text.push_str(&String::from_utf8_lossy(&buf[..n])),
            }
        }
        text.lines().nth(1).map(str::to_string)
    })
    .await
    .unwrap()
}

/// A blocking TCP connection from `source`.
fn blocking_connect(addr: SocketAddr, source: [u8; 4]) -> Option<std::net::TcpStream> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let tcp = rt
        .block_on(tcp_connect(addr, Some(IpAddr::from(source))))
        .ok()?;
    let std = tcp.into_std().ok()?;
    std.set_nonblocking(false).ok()?;
    Some(std)
}

/// Asserts the gateway closes a raw connection without sending a byte, within `within`.
async fn assert_closed(mut tcp: tokio::net::TcpStream, within: Duration) {
    let mut buf = [0u8; 64];
    let r = tokio::time::timeout(within, tcp.read(&mut buf)).await;
    assert!(
        matches!(r, Ok(Ok(0)) | Ok(Err(_))),
        "not closed in {within:?}: {r:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_and_v2_from_a_trusted_peer_set_the_client_address() {
    let certs = TestCerts::new();
    let server = server(&certs, ProxyMode::Required, |_| {}).await;
    let local: [u8; 4] = [127, 0, 0, 1];
    let v1 = b"PROXY TCP4 203.0.113.7 127.0.0.1 5555 8443\r\n".to_vec();
    let reply = whoami_through(server.addr, &certs, local, v1)
        .await
        .expect("served");
    assert!(
        reply.starts_with("OK identity=alice ip=203.0.113.7 "),
        "{reply}"
    );

    let v2 = v2_header(
        "[2001:db8::7]:5555".parse().unwrap(),
        "[2001:db8::1]:8443".parse().unwrap(),
    );
    let reply = whoami_through(server.addr, &certs, local, v2)
        .await
        .expect("served");
    assert!(
        reply.starts_with("OK identity=alice ip=2001:db8::7 "),
        "{reply}"
    );

    let v1_unknown = b"PROXY UNKNOWN\r\n".to_vec();
    let reply = whoami_through(server.addr, &certs, local, v1_unknown)
        .await
        .expect("served");
    assert!(
        reply.contains(" ip=127.0.0.1 "),
        "v1 UNKNOWN keeps the socket address: {reply}"
    );
    let reply = whoami_through(server.addr, &certs, local, v2_local())
        .await
        .expect("served");
    assert!(
        reply.contains(" ip=127.0.0.1 "),
        "v2 LOCAL keeps the socket address: {reply}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_apply_to_the_header_address() {
    let certs = TestCerts::new();
    let server = server(&certs, ProxyMode::Required, |c| {
        c.limits.connection_rate_per_ip = 1;
        c.limits.connection_burst_per_ip = 2;
    })
    .await;
    let local: [u8; 4] = [127, 0, 0, 1];
    let from = |ip: &str| format!("PROXY TCP4 {ip} 127.0.0.1 5555 8443\r\n").into_bytes();
    for _ in 0..2 {
        assert!(
            whoami_through(server.addr, &certs, local, from("198.51.100.1"))
                .await
                .is_some()
        );
    }
    assert!(
        whoami_through(server.addr, &certs, local, from("198.51.100.1"))
            .await
            .is_none()
    );
    // The balancer itself, and other clients behind it, are not limited by that.
    assert!(
        whoami_through(server.addr, &certs, local, from("198.51.100.2"))
            .await
            .is_some()
    );
    assert!(
        whoami_through(server.addr, &certs, local, from("198.51.100.3"))
            .await
            .is_some()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_from_untrusted_peers_are_not_believed() {
    let certs = TestCerts::new();
    let server = server(&certs, ProxyMode::Optional, |_| {}).await;
    let spoof = b"PROXY TCP4 203.0.113.9 127.0.0.1 5555 8443\r\n".to_vec();
    assert!(whoami_through(server.addr, &certs, UNTRUSTED, spoof)
        .await
        .is_none());
    let v2 = v2_header(
        "203.0.113.9:1".parse().unwrap(),
        "127.0.0.1:2".parse().unwrap(),
    );
    assert!(whoami_through(server.addr, &certs, UNTRUSTED, v2)
        .await
        .is_none());
    // Plain TLS from the untrusted peer is served, with its own address.
    let reply = whoami_through(server.addr, &certs, UNTRUSTED, Vec::new())
        .await
        .expect("served");
    assert!(reply.contains(" ip=127.0.0.2 "), "{reply}");
    // In optional mode a trusted peer may also skip the header.
    let reply = whoami_through(server.addr, &certs, [127, 0, 0, 1], Vec::new())
        .await
        .expect("served");
    assert!(reply.contains(" ip=127.0.0.1 "), "{reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_mode_refuses_connections_without_a_header() {
    let certs = TestCerts::new();
    let server = server(&certs, ProxyMode::Required, |_| {}).await;
    assert!(
        whoami_through(server.addr, &certs, [127, 0, 0, 1], Vec::new())
            .await
            .is_none()
    );
    assert!(whoami_through(server.addr, &certs, UNTRUSTED, Vec::new())
        .await
        .is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_malformed_and_slow_headers_are_refused() {
    let certs = TestCerts::new();
    let server = server(&certs, ProxyMode::Required, |_| {}).await;
    let local = Some(IpAddr::from([127, 0, 0, 1]));

    // Truncated: half a header, then the peer closes its side.
    let mut tcp = tcp_connect(server.addr, local).await.unwrap();
    tcp.write_all(b"PROXY TCP4 203.0.113.7").await.unwrap();
    tcp.shutdown().await.unwrap();
    assert_closed(tcp, Duration::from_secs(2)).await;

    // Truncated v2 and left hanging: closed at header_timeout.
    let mut tcp = tcp_connect(server.addr, local).await.unwrap();
    let v2 = v2_header(
        "203.0.113.7:1".parse().unwrap(),
        "127.0.0.1:2".parse().unwrap(),
    );
    tcp.write_all(&v2[..20]).await.unwrap();
    assert_closed(tcp, Duration::from_secs(2)).await;

    // Malformed.
    let mut tcp = tcp_connect(server.addr, local).await.unwrap();
    tcp.write_all(b"PROXY TCP4 not-an-address 127.0.0.1 1 2\r\n")
        .await
        .unwrap();
    assert_closed(tcp, Duration::from_secs(2)).await;

    // Over the v1 cap.
    let mut tcp = tcp_connect(server.addr, local).await.unwrap();
    tcp.write_all(&[b"PROXY ".as_slice(), &[b'9'; 200]].concat())
        .await
        .unwrap();
    assert_closed(tcp, Duration::from_secs(2)).await;

    // A header trickling in slower than header_timeout (500 ms) is cut off.
    let mut tcp = tcp_connect(server.addr, local).await.unwrap();
    let started = Instant::now();
    let header = b"PROXY TCP4 203.0.113.7 127.0.0.1 5555 8443\r\n";
    let mut cut = false;
    for byte in header {
        if tcp.write_all(&[*byte]).await.is_err() {
            cut = true;
            break;
        }
        let mut buf = [0u8; 1];
        match tokio::time::timeout(Duration::from_millis(100), tcp.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                cut = true;
                break;
            }
            _ => {}
        }
    }
    assert!(cut, "a trickling header was not cut off");
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(1500),
        "cut off only after {took:?}"
    );
    assert!(
        took >= Duration::from_millis(400),
        "cut off before header_timeout: {took:?}"
    );

    // The gateway still serves a proper header afterwards.
    let good = b"PROXY TCP4 203.0.113.8 127.0.0.1 5555 8443\r\n".to_vec();
    assert!(whoami_through(server.addr, &certs, [127, 0, 0, 1], good)
        .await
        .is_some());
}

#[tokio::test]
async fn a_balancer_health_check_that_closes_at_once_is_quiet() {
    let certs = TestCerts::new();
    let server = server(&certs, ProxyMode::Required, |_| {}).await;
    let tcp = tcp_connect(server.addr, Some(IpAddr::from([127, 0, 0, 1])))
        .await
        .unwrap();
    drop(tcp);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(server.gateway.admission.active(), 0);
}
