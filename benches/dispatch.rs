//! Command dispatch: parse a request and apply it (PING, ECHO of 64 bytes, AUTH, WHOAMI).

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use portcullis::auth::{token_digest_hex, TokenStore};
use portcullis::codec::Framing;
use portcullis::command::{apply, Context, Request};
use portcullis::config::{AuthMode, TokenEntry};

fn dispatch(c: &mut Criterion) {
    let tokens = TokenStore::from_entries(&[TokenEntry {
        name: "alice".into(),
        sha256: token_digest_hex("tok"),
    }])
    .expect("valid digest");
    let mut group = c.benchmark_group("dispatch");
    let echo = format!("ECHO {}", "x".repeat(64));
    for (name, line) in [
        ("ping", "PING"),
        ("echo64", echo.as_str()),
        ("auth", "AUTH tok"),
        ("whoami", "WHOAMI"),
    ] {
        let request = Bytes::from(line.to_string());
        group.bench_function(name, |b| {
            b.iter(|| {
                let mut principal = None;
                let mut ctx = Context {
                    principal: &mut principal,
                    mode: AuthMode::None,
                    tokens: &tokens,
                    client_ip: "192.0.2.1".parse().expect("ip"),
                    tls_version: "TLSv1_3",
                    cipher: "TLS13_AES_128_GCM_SHA256",
                    framing: Framing::Text,
                };
                let (reply, _) = apply(Request::parse(request.clone()), &mut ctx);
                assert!(reply.is_ok());
            })
        });
    }
    group.finish();
}

criterion_group!(benches, dispatch);
criterion_main!(benches);
