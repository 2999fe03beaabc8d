//! Admission cost: the per-key checks with 1 key and with 100,000 keys (ns/op), and the
//! memory each key costs (printed once, measured from RSS).

use std::net::IpAddr;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use portcullis::admission::Admission;
use portcullis::config::Config;

fn ip(i: u32) -> IpAddr {
    IpAddr::from((0x0A00_0000 + i).to_be_bytes())
}

fn admission() -> Admission {
    let mut config = Config::default();
    config.limits.connection_rate_per_ip = 1_000_000_000;
    config.limits.connection_burst_per_ip = 1_000_000_000;
    Admission::new(&config)
}

fn rss_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0)
        * 4096
}

/// Bytes of RSS per rate-limiter key, over `n` keys.
fn bytes_per_key(n: u32) -> f64 {
    let adm = admission();
    let before = rss_bytes();
    for i in 0..n {
        drop(adm.admit_client(ip(i)));
    }
    let grown = rss_bytes().saturating_sub(before);
    assert_eq!(adm.keys().connection_rate, n as usize);
    grown as f64 / f64::from(n)
}

fn limiter(c: &mut Criterion) {
    println!(
        "memory: {:.0} bytes per rate-limiter key (1,000,000 keys, RSS)",
        bytes_per_key(1_000_000)
    );
    let mut group = c.benchmark_group("admit_client");
    group.measurement_time(Duration::from_secs(3));
    for keys in [1u32, 100_000] {
        let adm = admission();
        for i in 0..keys {
            drop(adm.admit_client(ip(i)));
        }
        let mut i = 0u32;
        group.bench_function(format!("{keys}_keys"), |b| {
            b.iter(|| {
                i = (i + 1) % keys;
                drop(adm.admit_client(ip(i)).expect("admitted"))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, limiter);
criterion_main!(benches);
