//! A bare TLS relay: the least a gateway in front of a backend must do per message (the
//! TLS record layer, the reads and writes, the event loop), and nothing else. It is the
//! floor that benches/relay.sh sets beside portcullis, HAProxy and nginx: how much CPU per
//! relayed message any rustls relay spends on this machine, with epoll and with io_uring.
//!
//! Usage: `bare-relay <epoll|uring> LISTEN BACKEND CERT_PEM KEY_PEM`.

use std::fs::File;
use std::io::BufReader;
use std::sync::Arc;

use monoio::io::{AsyncWriteRent, Splitable};
use monoio::net::{TcpListener, TcpStream};
use monoio_rustls::TlsAcceptor;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, driver, listen, backend, cert, key] = args.as_slice() else {
        eprintln!("usage: bare-relay <epoll|uring> LISTEN BACKEND CERT_PEM KEY_PEM");
        std::process::exit(2);
    };
    let acceptor = acceptor(cert, key);
    let served = serve(listen.clone(), backend.clone(), acceptor);
    match driver.as_str() {
        // Without COOP_TASKRUN every completion interrupts the loop with a signal-like task
        // run: a third fewer messages per CPU-second on this machine.
        "uring" => {
            let mut uring = io_uring::IoUring::builder();
            uring.setup_coop_taskrun().setup_taskrun_flag();
            monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
                .with_entries(4096)
                .uring_builder(uring)
                .build()
                .expect("an io_uring runtime")
                .block_on(served)
        }
        "epoll" => monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .build()
            .expect("an epoll runtime")
            .block_on(served),
        other => {
            eprintln!("unknown driver {other}: epoll or uring");
            std::process::exit(2);
        }
    }
}

/// rustls with the aws-lc-rs provider, as portcullis uses it.
fn acceptor(cert: &str, key: &str) -> TlsAcceptor {
    let open = |path: &str| BufReader::new(File::open(path).expect("a readable PEM file"));
    let certs = rustls_pemfile::certs(&mut open(cert))
        .collect::<Result<Vec<_>, _>>()
        .expect("certificates");
    let key = rustls_pemfile::private_key(&mut open(key))
        .expect("a private key")
        .expect("a private key");
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("a certificate and key that match");
    TlsAcceptor::from(Arc::new(config))
}

async fn serve(listen: String, backend: String, acceptor: TlsAcceptor) {
    let listener = TcpListener::bind(listen).expect("the listen address");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        monoio::spawn(relay(stream, backend.clone(), acceptor.clone()));
    }
}

/// Handshake, connect the backend, copy both ways; each side's EOF is passed on.
async fn relay(stream: TcpStream, backend: String, acceptor: TlsAcceptor) {
    let Ok(client) = acceptor.accept(stream).await else {
        return;
    };
    let Ok(upstream) = TcpStream::connect(backend.as_str()).await else {
        return;
    };
    let _ = upstream.set_nodelay(true);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut upstream_read, mut upstream_write) = upstream.into_split();
    let to_upstream = async {
        let _ = monoio::io::copy(&mut client_read, &mut upstream_write).await;
        let _ = upstream_write.shutdown().await;
    };
    let to_client = async {
        let _ = monoio::io::copy(&mut upstream_read, &mut client_write).await;
        let _ = client_write.shutdown().await;
    };
    monoio::join!(to_upstream, to_client);
}
