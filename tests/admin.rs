//! The admin listener under a slow-header (slowloris) trickle, against the real binary:
//! `portcullis healthcheck` keeps answering, a trickling request is cut at
//! `admin.header_timeout`, and shutdown is never held up (SPEC 9).

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// The request the attackers trickle, one byte at a time; it never completes in the test.
const TRICKLE: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: admin\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n";

/// Keeps one admin connection trickling a header byte every `every`, reconnecting whenever
/// the gateway closes it, until `stop`.
async fn trickle(admin: SocketAddr, every: Duration, stop: CancellationToken) {
    while !stop.is_cancelled() {
        let Ok(mut tcp) = TcpStream::connect(admin).await else {
            tokio::time::sleep(every).await;
            continue;
        };
        for byte in TRICKLE {
            if tcp.write_all(&[*byte]).await.is_err() {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.cancelled() => return,
            }
        }
    }
}

/// Starts `n` trickling connections; they stop when the returned token is cancelled.
fn trickle_many(admin: SocketAddr, n: usize, every: Duration) -> CancellationToken {
    let stop = CancellationToken::new();
    for _ in 0..n {
        tokio::spawn(trickle(admin, every, stop.clone()));
    }
    stop
}

/// Runs `portcullis healthcheck --url http://ADMIN/healthz`; true when it exits 0.
async fn healthcheck(admin: SocketAddr) -> (bool, String) {
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args(["healthcheck", "--url", &format!("http://{admin}/healthz")])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Waits for `process` to exit, up to `limit`; returns how long that took.
async fn exit_within(mut process: Process, limit: Duration) -> Duration {
    let started = Instant::now();
    let status = tokio::task::spawn_blocking(move || process.wait_exit(limit))
        .await
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_trickle_neither_holds_the_admin_listener_nor_delays_exit() {
    let certs = TestCerts::new();
    // drain_timeout small; header_timeout 2 s; admin.max_connections stays at its default 64.
    let gateway = Process::gateway_with_env(
        &certs,
        "",
        &[
            ("PORTCULLIS_SERVER_DRAIN_TIMEOUT", "2s"),
            ("PORTCULLIS_ADMIN_HEADER_TIMEOUT", "2s"),
        ],
    );
    let admin = gateway.admin;

    // One trickling request is cut at header_timeout, although every byte restarts the idle
    // timer (admin.idle_timeout is 30 s).
    let mut slow = TcpStream::connect(admin).await.unwrap();
    let opened = Instant::now();
    let mut buf = [0u8; 256];
    let cut = async {
        for byte in TRICKLE {
            if slow.write_all(&[*byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        // Whole request line never sent: wait for the close (408, EOF or reset).
        loop {
            match slow.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(6), cut)
        .await
        .expect("a trickling request was never cut off");
    let took = opened.elapsed();
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(5),
        "cut after {took:?}, expected about header_timeout (2 s)"
    );

    // 64 connections trickle a header byte every 700 ms and reconnect when cut: the health
    // check answers throughout, across several header_timeout rounds.
    let attack = trickle_many(admin, 64, Duration::from_millis(700));
    tokio::time::sleep(Duration::from_millis(500)).await;
    for round in 0..4 {
        let (ok, stderr) = healthcheck(admin).await;
        assert!(
            ok,
            "healthcheck {round} failed during the trickle: {stderr}"
        );
        tokio::time::sleep(Duration::from_millis(1200)).await;
    }

    // SIGTERM during the trickle: the process exits within drain_timeout.
    gateway.signal(libc::SIGTERM);
    let took = exit_within(gateway, Duration::from_secs(10)).await;
    attack.cancel();
    assert!(
        took < Duration::from_secs(2),
        "exit took {took:?} with drain_timeout 2 s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once_despite_a_trickle() {
    let certs = TestCerts::new();
    let gateway =
        Process::gateway_with_env(&certs, "", &[("PORTCULLIS_SERVER_DRAIN_TIMEOUT", "20s")]);
    // A request in flight keeps the drain waiting for drain_timeout (20 s)...
    let mut busy = Client::authed(gateway.addr, &certs).await;
    busy.send(b"ECHO never-finished").await;
    // ...and 16 admin connections trickle headers.
    let attack = trickle_many(gateway.admin, 16, Duration::from_millis(300));
    tokio::time::sleep(Duration::from_millis(500)).await;

    gateway.signal(libc::SIGTERM);
    tokio::time::sleep(Duration::from_millis(500)).await;
    gateway.signal(libc::SIGTERM);
    let took = exit_within(gateway, Duration::from_secs(10)).await;
    attack.cancel();
    assert!(
        took < Duration::from_millis(1800),
        "exit took {took:?} after the second signal"
    );
    busy.expect_closed().await;
}
