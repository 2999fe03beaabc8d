//! Refusals and limits, from distinct loopback source addresses (127.0.0.2, 127.0.0.3, ...).

mod support;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A refusal before TLS: the socket is closed (EOF or reset) at once and no byte — no
/// ServerHello — comes back, even to a real ClientHello.
async fn assert_refused_before_tls(addr: SocketAddr, certs: &TestCerts, source: Option<IpAddr>) {
    let options = ClientOptions {
        source,
        ..Default::default()
    };
    let started = Instant::now();
    let result = Client::connect_with(addr, certs, options).await;
    assert!(result.is_err(), "expected a refusal, got a TLS session");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refusal took {:?}",
        started.elapsed()
    );
    // A reset can arrive before connect() returns: that is a refusal too.
    let Ok(mut tcp) = tcp_connect(addr, source).await else {
        return;
    };
    let _ = tcp.write_all(&[0x16, 0x03, 0x01, 0x00, 0x05, 0x01]).await;
    let mut buf = [0u8; 64];
    match tokio::time::timeout(Duration::from_secs(2), tcp.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(n)) => panic!("refused connection sent {n} bytes: {:?}", &buf[..n]),
        Err(_) => panic!("connection was not refused (still open after 2 s)"),
    }
}

async fn ping(addr: SocketAddr, certs: &TestCerts, source: Option<IpAddr>) -> Client {
    let options = ClientOptions {
        source,
        ..Default::default()
    };
    let mut c = Client::connect_with(addr, certs, options)
        .await
        .expect("admitted");
    assert_eq!(c.request_line("PING").await, "OK PONG");
    c
}

#[tokio::test]
async fn connection_rate_triggers_at_the_burst_and_not_before() {
    let certs = TestCerts::new();
    let mut config = test_config(&certs);
    config.limits.connection_rate_per_ip = 1;
    config.limits.connection_burst_per_ip = 3;
    let server = TestServer::start(config).await;
    for _ in 0..3 {
        ping(server.addr, &certs, src(2)).await;
    }
    assert_refused_before_tls(server.addr, &certs, src(2)).await;
    // Another address has its own budget.
    ping(server.addr, &certs, src(3)).await;
    // The bucket refills at the configured rate.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    ping(server.addr, &certs, src(2)).await;
}

#[tokio::test]
async fn per_ip_cap_triggers_at_the_cap_and_frees_on_close() {
    let certs = TestCerts::new();
    let mut config = test_config(&certs);
    config.limits.max_connections_per_ip = 2;
    let server = TestServer::start(config).await;
    let first = ping(server.addr, &certs, src(4)).await;
    let _second = ping(server.addr, &certs, src(4)).await;
    assert_refused_before_tls(server.addr, &certs, src(4)).await;
    let _other = ping(server.addr, &certs, src(5)).await;
    drop(first);
    tokio::time::sleep(Duration::from_millis(100)).await;
    ping(server.addr, &certs, src(4)).await;
}

#[tokio::test]
async fn global_cap_triggers_at_max_connections() {
    let certs = TestCerts::new();
    let mut config = test_config(&certs);
    config.limits.max_connections = 3;
    let server = TestServer::start(config).await;
    let _held: Vec<Client> = vec![
        ping(server.addr, &certs, src(6)).await,
        ping(server.addr, &certs, src(7)).await,
        ping(server.addr, &certs, src(8)).await,
    ];
    assert_refused_before_tls(server.addr, &certs, src(9)).await;
    assert_eq!(server.gateway.admission.active(), 3);
}

/// Waits until `n` handshake slots are taken (the connections' first bytes were seen).
async fn wait_handshakes(server: &TestServer, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.gateway.admission.handshakes_in_flight() < n {
        assert!(
            Instant::now() < deadline,
            "only {} handshake slots taken",
            server.gateway.admission.handshakes_in_flight()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Opens a connection from 127.0.0.`last` and sends a third of a TLS record header: a
/// handshake that has begun and then stalls. `None` when the gateway reset it at once.
async fn stalled_handshake(addr: SocketAddr, last: u8) -> Option<tokio::net::TcpStream> {
    let mut tcp = tcp_connect(addr, src(last)).await.ok()?;
    tcp.write_all(&[0x16, 0x03, 0x01]).await.ok()?;
    Some(tcp)
}

/// True when the gateway closes `tcp` (EOF or reset) within `limit`.
async fn closed_within(mut tcp: tokio::net::TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(limit, tcp.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_handshake_pool_delays_a_new_handshake_instead_of_resetting_it() {
    let certs = TestCerts::new();
    let mut config = test_config(&certs);
    config.limits.max_handshakes_in_flight = 2;
    config.limits.handshake_timeout = Duration::from_secs(30);
    let server = TestServer::start(config).await;
    let first = stalled_handshake(server.addr, 10).await.unwrap();
    let _second = stalled_handshake(server.addr, 11).await.unwrap();
    wait_handshakes(&server, 2).await;
    let addr = server.addr;
    let options = from(12);
    let ca = certs.paths.ca_cert.clone();
    let waiting = tokio::spawn(async move { Client::connect_ca(addr, &ca, options).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiting.is_finished(),
        "the new handshake was not held back"
    );
    // A place frees up: the waiting handshake takes it and completes.
    drop(first);
    let started = Instant::now();
    let mut client = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the waiting handshake completes")
        .unwrap()
        .expect("the waiting handshake was not reset");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(client.request_line("PING").await, "OK PONG");
}

/// SPEC 9 (issue 13, finding 1): silent connections hold no handshake slot, one key holds
/// at most `max_handshakes_per_ip`, so a flood of both from a few keys never keeps a client
/// on another key from its handshake. On the old code the first silent connections took
/// every slot and the legitimate client was reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_slow_handshake_flood_from_few_keys_does_not_block_another_client() {
    let certs = TestCerts::new();
    let mut config = test_config(&certs);
    config.limits.max_handshakes_in_flight = 8;
    config.limits.max_handshakes_per_ip = 2;
    config.limits.handshake_timeout = Duration::from_secs(10);
    config.limits.connection_rate_per_ip = 1000;
    config.limits.connection_burst_per_ip = 1000;
    let server = TestServer::start(config).await;
    let attackers = [40u8, 41, 42];
    let mut silent = Vec::new();
    for &last in &attackers {
        for _ in 0..40 {
            if let Ok(tcp) = tcp_connect(server.addr, src(last)).await {
                silent.push(tcp);
            }
        }
    }
    let mut slow = Vec::new();
    for &last in &attackers {
        for _ in 0..4 {
            slow.push(stalled_handshake(server.addr, last).await);
        }
    }
    wait_handshakes(&server, attackers.len() * 2).await;

    let started = Instant::now();
    let mut client = Client::connect_with(server.addr, &certs, from(50))
        .await
        .expect("the legitimate client completes its handshake");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(1), "handshake took {took:?}");
    assert_eq!(client.request_line("PING").await, "OK PONG");

    // Two stalled handshakes per key hold a slot; the other two were refused at their first
    // byte (reset), and the silent connections are all still open, holding none.
    assert_eq!(
        server.gateway.admission.handshakes_in_flight(),
        attackers.len() * 2,
        "the attackers' stalled handshakes still hold their slots"
    );
    let mut checks = tokio::task::JoinSet::new();
    for tcp in slow {
        match tcp {
            Some(tcp) => checks.spawn(closed_within(tcp, Duration::from_secs(2))),
            None => checks.spawn(async { true }),
        };
    }
    let refused = checks.join_all().await.into_iter().filter(|c| *c).count();
    assert_eq!(
        refused,
        attackers.len() * 2,
        "refusals over max_handshakes_per_ip"
    );
    assert_eq!(
        silent.len(),
        attackers.len() * 40,
        "silent connections admitted"
    );
}

#[tokio::test]
async fn deny_and_allow_lists() {
    let certs = TestCerts::new();
    let mut config = test_config(&certs);
    config.access.deny = vec!["127.0.0.13/32".parse().unwrap()];
    let server = TestServer::start(config).await;
    assert_refused_before_tls(server.addr, &certs, src(13)).await;
    ping(server.addr, &certs, src(14)).await;

    let mut config = test_config(&certs);
    config.access.allow = vec!["127.0.0.15/32".parse().unwrap()];
    let server = TestServer::start(config).await;
    ping(server.addr, &certs, src(15)).await;
    assert_refused_before_tls(server.addr, &certs, src(16)).await;
}

#[tokio::test]
async fn command_rate_answers_rate_limited_and_keeps_the_connection() {
    let certs = TestCerts::new();
    let mut config = test_config(&certs);
    config.limits.commands_per_second = 2;
    config.limits.commands_burst = 3;
    let server = TestServer::start(config).await;
    let mut c = Client::connect_with(server.addr, &certs, from(17))
        .await
        .unwrap();
    c.send(b"PING\nPING\nPING\nPING\n").await;
    for _ in 0..3 {
        assert_eq!(c.read_line().await, "OK PONG");
    }
    assert_eq!(c.read_line().await, "ERR RATE_LIMITED slow down");
    // The connection is still open, and recovers as the bucket refills.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(c.request_line("PING").await, "OK PONG");
}

#[tokio::test]
async fn repeated_auth_failures_ban_the_ip_close_its_connections_and_expire() {
    let certs = TestCerts::new();
    let mut config = test_config(&certs);
    config.auth.max_failures = 2;
    config.auth.ban_duration = Duration::from_millis(1500);
    let server = TestServer::start(config).await;
    let mut bystander = Client::connect_with(server.addr, &certs, from(18))
        .await
        .unwrap();
    assert_eq!(bystander.request_line("PING").await, "OK PONG");
    let mut other_ip = ping(server.addr, &certs, src(19)).await;

    let mut c = Client::connect_with(server.addr, &certs, from(18))
        .await
        .unwrap();
    assert_eq!(c.request_line("AUTH bad1").await, "ERR AUTH_FAILED");
    assert_eq!(c.request_line("AUTH bad2").await, "ERR AUTH_FAILED");
    // The failure that triggers the ban still gets its reply, then the close.
    assert_eq!(c.request_line("AUTH bad3").await, "ERR AUTH_FAILED");
    c.expect_closed().await;
    bystander.expect_closed().await;
    assert_refused_before_tls(server.addr, &certs, src(18)).await;
    assert_eq!(
        other_ip.request_line("PING").await,
        "OK PONG",
        "other addresses are untouched"
    );
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let mut back = ping(server.addr, &certs, src(18)).await;
    assert_eq!(
        back.request_line(&format!("AUTH {ALICE_TOKEN}")).await,
        "OK alice"
    );
}

#[tokio::test]
async fn slowloris_connections_are_closed_by_timeouts() {
    let certs = TestCerts::new();
    let mut config = test_config(&certs);
    config.limits.handshake_timeout = Duration::from_millis(300);
    config.limits.idle_timeout = Duration::from_millis(300);
    let server = TestServer::start(config).await;
    let mut nothing = tcp_connect(server.addr, src(20)).await.unwrap();
    let mut half_hello = tcp_connect(server.addr, src(20)).await.unwrap();
    half_hello
        .write_all(&[0x16, 0x03, 0x01, 0x00, 0x40, 0x01, 0x00])
        .await
        .unwrap();
    let mut half_frame = Client::connect_with(server.addr, &certs, from(20))
        .await
        .unwrap();
    half_frame.send(&[0, 0, 0, 100, b'P']).await;
    let started = Instant::now();
    let mut buf = [0u8; 16];
    for tcp in [&mut nothing, &mut half_hello] {
        let r = tokio::time::timeout(Duration::from_secs(3), tcp.read(&mut buf)).await;
        assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "not closed: {r:?}");
    }
    half_frame.expect_closed().await;
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_cut_off_without_slowing_others() {
    let certs = TestCerts::new();
    let server = TestServer::start(test_config(&certs)).await;
    let mut hog = Client::connect_with(server.addr, &certs, from(21))
        .await
        .unwrap();
    assert_eq!(
        hog.request_frame(format!("AUTH {ALICE_TOKEN}").as_bytes())
            .await,
        b"OK alice"
    );
    let mut request = b"ECHO ".to_vec();
    request.resize(32 * 1024, b'h');
    let request = frame(&request);
    let writer = tokio::spawn(async move {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let write =
                tokio::time::timeout(Duration::from_secs(5), hog.stream.write_all(&request)).await;
            match write {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return true, // cut off
                Err(_) => return false,    // blocked: the gateway stopped reading instead
            }
        }
        false
    });
    let mut other = ping(server.addr, &certs, src(22)).await;
    let mut worst = Duration::ZERO;
    while !writer.is_finished() {
        let t = Instant::now();
        assert_eq!(other.request_line("PING").await, "OK PONG");
        worst = worst.max(t.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        writer.await.unwrap(),
        "the non-reading client was not cut off"
    );
    assert!(
        worst < Duration::from_millis(500),
        "another client's PING took {worst:?}"
    );
}

fn rss_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legitimate_client_is_served_during_a_flood_and_slowloris_attack() {
    let certs = TestCerts::new();
    let mut config = test_config(&certs);
    config.limits.handshake_timeout = Duration::from_secs(5);
    let server = TestServer::start(config).await;
    let addr = server.addr;
    let rss_before = rss_bytes();

    // 500 slowloris connections from one address: they connect and send half a ClientHello.
    let slowloris = tokio::spawn(async move {
        let mut held = Vec::new();
        for _ in 0..500 {
            if let Ok(mut tcp) = tcp_connect(addr, src(30)).await {
                let _ = tcp.write_all(&[0x16, 0x03, 0x01]).await;
                held.push(tcp);
            }
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        held.len()
    });
    // And a flood of new connections from the same address.
    let flood = tokio::spawn(async move {
        let until = Instant::now() + Duration::from_secs(3);
        let mut attempts = 0u32;
        while Instant::now() < until {
            if let Ok(tcp) = tcp_connect(addr, src(30)).await {
                drop(tcp);
            }
            attempts += 1;
        }
        attempts
    });

    let mut worst = Duration::ZERO;
    let mut admin_worst = Duration::ZERO;
    for _ in 0..20 {
        let t = Instant::now();
        ping(addr, &certs, src(31)).await;
        worst = worst.max(t.elapsed());
        // The admin listener keeps answering too.
        let admin = server.admin;
        let t = Instant::now();
        let status = tokio::task::spawn_blocking(move || http_get(admin, "/healthz").map(|r| r.0))
            .await
            .unwrap();
        assert_eq!(status.ok(), Some(200));
        admin_worst = admin_worst.max(t.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        admin_worst < Duration::from_secs(1),
        "/healthz took {admin_worst:?} under attack"
    );
    let held = slowloris.await.unwrap();
    let attempts = flood.await.unwrap();
    assert!(
        held > 0 && attempts > 100,
        "the attack did not run: {held} held, {attempts} attempts"
    );
    assert!(
        worst < Duration::from_secs(1),
        "legitimate handshake + PING took {worst:?}"
    );
    let grown = rss_bytes().saturating_sub(rss_before);
    assert!(
        grown < 64 << 20,
        "RSS grew by {} MiB under attack",
        grown >> 20
    );
    // The attacker held at most its per-IP share.
    assert!(server.gateway.admission.active() <= 64 + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn address_spray_state_is_pruned() {
    let certs = TestCerts::new();
    let mut config = test_config(&certs);
    config.limits.prune_interval = Duration::from_secs(3);
    let server = TestServer::start(config).await;
    let rss_before = rss_bytes();
    // Sample the limiter's key count while spraying, to see its peak.
    let gateway = server.gateway.clone();
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let sampler = tokio::spawn(async move {
        let mut peak = 0;
        loop {
            peak = peak.max(gateway.admission.keys().connection_rate);
            tokio::select! {
                _ = &mut stopped => return peak,
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
    });
    for i in 0..5000u32 {
        let source = IpAddr::from([127, 1, (i / 250) as u8, (i % 250 + 1) as u8]);
        if let Ok(tcp) = tcp_connect(server.addr, Some(source)).await {
            drop(tcp);
        }
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.send(()).unwrap();
    let peak = sampler.await.unwrap();
    assert!(
        peak > 1000,
        "the spray did not reach the limiter: peak {peak} keys"
    );
    // After a prune, keys whose bucket has refilled are gone.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let after = server.gateway.admission.keys();
    assert!(
        after.connection_rate < 50,
        "limiter keys after pruning: {after:?} (peak {peak})"
    );
    assert_eq!(after.concurrency, 0);
    let grown = rss_bytes().saturating_sub(rss_before);
    assert!(grown < 32 << 20, "RSS grew by {} MiB", grown >> 20);
}
