//! SPEC 9 (issue 13, finding 4): the real binary under a small RLIMIT_NOFILE. Start-up
//! warns when `max_connections` cannot fit, and once descriptors run out a new client is
//! refused at once (the reserved descriptor accepts and resets it) instead of waiting in
//! the listen backlog until its own timeout.

mod support;

use std::time::{Duration, Instant};

use support::*;

/// The soft and hard limit the gateway runs under: it cannot raise it.
const NOFILE: libc::rlim_t = 256;

/// Waits up to `limit` for the gateway's log to hold `marker`.
async fn wait_for_log(gateway: &Process, marker: &str, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if gateway.stderr().contains(marker) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_open_file_limit_a_client_is_refused_not_left_in_the_backlog() {
    let certs = TestCerts::new();
    let config = write_config(
        &certs,
        "[limits]\nconnection_rate_per_ip = 10000\nconnection_burst_per_ip = 10000\n\
         handshake_timeout = \"30s\"\n",
    );
    let gateway = Process::gateway_with_nofile(&config, NOFILE);
    let log = gateway.stderr();
    assert!(
        log.contains("open-file limit (RLIMIT_NOFILE) is 256")
            && log.contains("max_connections = 10000"),
        "no start-up warning naming both numbers: {log}"
    );

    // Silent connections from five addresses, more than the gateway has descriptors for.
    let mut held = Vec::new();
    for i in 0..300u16 {
        if let Ok(tcp) = tcp_connect(gateway.addr, src(60 + (i % 5) as u8)).await {
            held.push(tcp);
        }
    }
    assert!(
        wait_for_log(&gateway, "accept failed", Duration::from_secs(5)).await,
        "the gateway never ran out of descriptors: {}",
        gateway.stderr()
    );

    // A client over the limit is refused at once, not left hanging in the backlog.
    let started = Instant::now();
    let result = Client::connect_with(gateway.addr, &certs, from(70)).await;
    let took = started.elapsed();
    let err = match result {
        Ok(_) => panic!("a client over the descriptor limit got a session"),
        Err(e) => e,
    };
    assert_ne!(
        err.kind(),
        std::io::ErrorKind::TimedOut,
        "the client hung until its own timeout ({took:?}): {}",
        gateway.stderr()
    );
    assert!(
        took < Duration::from_secs(2),
        "refusal took {took:?}: {err}"
    );

    // Once descriptors are free again, the gateway serves as before.
    drop(held);
    let mut served = false;
    for _ in 0..50 {
        if let Ok(mut c) = Client::connect_with(gateway.addr, &certs, from(70)).await {
            if c.request_line("PING").await == "OK PONG" {
                served = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(served, "not serving after the flood: {}", gateway.stderr());
}
