//! Commands: any request bytes, parsed with `Request::parse` and served by `command::apply`
//! (auth mode `any`, one token "alice" = sha256("tok")), must never panic, and the reply's
//! wire form must start with `OK` or `ERR `. Each input is served twice, on an
//! unauthenticated connection and on one already authenticated as alice, so the commands
//! behind the NOAUTH gate are reached too.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use portcullis::auth::{token_digest_hex, TokenStore};
use portcullis::codec::Framing;
use portcullis::command::{apply, Context, Request};
use portcullis::config::{AuthMode, TokenEntry};

fuzz_target!(|data: &[u8]| {
    let tokens = TokenStore::from_entries(&[TokenEntry {
        name: "alice".into(),
        sha256: token_digest_hex("tok"),
    }])
    .unwrap();
    let alice = tokens.verify(b"tok").expect("alice's token");
    for mut principal in [None, Some(alice)] {
        let mut ctx = Context {
            principal: &mut principal,
            mode: AuthMode::Any,
            tokens: &tokens,
            client_ip: "127.0.0.1".parse().unwrap(),
            tls_version: "TLSv1_3",
            cipher: "TLS13_AES_128_GCM_SHA256",
            framing: Framing::Binary,
        };
        let request = Request::parse(Bytes::copy_from_slice(data));
        let (reply, _after) = apply(request, &mut ctx);
        let wire = reply.parts().concat();
        assert!(
            wire.starts_with(b"OK") || wire.starts_with(b"ERR "),
            "bad reply {wire:?}"
        );
    }
});
