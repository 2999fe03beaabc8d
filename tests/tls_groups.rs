//! Post-quantum key exchange and cipher-suite order (SPEC 9), seen from a real rustls
//! client: which group and suite the handshake settles on.

mod support;

use portcullis::config::CipherPreference;
use rustls::crypto::aws_lc_rs::cipher_suite::{
    TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
    TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384, TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
};
use rustls::crypto::aws_lc_rs::kx_group::{SECP256R1, SECP384R1, X25519, X25519MLKEM768};
use rustls::crypto::SupportedKxGroup;
use rustls::{CipherSuite, NamedGroup, SupportedCipherSuite};
use support::*;

/// Connects offering `groups` and `suites`, checks the connection serves, and returns the
/// group and suite the handshake settled on.
async fn negotiate(
    server: &TestServer,
    certs: &TestCerts,
    groups: &[&'static dyn SupportedKxGroup],
    suites: Option<&[SupportedCipherSuite]>,
    tls12_only: bool,
) -> (NamedGroup, CipherSuite) {
    let options = ClientOptions {
        groups: Some(groups.to_vec()),
        suites: suites.map(<[_]>::to_vec),
        tls12_only,
        ..Default::default()
    };
    let mut client = Client::connect_with(server.addr, certs, options)
        .await
        .expect("handshake");
    assert_eq!(client.request_line("PING").await, "OK PONG");
    let conn = client.stream.get_ref().1;
    let group = conn
        .negotiated_key_exchange_group()
        .expect("a key exchange happened")
        .name();
    let suite = conn.negotiated_cipher_suite().expect("a suite").suite();
    (group, suite)
}

#[tokio::test]
async fn a_client_offering_the_hybrid_group_negotiates_it() {
    let certs = TestCerts::new();
    let server = TestServer::start(test_config(&certs)).await;
    // What browsers and OpenSSL 3.5 offer, in their order.
    let browser = [X25519MLKEM768, X25519, SECP256R1, SECP384R1];
    let (group, _) = negotiate(&server, &certs, &browser, None, false).await;
    assert_eq!(group, NamedGroup::X25519MLKEM768);
}

#[tokio::test]
async fn classical_clients_negotiate_their_curve() {
    let certs = TestCerts::new();
    let server = TestServer::start(test_config(&certs)).await;
    for (group, expected) in [
        (X25519, NamedGroup::X25519),
        (SECP256R1, NamedGroup::secp256r1),
        (SECP384R1, NamedGroup::secp384r1),
    ] {
        let (negotiated, _) = negotiate(&server, &certs, &[group], None, false).await;
        assert_eq!(negotiated, expected);
    }
    // TLS 1.2 has no hybrid group; X25519 it is.
    let (negotiated, _) = negotiate(&server, &certs, &[X25519MLKEM768, X25519], None, true).await;
    assert_eq!(negotiated, NamedGroup::X25519);
}

#[tokio::test]
async fn the_server_cipher_order_wins_by_default_and_the_client_order_when_configured() {
    let certs = TestCerts::new();
    // A client that prefers ChaCha20 (no AES hardware): the server's order (AES-128-GCM,
    // then AES-256-GCM, then ChaCha20) picks the first AES suite the client offers.
    let chacha_first13 = [
        TLS13_CHACHA20_POLY1305_SHA256,
        TLS13_AES_128_GCM_SHA256,
        TLS13_AES_256_GCM_SHA384,
    ];
    let chacha_first12 = [
        TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
    ];

    let config = test_config(&certs);
    assert_eq!(config.tls.cipher_preference, CipherPreference::Server);
    let server = TestServer::start(config).await;
    let (_, suite) = negotiate(&server, &certs, &[X25519], Some(&chacha_first13), false).await;
    assert_eq!(suite, CipherSuite::TLS13_AES_128_GCM_SHA256);
    let (_, suite) = negotiate(&server, &certs, &[X25519], Some(&chacha_first12), true).await;
    assert_eq!(suite, CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384);

    let mut config = test_config(&certs);
    config.tls.cipher_preference = CipherPreference::Client;
    let server = TestServer::start(config).await;
    let (_, suite) = negotiate(&server, &certs, &[X25519], Some(&chacha_first13), false).await;
    assert_eq!(suite, CipherSuite::TLS13_CHACHA20_POLY1305_SHA256);
    let (_, suite) = negotiate(&server, &certs, &[X25519], Some(&chacha_first12), true).await;
    assert_eq!(
        suite,
        CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
    );
}
