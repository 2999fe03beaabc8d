//! Cluster mode (SPEC 7): real replicas (the built binary) sharing one real `redis-server`.
//! Each test starts its own Redis on a free loopback port and uses its own source address.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use rustls::HandshakeKind;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use support::admin_api::*;
use support::redis_server::RedisServer;
use support::*;

/// Sync often, so that tests wait little; the bounds below scale with it.
const SYNC: Duration = Duration::from_millis(100);

/// A replica on `redis` (standalone when `None`), with `extra` TOML.
fn replica(certs: &TestCerts, redis: Option<&RedisServer>, extra: &str) -> Process {
    let url = redis.map(RedisServer::url).unwrap_or_default();
    let env = [
        ("PORTCULLIS_CLUSTER_REDIS", url.as_str()),
        ("PORTCULLIS_CLUSTER_SYNC_INTERVAL", "100ms"),
    ];
    Process::gateway_with_env(certs, extra, &env)
}

fn scrape(admin: SocketAddr) -> String {
    http_get(admin, "/metrics").expect("scrape").1
}

/// Waits up to `limit` for `portcullis_cluster_up` to read `value` on `p`.
fn wait_cluster_up(p: &Process, value: f64, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let body = scrape(p.admin);
        if body.contains("portcullis_cluster_up ")
            && sample(&body, "portcullis_cluster_up") == value
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "portcullis_cluster_up did not become {value}: {}",
            p.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether a TLS connection from 127.0.0.`source` is admitted (its handshake completes).
async fn admitted(addr: SocketAddr, certs: &TestCerts, source: u8) -> bool {
    Client::connect_with(addr, certs, from(source))
        .await
        .is_ok()
}

/// Opens connections from 127.0.0.`source` alternately to every replica, one after the
/// other as fast as they complete, for `period`; returns how many were admitted.
async fn alternate_for(
    replicas: &[SocketAddr],
    certs: &TestCerts,
    source: u8,
    period: Duration,
) -> usize {
    let end = Instant::now() + period;
    let mut admitted_total = 0;
    let mut attempts = 0;
    'outer: loop {
        for addr in replicas {
            if Instant::now() >= end {
                break 'outer;
            }
            attempts += 1;
            if admitted(*addr, certs, source).await {
                admitted_total += 1;
            }
        }
    }
    assert!(
        attempts > 4 * admitted_total,
        "the client did not press hard enough: {attempts} attempts, {admitted_total} admitted"
    );
    admitted_total
}

/// Sends one bad token to `addr` from 127.0.0.`source` and checks the refusal.
async fn bad_token(addr: SocketAddr, certs: &TestCerts, source: u8) {
    let mut c = Client::connect_with(addr, certs, from(source))
        .await
        .expect("not banned yet");
    assert_eq!(c.request_line("AUTH wrong-token").await, "ERR AUTH_FAILED");
}

/// Waits up to `limit` for `addr` to refuse (or, with `refuse = false`, admit) the source;
/// returns how long that took.
async fn wait_admission(
    addr: SocketAddr,
    certs: &TestCerts,
    source: u8,
    refuse: bool,
    limit: Duration,
) -> Duration {
    let started = Instant::now();
    loop {
        if admitted(addr, certs, source).await != refuse {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "{addr} still {} 127.0.0.{source} after {limit:?}",
            if refuse { "admits" } else { "refuses" }
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn standalone_has_no_cluster_series_and_cluster_mode_reports_up() {
    let certs = TestCerts::new();
    let alone = replica(&certs, None, "");
    assert!(!scrape(alone.admin).contains("portcullis_cluster"));
    let redis = RedisServer::start();
    let joined = replica(&certs, Some(&redis), "");
    wait_cluster_up(&joined, 1.0, Duration::from_secs(5));
    let body = scrape(joined.admin);
    assert!(
        body.contains("portcullis_cluster_errors_total{op=\"connect\"} 0"),
        "{body}"
    );
    assert!(sample(&body, "portcullis_cluster_sync_duration_seconds_count") > 0.0);
}

/// SPEC 7's bound, with rate 5/s and burst 10: L = 60 per 10 s, at most 75 cluster-wide.
const RATE_EXTRA: &str = "[limits]\nconnection_rate_per_ip = 5\nconnection_burst_per_ip = 10\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_one_connection_rate() {
    let certs = TestCerts::new();
    let redis = RedisServer::start();
    let a = replica(&certs, Some(&redis), RATE_EXTRA);
    let b = replica(&certs, Some(&redis), RATE_EXTRA);
    wait_cluster_up(&a, 1.0, Duration::from_secs(5));
    wait_cluster_up(&b, 1.0, Duration::from_secs(5));
    let shared = alternate_for(&[a.addr, b.addr], &certs, 41, Duration::from_secs(10)).await;
    drop((a, b));

    let a = replica(&certs, None, RATE_EXTRA);
    let b = replica(&certs, None, RATE_EXTRA);
    let alone = alternate_for(&[a.addr, b.addr], &certs, 42, Duration::from_secs(10)).await;

    let bound = 75; // 1.25 × (10 × 5 + 10)
    eprintln!("admitted in 10 s: {shared} shared, {alone} standalone");
    assert!(
        shared <= bound,
        "cluster-wide {shared} admitted in 10 s, over SPEC 7's bound of {bound}"
    );
    assert!(
        shared >= 40,
        "sharing should not refuse a client within its rate: {shared}"
    );
    // Standalone, each replica grants the whole rate: about 2 × 60.
    assert!(
        alone >= 100 && alone as f64 >= 1.5 * shared as f64,
        "standalone replicas admitted {alone}, shared {shared}"
    );
}

const BAN_EXTRA: &str = "[auth]\nmax_failures = 3\nban_duration = \"5s\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ban_made_anywhere_is_enforced_everywhere_and_expires() {
    let certs = TestCerts::new();
    let redis = RedisServer::start();
    let a = replica(&certs, Some(&redis), BAN_EXTRA);
    let b = replica(&certs, Some(&redis), BAN_EXTRA);
    wait_cluster_up(&a, 1.0, Duration::from_secs(5));
    wait_cluster_up(&b, 1.0, Duration::from_secs(5));
    let source = 51;
    // An authenticated connection on A, open while the ban comes from B.
    let mut open = Client::connect_with(a.addr, &certs, from(source))
        .await
        .unwrap();
    assert_eq!(
        open.request_line(&format!("AUTH {ALICE_TOKEN}")).await,
        "OK alice"
    );

    // max_failures in total, alternately: no replica alone sees more than 2.
    bad_token(a.addr, &certs, source).await;
    bad_token(b.addr, &certs, source).await;
    bad_token(a.addr, &certs, source).await;
    tokio::time::sleep(SYNC * 5).await;
    assert!(
        admitted(a.addr, &certs, source).await,
        "3 failures do not ban"
    );
    assert!(
        admitted(b.addr, &certs, source).await,
        "3 failures do not ban"
    );

    // The 4th, on B: the cluster bans the key.
    bad_token(b.addr, &certs, source).await;
    let limit = SYNC + Duration::from_secs(1);
    let on_b = wait_admission(b.addr, &certs, source, true, limit).await;
    let on_a = wait_admission(a.addr, &certs, source, true, limit).await;
    assert!(
        open.is_closed().await,
        "the ban closed the open connection on A"
    );
    assert!(
        admitted(a.addr, &certs, 52).await,
        "other addresses are served"
    );

    // A replica started during the ban refuses the key too.
    let c = replica(&certs, Some(&redis), BAN_EXTRA);
    wait_cluster_up(&c, 1.0, Duration::from_secs(5));
    wait_admission(c.addr, &certs, source, true, limit).await;

    // The ban expires everywhere.
    for p in [&a, &b, &c] {
        wait_admission(p.addr, &certs, source, false, Duration::from_secs(7)).await;
    }
    eprintln!("ban seen on B after {on_b:?}, on A after {on_a:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_replicas_keep_their_local_limits_and_resume_sharing() {
    let certs = TestCerts::new();
    let mut redis = RedisServer::start();
    let extra = format!("{RATE_EXTRA}[auth]\nmax_failures = 1\nban_duration = \"30s\"\n");
    let a = replica(&certs, Some(&redis), &extra);
    let b = replica(&certs, Some(&redis), &extra);
    wait_cluster_up(&a, 1.0, Duration::from_secs(5));
    wait_cluster_up(&b, 1.0, Duration::from_secs(5));

    redis.kill();
    wait_cluster_up(&a, 0.0, Duration::from_secs(5));
    wait_cluster_up(&b, 0.0, Duration::from_secs(5));
    let body = scrape(a.admin);
    assert!(
        sample(&body, "portcullis_cluster_errors_total{op=\"publish\"}")
            + sample(&body, "portcullis_cluster_errors_total{op=\"connect\"}")
            > 0.0
    );
    // Still serving, still limiting: the burst of 10 then refusals, on each replica.
    for (p, source) in [(&a, 61), (&b, 62)] {
        let mut c = Client::connect_with(p.addr, &certs, from(source))
            .await
            .unwrap();
        assert_eq!(c.request_line("PING").await, "OK PONG");
        let mut admitted_now = 1;
        for _ in 0..30 {
            if admitted(p.addr, &certs, source).await {
                admitted_now += 1;
            }
        }
        assert!(
            (10..=13).contains(&admitted_now),
            "local limit while Redis is down: {admitted_now} of 31 admitted"
        );
    }
    // A local ban still works: 2 failures on A ban on A.
    bad_token(a.addr, &certs, 63).await;
    bad_token(a.addr, &certs, 63).await;
    wait_admission(a.addr, &certs, 63, true, Duration::from_secs(1)).await;
    assert!(
        admitted(b.addr, &certs, 63).await,
        "nothing shared while Redis is down"
    );

    // Redis back (empty): sharing resumes. One failure on each replica bans on both.
    redis.restart();
    wait_cluster_up(&a, 1.0, Duration::from_secs(10));
    wait_cluster_up(&b, 1.0, Duration::from_secs(10));
    bad_token(a.addr, &certs, 64).await;
    bad_token(b.addr, &certs, 64).await;
    let limit = SYNC + Duration::from_secs(1);
    wait_admission(a.addr, &certs, 64, true, limit).await;
    wait_admission(b.addr, &certs, 64, true, limit).await;
    let log = a.stderr();
    assert_eq!(
        log.matches("Redis unreachable").count(),
        1,
        "one line per change: {log}"
    );
    assert_eq!(log.matches("Redis answers").count(), 2, "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_spray_leaves_no_key_without_a_ttl() {
    let certs = TestCerts::new();
    let redis = RedisServer::start();
    let p = replica(&certs, Some(&redis), "[auth]\nmax_failures = 1\n");
    wait_cluster_up(&p, 1.0, Duration::from_secs(5));
    // A failure and a ban, so that those keys exist too.
    bad_token(p.addr, &certs, 71).await;
    bad_token(p.addr, &certs, 71).await;
    for i in 0..5000u32 {
        let source = IpAddr::from([127, 2, (i / 250) as u8, (i % 250 + 1) as u8]);
        if let Ok(tcp) = tcp_connect(p.addr, Some(source)).await {
            drop(tcp);
        }
    }
    let sprayed = std::time::Instant::now();
    tokio::time::sleep(SYNC * 5).await;
    let counted = redis.hlen("portcullis:rates");
    assert!(
        counted > 1000,
        "the spray did not reach Redis: {counted} keys in the rate totals"
    );
    // The rates of every key live in a fixed set of hashes: a spray adds fields, not keys.
    let keys = redis.keys();
    assert!(keys.len() < 30, "{} keys: {keys:?}", keys.len());
    assert!(keys.iter().any(|k| k == "portcullis:bans"), "{keys:?}");
    for key in &keys {
        let ttl = redis.pttl(key);
        assert!(ttl > 0, "{key} has no TTL ({ttl})");
    }
    // No sync reaches Redis from just before the spray's last second leaves the 11 s
    // window until after that second's hash was last written 15 s ago (the replica
    // paused, as by a Redis outage): the counts must still leave the totals afterwards.
    tokio::time::sleep_until((sprayed + Duration::from_secs(10)).into()).await;
    p.signal(libc::SIGSTOP);
    tokio::time::sleep_until((sprayed + Duration::from_secs(16)).into()).await;
    p.signal(libc::SIGCONT);
    // Each second's counts leave the totals once the window has passed them, while the
    // replica goes on syncing (which keeps the totals hash itself alive).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left = redis.hlen("portcullis:rates");
        if left == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{left} fields still in the rate totals 26 s after the spray"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Connects with `config` (whose session store is shared between calls), reads one reply so
/// that the server's session tickets arrive, and says whether the handshake was resumed.
async fn handshake_kind(addr: SocketAddr, config: &Arc<rustls::ClientConfig>) -> HandshakeKind {
    let tcp = tcp_connect(addr, None).await.expect("connect");
    let name = ServerName::try_from("localhost").unwrap();
    let connector = tokio_rustls::TlsConnector::from(config.clone());
    let mut tls = connector.connect(name, tcp).await.expect("handshake");
    tls.write_all(b"PING\n").await.unwrap();
    let mut line = String::new();
    let mut reader = BufReader::new(&mut tls);
    tokio::time::timeout(REPLY_TIMEOUT, reader.read_line(&mut line))
        .await
        .expect("reply in time")
        .unwrap();
    assert_eq!(line, "OK PONG\n");
    tls.get_ref().1.handshake_kind().expect("handshake done")
}

/// A client configuration of its own: a fresh session store.
fn fresh_client(certs: &TestCerts) -> Arc<rustls::ClientConfig> {
    client_config(&certs.paths.ca_cert, &ClientOptions::default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_ticket_from_one_replica_resumes_on_another() {
    let certs = TestCerts::new();
    let redis = RedisServer::start();
    let a = replica(&certs, Some(&redis), "");
    let b = replica(&certs, Some(&redis), "");
    wait_cluster_up(&a, 1.0, Duration::from_secs(5));
    wait_cluster_up(&b, 1.0, Duration::from_secs(5));
    // The keys are read within a second of the first sync.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for tls12 in [false, true] {
        let config = client_config(
            &certs.paths.ca_cert,
            &ClientOptions {
                tls12_only: tls12,
                ..Default::default()
            },
        );
        assert_eq!(handshake_kind(a.addr, &config).await, HandshakeKind::Full);
        assert_eq!(
            handshake_kind(b.addr, &config).await,
            HandshakeKind::Resumed,
            "a ticket from A resumes on B (TLS 1.2 only: {tls12})"
        );
        assert_eq!(
            handshake_kind(a.addr, &config).await,
            HandshakeKind::Resumed
        );
    }
    let keys = redis.keys();
    let ticket_keys: Vec<_> = keys
        .iter()
        .filter(|k| k.starts_with("portcullis:ticket:"))
        .collect();
    assert_eq!(
        ticket_keys.len(),
        1,
        "one key for the current period: {keys:?}"
    );
    assert!(
        redis.pttl(ticket_keys[0]) > 24 * 3600 * 1000,
        "two periods of 12 h"
    );
    drop((a, b));

    // Standalone replicas each have their own keys: no resumption across them.
    let a = replica(&certs, None, "");
    let b = replica(&certs, None, "");
    let config = fresh_client(&certs);
    assert_eq!(handshake_kind(a.addr, &config).await, HandshakeKind::Full);
    assert_eq!(handshake_kind(b.addr, &config).await, HandshakeKind::Full);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_resumption_survives_a_reload() {
    let certs = TestCerts::new();
    let p = replica(&certs, None, "");
    let config = fresh_client(&certs);
    assert_eq!(handshake_kind(p.addr, &config).await, HandshakeKind::Full);
    assert_eq!(
        handshake_kind(p.addr, &config).await,
        HandshakeKind::Resumed
    );
    p.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(5);
    while sample(
        &scrape(p.admin),
        "portcullis_config_reloads_total{result=\"ok\"}",
    ) < 1.0
    {
        assert!(Instant::now() < deadline, "no reload: {}", p.stderr());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        handshake_kind(p.addr, &config).await,
        HandshakeKind::Resumed,
        "a ticket issued before SIGHUP resumes after it"
    );
}

/// Cluster mode with the admin ban API on.
fn admin_replica(certs: &TestCerts, redis: &RedisServer, extra: &str) -> Process {
    replica(certs, Some(redis), &format!("{}{extra}", admin_section(16)))
}

/// Two replicas of `admin_replica`, both synced with Redis.
fn two_admin_replicas(certs: &TestCerts, redis: &RedisServer, extra: &str) -> (Process, Process) {
    let a = admin_replica(certs, redis, extra);
    let b = admin_replica(certs, redis, extra);
    wait_cluster_up(&a, 1.0, Duration::from_secs(5));
    wait_cluster_up(&b, 1.0, Duration::from_secs(5));
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_ban_posted_on_one_replica_holds_on_every_replica() {
    let certs = TestCerts::new();
    let redis = RedisServer::start();
    let (a, b) = two_admin_replicas(&certs, &redis, "");
    // Open on B while the ban is posted on A.
    let mut open = Client::connect_with(b.addr, &certs, from(81))
        .await
        .unwrap();
    assert_eq!(open.request_line("PING").await, "OK PONG");

    let (status, body) = post_ban(a.admin, r#"{"cidr": "127.0.0.80/30", "duration": "1h"}"#).await;
    assert_eq!(status, 201, "{body}");
    assert!(body.contains("shared with every replica"), "{body}");
    let posted = Instant::now();
    let limit = SYNC + Duration::from_secs(1);
    tokio::time::timeout(limit, open.expect_close_notify())
        .await
        .expect("B closes the open connection within sync_interval + 1 s");
    let left = limit.saturating_sub(posted.elapsed());
    wait_admission(b.addr, &certs, 82, true, left).await;
    eprintln!(
        "the ban held on B {:?} after the POST on A",
        posted.elapsed()
    );
    assert!(
        admitted(b.addr, &certs, 84).await,
        "outside the range is served"
    );
    wait_for_sample(
        b.admin,
        "portcullis_connections_closed_total{reason=\"banned\"}",
        1.0,
    )
    .await;
    let (status, list) = list_bans(b.admin).await;
    assert_eq!(status, 200);
    assert!(
        list.contains(r#""key":"127.0.0.80/30""#) && list.contains(r#""reason":"admin""#),
        "GET /bans on B lists the cluster's admin ban: {list}"
    );

    // A replica started during the ban refuses the range from its first sync.
    let c = admin_replica(&certs, &redis, "");
    wait_cluster_up(&c, 1.0, Duration::from_secs(5));
    wait_admission(c.addr, &certs, 83, true, limit).await;

    // Every key has a TTL; the admin ban's keys none longer than the ban.
    let keys = redis.keys();
    for admin_key in ["portcullis:adminbans", "portcullis:adminbans:version"] {
        assert!(keys.iter().any(|k| k == admin_key), "{keys:?}");
        let ttl = redis.pttl(admin_key);
        assert!(
            ttl > 3500 * 1000 && ttl <= 3600 * 1000,
            "{admin_key}: {ttl} ms"
        );
    }
    for key in &keys {
        assert!(redis.pttl(key) > 0, "{key} has no TTL");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ban_lifted_on_one_replica_is_lifted_on_every_replica() {
    let certs = TestCerts::new();
    let redis = RedisServer::start();
    let auth = "[auth]\nmax_failures = 1\nban_duration = \"1h\"\n";
    let (a, b) = two_admin_replicas(&certs, &redis, auth);
    let limit = SYNC + Duration::from_secs(1);
    // An admin ban posted on A, and an authentication-failure ban made on A (shared).
    let (status, body) = post_ban(a.admin, r#"{"cidr": "127.0.0.90/31", "duration": "1h"}"#).await;
    assert_eq!(status, 201, "{body}");
    bad_token(a.addr, &certs, 92).await;
    bad_token(a.addr, &certs, 92).await;
    for p in [&a, &b] {
        wait_admission(p.addr, &certs, 90, true, limit).await;
        wait_admission(p.addr, &certs, 92, true, limit).await;
    }

    // Both lifted on B: the network, and the address (its client key's ban).
    let (status, body) = delete_ban(b.admin, "127.0.0.90/31").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("shared with every replica"), "{body}");
    assert_eq!(delete_ban(b.admin, "127.0.0.92").await.0, 200);
    let lifted = Instant::now();
    for p in [&b, &a] {
        for source in [90, 91, 92] {
            let left = limit.saturating_sub(lifted.elapsed());
            wait_admission(p.addr, &certs, source, false, left).await;
        }
    }
    eprintln!(
        "lifted on A and B {:?} after the DELETE on B",
        lifted.elapsed()
    );
    let (_, list) = list_bans(a.admin).await;
    assert_eq!(list.trim(), "[]", "nothing left on A");

    // A replica started after the lifts does not bring them back.
    let c = admin_replica(&certs, &redis, auth);
    wait_cluster_up(&c, 1.0, Duration::from_secs(5));
    for source in [90, 92] {
        assert!(admitted(c.addr, &certs, source).await, "127.0.0.{source}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_bans_made_while_redis_is_down_are_shared_when_it_is_back() {
    let certs = TestCerts::new();
    let mut redis = RedisServer::start();
    let (a, b) = two_admin_replicas(&certs, &redis, "");
    let limit = SYNC + Duration::from_secs(1);
    // Shared before the outage.
    assert_eq!(
        post_ban(a.admin, r#"{"cidr": "127.0.0.96/32", "duration": "1h"}"#)
            .await
            .0,
        201
    );
    wait_admission(b.addr, &certs, 96, true, limit).await;

    redis.kill();
    wait_cluster_up(&a, 0.0, Duration::from_secs(5));
    let started = Instant::now();
    let (status, body) = post_ban(a.admin, r#"{"cidr": "127.0.0.95/32", "duration": "1h"}"#).await;
    // A request that waited for Redis would take CONFIRM_WAIT (2 s).
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "the request does not wait on a Redis that is down"
    );
    assert_eq!(status, 201, "{body}");
    assert!(body.contains("shared when Redis answers"), "{body}");
    wait_admission(a.addr, &certs, 95, true, Duration::from_secs(1)).await;
    assert!(admitted(b.addr, &certs, 95).await, "not shared yet");

    // Redis back, empty: the ban made during the outage reaches B, and both bans reach
    // a replica started afterwards (the replicas publish those Redis lost).
    redis.restart();
    wait_cluster_up(&a, 1.0, Duration::from_secs(10));
    wait_cluster_up(&b, 1.0, Duration::from_secs(10));
    wait_admission(b.addr, &certs, 95, true, limit).await;
    assert!(!admitted(b.addr, &certs, 96).await, "still banned on B");
    let c = admin_replica(&certs, &redis, "");
    wait_cluster_up(&c, 1.0, Duration::from_secs(5));
    for source in [95, 96] {
        wait_admission(c.addr, &certs, source, true, limit).await;
    }
    for key in redis.keys() {
        assert!(redis.pttl(&key) > 0, "{key} has no TTL");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clusters_admin_bans_are_capped_by_max_bans() {
    let certs = TestCerts::new();
    let mut redis = RedisServer::start();
    let one = admin_section(1);
    let a = replica(&certs, Some(&redis), &one);
    let b = replica(&certs, Some(&redis), &one);
    wait_cluster_up(&a, 1.0, Duration::from_secs(5));
    wait_cluster_up(&b, 1.0, Duration::from_secs(5));
    // While Redis is down each replica takes one ban of its own: two in all.
    redis.kill();
    wait_cluster_up(&a, 0.0, Duration::from_secs(5));
    wait_cluster_up(&b, 0.0, Duration::from_secs(5));
    let (status, body) = post_ban(a.admin, r#"{"cidr": "127.0.0.101/32", "duration": "1h"}"#).await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = post_ban(b.admin, r#"{"cidr": "127.0.0.102/32", "duration": "1h"}"#).await;
    assert_eq!(status, 201, "{body}");

    // Redis back: the cluster keeps one of them, and both replicas agree on which.
    redis.restart();
    wait_cluster_up(&a, 1.0, Duration::from_secs(10));
    wait_cluster_up(&b, 1.0, Duration::from_secs(10));
    let deadline = Instant::now() + SYNC + Duration::from_secs(1);
    let (on_a, on_b) = loop {
        let on_a = list_bans(a.admin).await.1;
        let on_b = list_bans(b.admin).await.1;
        if on_a == on_b && on_a.matches(r#""reason":"admin""#).count() == 1 {
            break (on_a, on_b);
        }
        assert!(
            Instant::now() < deadline,
            "the replicas did not converge on one ban: A {on_a} B {on_b}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let kept = if on_a.contains("127.0.0.101/32") {
        101
    } else {
        102
    };
    let dropped = 203 - kept;
    for p in [&a, &b] {
        assert!(!admitted(p.addr, &certs, kept).await, "{on_b}");
        assert!(admitted(p.addr, &certs, dropped).await, "{on_b}");
    }
    let log = format!("{}{}", a.stderr(), b.stderr());
    assert!(log.contains("admin ban refused"), "{log}");
    let mut connection = redis.connection().unwrap();
    let members: u64 = redis::cmd("ZCARD")
        .arg("portcullis:adminbans")
        .query(&mut connection)
        .unwrap();
    assert_eq!(members, 1, "admin.max_bans in Redis");
}

/// Fills the shared authentication-failure ban set with `n` client keys banned for
/// `ban_ms` more, as an attacker spraying addresses (each banned after a few bad tokens)
/// would grow it.
fn grow_ban_set(redis: &RedisServer, n: u32, ban_ms: i64) {
    let mut connection = redis.connection().unwrap();
    let (sec, micros): (i64, i64) = redis::cmd("TIME").query(&mut connection).unwrap();
    let until = sec * 1000 + micros / 1000 + ban_ms;
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let mut zadd = redis::cmd("ZADD");
        zadd.arg("portcullis:bans");
        for i in chunk {
            zadd.arg(until)
                .arg(format!("2001:db8:{:x}:{:x}::", i >> 16, i & 0xffff));
        }
        let _: u64 = zadd.query(&mut connection).unwrap();
    }
    let _: u8 = redis::cmd("PEXPIRE")
        .arg("portcullis:bans")
        .arg(ban_ms + 1000)
        .query(&mut connection)
        .unwrap();
}

/// The calls Redis logged as slow (`slowlog-log-slower-than`) since `SLOWLOG RESET`.
fn slow_calls(redis: &RedisServer) -> u64 {
    let mut connection = redis.connection().unwrap();
    redis::cmd("SLOWLOG")
        .arg("LEN")
        .query(&mut connection)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifting_a_key_stays_cheap_however_large_the_ban_set_grows() {
    let certs = TestCerts::new();
    let redis = RedisServer::start();
    let auth = "[auth]\nmax_failures = 1\nban_duration = \"1h\"\n";
    let (a, b) = two_admin_replicas(&certs, &redis, auth);
    let limit = SYNC + Duration::from_secs(1);
    bad_token(a.addr, &certs, 110).await;
    bad_token(a.addr, &certs, 110).await;
    for p in [&a, &b] {
        wait_admission(p.addr, &certs, 110, true, limit).await;
    }
    // 100,000 sprayed keys banned for 30 min: before the key's own (1 h) when read by score.
    grow_ban_set(&redis, 100_000, 30 * 60 * 1000);
    let mut connection = redis.connection().unwrap();
    // A scan of the 100,000 members took ~320 ms per lift before the fix; 200 ms leaves
    // room for a loaded machine taking the Redis process away for a while.
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("slowlog-log-slower-than")
        .arg(200_000)
        .query(&mut connection)
        .unwrap();
    let _: () = redis::cmd("SLOWLOG")
        .arg("RESET")
        .query(&mut connection)
        .unwrap();

    // A replica that starts now reads every live ban, the key's among them, in pages.
    let c = admin_replica(&certs, &redis, auth);
    wait_cluster_up(&c, 1.0, Duration::from_secs(5));
    wait_admission(c.addr, &certs, 110, true, Duration::from_secs(30)).await;

    let (status, body) = delete_ban(b.admin, "127.0.0.110").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("shared with every replica"), "{body}");
    let lifted = Instant::now();
    for p in [&b, &a, &c] {
        let left = limit.saturating_sub(lifted.elapsed());
        wait_admission(p.addr, &certs, 110, false, left).await;
    }
    tokio::time::sleep(SYNC * 10).await;
    for p in [&a, &b, &c] {
        assert_eq!(
            sample(&scrape(p.admin), "portcullis_cluster_up"),
            1.0,
            "{}",
            p.stderr()
        );
    }
    assert_eq!(
        slow_calls(&redis),
        0,
        "no call took Redis 200 ms: lifts and the paged read stay cheap"
    );
    let members: u64 = redis::cmd("ZCARD")
        .arg("portcullis:bans")
        .query(&mut connection)
        .unwrap();
    assert_eq!(members, 100_000, "the key's ban alone was lifted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_ban_list_read_from_redis_is_checked_and_capped() {
    let certs = TestCerts::new();
    let redis = RedisServer::start();
    // admin.max_bans = 16 on the replica.
    let a = admin_replica(&certs, &redis, "");
    wait_cluster_up(&a, 1.0, Duration::from_secs(5));
    // Whoever can write to Redis writes 40 networks, one of them not truncated, and a
    // new version.
    let mut connection = redis.connection().unwrap();
    let (sec, _): (i64, i64) = redis::cmd("TIME").query(&mut connection).unwrap();
    let until = sec * 1000 + 3_600_000;
    let mut zadd = redis::cmd("ZADD");
    zadd.arg("portcullis:adminbans")
        .arg(until - 1000)
        .arg("127.0.0.121/30");
    for i in 0..39 {
        zadd.arg(until).arg(format!("198.18.{i}.0/24"));
    }
    let _: u64 = zadd.query(&mut connection).unwrap();
    let _: () = redis::cmd("SET")
        .arg("portcullis:adminbans:version")
        .arg("999999 test")
        .query(&mut connection)
        .unwrap();
    for key in ["portcullis:adminbans", "portcullis:adminbans:version"] {
        let _: u8 = redis::cmd("PEXPIRE")
            .arg(key)
            .arg(3_600_000)
            .query(&mut connection)
            .unwrap();
    }
    wait_admission(a.addr, &certs, 121, true, SYNC + Duration::from_secs(1)).await;
    let (_, list) = list_bans(a.admin).await;
    assert!(list.contains(r#""key":"127.0.0.120/30""#), "{list}");
    assert_eq!(
        list.matches(r#""reason":"admin""#).count(),
        16,
        "admin.max_bans: {list}"
    );
    let log = a.stderr();
    assert_eq!(
        log.matches("more admin bans than admin.max_bans").count(),
        1,
        "{log}"
    );
    // The truncated network is what an operator lifts.
    let (status, body) = delete_ban(a.admin, "127.0.0.120/30").await;
    assert_eq!(status, 200, "{body}");
    assert!(admitted(a.addr, &certs, 121).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_gone_back_in_time_does_not_roll_the_admin_bans_back() {
    let certs = TestCerts::new();
    let redis = RedisServer::start();
    let (a, b) = two_admin_replicas(&certs, &redis, "");
    let limit = SYNC + Duration::from_secs(1);
    let version = "portcullis:adminbans:version";
    let mut connection = redis.connection().unwrap();
    assert_eq!(
        post_ban(a.admin, r#"{"cidr": "127.0.0.131/32", "duration": "1h"}"#)
            .await
            .0,
        201
    );
    let snapshot: String = redis::cmd("GET")
        .arg(version)
        .query(&mut connection)
        .unwrap();
    assert_eq!(
        post_ban(a.admin, r#"{"cidr": "127.0.0.132/32", "duration": "1h"}"#)
            .await
            .0,
        201
    );
    for p in [&a, &b] {
        wait_admission(p.addr, &certs, 132, true, limit).await;
    }

    // Redis as restored from the snapshot taken between the two bans.
    let _: u8 = redis::cmd("ZREM")
        .arg("portcullis:adminbans")
        .arg("127.0.0.132/32")
        .query(&mut connection)
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg(version)
        .arg(&snapshot)
        .arg("KEEPTTL")
        .query(&mut connection)
        .unwrap();

    // The replicas notice, log it and publish the ban again: it holds everywhere, and on a
    // replica started afterwards.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let newer: String = redis::cmd("GET")
            .arg(version)
            .query(&mut connection)
            .unwrap();
        if newer != snapshot {
            break;
        }
        assert!(Instant::now() < deadline, "no replica republished");
        tokio::time::sleep(SYNC).await;
    }
    tokio::time::sleep(SYNC * 5).await;
    for p in [&a, &b] {
        assert!(!admitted(p.addr, &certs, 132).await, "{}", p.stderr());
        assert!(!admitted(p.addr, &certs, 131).await);
    }
    let log = format!("{}{}", a.stderr(), b.stderr());
    assert!(log.contains("rolled back the admin bans"), "{log}");
    let c = admin_replica(&certs, &redis, "");
    wait_cluster_up(&c, 1.0, Duration::from_secs(5));
    wait_admission(c.addr, &certs, 132, true, limit).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ban_the_cluster_refuses_closes_nothing_and_every_write_is_logged() {
    let certs = TestCerts::new();
    let redis = RedisServer::start();
    let a = replica(&certs, Some(&redis), &admin_section(1));
    wait_cluster_up(&a, 1.0, Duration::from_secs(5));
    let mut open = Client::connect_with(a.addr, &certs, from(141))
        .await
        .unwrap();
    assert_eq!(open.request_line("PING").await, "OK PONG");
    // The cluster's one ban (admin.max_bans = 1) is one this replica has not read yet.
    let mut connection = redis.connection().unwrap();
    let _: u64 = redis::cmd("ZADD")
        .arg("portcullis:adminbans")
        .arg(i64::MAX / 2)
        .arg("198.18.0.0/24")
        .query(&mut connection)
        .unwrap();
    let _: u8 = redis::cmd("PEXPIRE")
        .arg("portcullis:adminbans")
        .arg(3_600_000)
        .query(&mut connection)
        .unwrap();

    let (status, body) = post_ban(a.admin, r#"{"cidr": "127.0.0.140/30", "duration": "1h"}"#).await;
    assert_eq!(status, 507, "{body}");
    assert_eq!(
        open.request_line("PING").await,
        "OK PONG",
        "a refused ban closed an open connection"
    );
    assert!(admitted(a.addr, &certs, 142).await);
    assert_eq!(delete_ban(a.admin, "127.0.0.150").await.0, 404);
    assert_eq!(delete_ban(a.admin, "not-an-address").await.0, 400);
    let log = a.stderr();
    for outcome in [
        "refused by the cluster",
        "error=no such ban",
        "not a CIDR or an address (400)",
    ] {
        assert!(
            log.lines()
                .any(|l| l.contains(outcome) && l.contains(CURL_SOURCE)),
            "{outcome}: {log}"
        );
    }
}

/// Runs the sync script once, with the key layout of `src/cluster/sync.rs` (prefix
/// `portcullis:`, 11 buckets, 2,000 keys per sync), as a replica publishing `adds`
/// (client key, new admissions); returns their totals.
fn sync_once(connection: &mut redis::Connection, adds: &[(&str, u64)]) -> Vec<u64> {
    let script = redis::Script::new(include_str!("../src/cluster/sync.lua"));
    let mut call = script.prepare_invoke();
    for key in [
        "replicas",
        "bans",
        "banlog",
        "adminbans",
        "adminbans:version",
        "rates",
    ] {
        call.key(format!("portcullis:{key}"));
    }
    for slot in 0..12 {
        call.key(format!("portcullis:rates:second:{slot}"));
    }
    call.arg("test").arg(adds.len()).arg(0).arg(0);
    call.arg(60_000)
        .arg(5)
        .arg(1_000)
        .arg(11)
        .arg(-1)
        .arg(0)
        .arg(2_000);
    call.arg(adds.len());
    for (_, count) in adds {
        call.arg(*count);
    }
    for (key, _) in adds {
        call.arg(*key);
    }
    call.arg("").arg(1024).arg("ab").arg(0).arg(0);
    let mut reply: Vec<redis::Value> = call.invoke(connection).expect("sync script");
    redis::from_redis_value(reply.swap_remove(2)).expect("totals")
}

/// Redis' clock, in seconds.
fn redis_second(connection: &mut redis::Connection) -> u64 {
    let (now, _): (u64, u64) = redis::cmd("TIME").query(connection).unwrap();
    now
}

/// Writes a second's rate hash as replicas would have left it: `keys` client keys
/// (10.x.y.z) with one admission each, counted in the totals too.
fn write_second(connection: &mut redis::Connection, second: u64, keys: usize) -> String {
    let slot = format!("portcullis:rates:second:{}", second % 12);
    let _: () = redis::cmd("HSET")
        .arg(&slot)
        .arg(":second")
        .arg(second)
        .query(connection)
        .unwrap();
    for first in (0..keys).step_by(1000) {
        let mut fields = Vec::new();
        for i in first..(first + 1000).min(keys) {
            fields.push(format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255));
            fields.push("1".to_owned());
        }
        for key in [slot.as_str(), "portcullis:rates"] {
            let _: () = redis::cmd("HSET")
                .arg(key)
                .arg(&fields)
                .query(connection)
                .unwrap();
        }
    }
    for key in [slot.as_str(), "portcullis:rates"] {
        let _: () = redis::cmd("PEXPIRE")
            .arg(key)
            .arg(60_000)
            .query(connection)
            .unwrap();
    }
    slot
}

/// Runs empty syncs until the totals are empty (within 1,000 calls); returns how many it
/// took, each checked to drain at most `max` fields.
fn drain_all(redis: &RedisServer, connection: &mut redis::Connection, max: u64) -> usize {
    let mut calls = 0;
    let mut left = redis.hlen("portcullis:rates");
    while left > 0 {
        sync_once(connection, &[]);
        calls += 1;
        let now_left = redis.hlen("portcullis:rates");
        // A call may drain nothing when its scan resumes near the end of the table.
        assert!(
            now_left <= left && left - now_left <= max,
            "call {calls} drained {} fields",
            left as i64 - now_left as i64
        );
        assert!(
            calls < 1000,
            "the totals never empty: {now_left} fields left"
        );
        left = now_left;
    }
    calls
}

#[test]
fn a_sprayed_second_leaves_the_totals_in_bounded_steps() {
    // One second's hash as an address spray over many replicas leaves it: 50,000 client
    // keys. Draining it all in one call would hold Redis (and every replica's sync) for
    // about as long as the 1 s timeout; each call drains a bounded share instead.
    let redis = RedisServer::start();
    let mut connection = redis.connection().expect("redis connection");
    let second = redis_second(&mut connection) - 20;
    let slot = write_second(&mut connection, second, 50_000);
    // Near its TTL: a hash left to drain must not expire with counts still in the totals.
    let _: () = redis::cmd("PEXPIRE")
        .arg(&slot)
        .arg(5_000)
        .query(&mut connection)
        .unwrap();
    sync_once(&mut connection, &[]);
    assert!(redis.pttl(&slot) > 50_000, "draining renews its TTL");
    let calls = 1 + drain_all(&redis, &mut connection, 4_000);
    assert!(calls >= 13, "{calls} calls");
    assert!(
        !redis.keys().contains(&slot),
        "the second's hash is gone once drained"
    );
}

#[test]
fn a_drain_resumed_from_another_redis_process_cursor_misses_nothing() {
    // A partial drain keeps its HSCAN cursor in the second's hash. After a Redis restart
    // or failover the hash seed differs, so that cursor resumes at an arbitrary point:
    // the fields it skips must still leave the totals.
    let redis = RedisServer::start();
    let mut connection = redis.connection().expect("redis connection");
    let second = redis_second(&mut connection) - 20;
    let slot = write_second(&mut connection, second, 10_000);
    sync_once(&mut connection, &[]);
    let left = redis.hlen("portcullis:rates");
    assert!(
        left > 0 && left < 10_000,
        "{left} fields left after one call"
    );
    // A cursor from another process: most of the table lies before it (HSCAN visits the
    // buckets in reversed-bit order; the low 13 bits set are near the end of it).
    let _: () = redis::cmd("HSET")
        .arg(&slot)
        .arg(":cursor")
        .arg(8191)
        .query(&mut connection)
        .unwrap();
    drain_all(&redis, &mut connection, 4_000);
}

#[test]
fn counts_left_from_before_a_cluster_wide_pause_never_reduce_new_totals() {
    // Nothing synced for 20 s (every replica cut off) while a second of 10,000 keys was
    // still to drain: what it holds is older than the window. New admissions of the same
    // keys must count in full, not have the old counts drained out of them later.
    let redis = RedisServer::start();
    let mut connection = redis.connection().expect("redis connection");
    let second = redis_second(&mut connection) - 30;
    write_second(&mut connection, second, 10_000);
    let _: () = redis::cmd("PEXPIRE")
        .arg("portcullis:rates")
        .arg(41_000)
        .query(&mut connection)
        .unwrap();
    let keys: Vec<String> = (0..100).map(|i| format!("10.0.0.{i}")).collect();
    let adds: Vec<(&str, u64)> = keys.iter().map(|k| (k.as_str(), 5)).collect();
    assert_eq!(sync_once(&mut connection, &adds), vec![5; 100]);
    for _ in 0..5 {
        sync_once(&mut connection, &[]);
    }
    let totals: Vec<Option<u64>> = redis::cmd("HMGET")
        .arg("portcullis:rates")
        .arg(&keys)
        .query(&mut connection)
        .unwrap();
    assert_eq!(
        totals,
        vec![Some(5); 100],
        "old counts were drained from new totals"
    );
}

#[test]
fn a_call_never_drains_a_whole_backlog_to_reuse_a_slot() {
    // The slot of the current second still holds a second of 30,000 keys that left the
    // window (draining fell a window behind): the call drains its bounded share, takes the
    // slot over with what is left in it (those counts leave the totals later, with the new
    // second) and publishes its counts.
    let redis = RedisServer::start();
    let mut connection = redis.connection().expect("redis connection");
    let now = redis_second(&mut connection);
    // The slot of the next second, so that the call below lands on it.
    let slot = write_second(&mut connection, now + 1 - 12, 30_000);
    while redis_second(&mut connection) < now + 1 {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(sync_once(&mut connection, &[("192.0.2.1", 3)]), vec![3]);
    let left = redis.hlen("portcullis:rates");
    assert!(left > 26_000, "one call drained {} fields", 30_001 - left);
    let second: u64 = redis::cmd("HGET")
        .arg(&slot)
        .arg(":second")
        .query(&mut connection)
        .unwrap();
    assert_eq!(second, now + 1, "the slot holds the new second");
    assert!(redis.pttl(&slot) > 50_000, "its TTL was renewed");
}
