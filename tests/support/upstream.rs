//! A test upstream: a loopback listener that counts accepts and hands each connection to
//! the test, which reads the PROXY v2 header and the frames and writes replies itself.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::REPLY_TIMEOUT;

/// A listening test upstream.
pub struct MockUpstream {
    pub addr: SocketAddr,
    accepts: Arc<AtomicUsize>,
    connections: mpsc::UnboundedReceiver<TcpStream>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl MockUpstream {
    pub async fn start() -> MockUpstream {
        MockUpstream::start_on("127.0.0.1:0".parse().unwrap()).await
    }

    pub async fn start_on(addr: SocketAddr) -> MockUpstream {
        let listener = TcpListener::bind(addr).await.expect("bind upstream");
        let addr = listener.local_addr().unwrap();
        let accepts = Arc::new(AtomicUsize::new(0));
        let (tx, connections) = mpsc::unbounded_channel();
        let counter = accepts.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                if tx.send(stream).is_err() {
                    return;
                }
            }
        });
        MockUpstream {
            addr,
            accepts,
            connections,
            task,
        }
    }

    /// Connections accepted so far.
    pub fn accepts(&self) -> usize {
        self.accepts.load(Ordering::SeqCst)
    }

    /// The next accepted connection (fails the test after [`REPLY_TIMEOUT`]).
    pub async fn next(&mut self) -> UpstreamConn {
        let stream = tokio::time::timeout(REPLY_TIMEOUT, self.connections.recv())
            .await
            .expect("no upstream connection in time")
            .expect("listener gone");
        UpstreamConn {
            stream,
            buf: BytesMut::new(),
        }
    }
}

/// What a PROXY v2 header said.
#[derive(Debug)]
pub struct ProxyInfo {
    pub local: bool,
    pub source: Option<SocketAddr>,
    pub destination: Option<SocketAddr>,
    pub tlvs: Vec<(u8, Vec<u8>)>,
}

impl ProxyInfo {
    pub fn tlv(&self, kind: u8) -> Option<&[u8]> {
        self.tlvs
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, v)| v.as_slice())
    }

    pub fn tlv_str(&self, kind: u8) -> String {
        String::from_utf8_lossy(self.tlv(kind).unwrap_or(b"<absent>")).into_owned()
    }

    /// The SSL TLV's client flags and sub-TLVs.
    pub fn ssl(&self) -> (u8, Vec<(u8, String)>) {
        let ssl = self.tlv(0x20).expect("SSL TLV");
        let subs = ppp::v2::TypeLengthValues::from(&ssl[5..])
            .map(|t| t.expect("sub-TLV"))
            .map(|t| (t.kind, String::from_utf8_lossy(&t.value).into_owned()))
            .collect();
        (ssl[0], subs)
    }
}

/// One connection from the gateway.
pub struct UpstreamConn {
    pub stream: TcpStream,
    buf: BytesMut,
}

impl UpstreamConn {
    async fn fill(&mut self) -> usize {
        self.buf.reserve(8192);
        tokio::time::timeout(REPLY_TIMEOUT, self.stream.read_buf(&mut self.buf))
            .await
            .expect("the gateway sent nothing in time")
            .unwrap_or(0)
    }

    /// Reads and parses the PROXY v2 header.
    pub async fn read_header(&mut self) -> ProxyInfo {
        loop {
            if self.buf.len() >= 16 {
                let len = 16 + u16::from_be_bytes([self.buf[14], self.buf[15]]) as usize;
                if self.buf.len() >= len {
                    let bytes = self.buf.split_to(len);
                    let header = ppp::v2::Header::try_from(&bytes[..]).expect("PROXY v2 header");
                    let (source, destination) = match header.addresses {
                        ppp::v2::Addresses::IPv4(a) => (
                            Some(SocketAddr::from((a.source_address, a.source_port))),
                            Some(SocketAddr::from((
                                a.destination_address,
                                a.destination_port,
                            ))),
                        ),
                        ppp::v2::Addresses::IPv6(a) => (
                            Some(SocketAddr::from((a.source_address, a.source_port))),
                            Some(SocketAddr::from((
                                a.destination_address,
                                a.destination_port,
                            ))),
                        ),
                        _ => (None, None),
                    };
                    let tlvs = header
                        .tlvs()
                        .map(|t| t.expect("TLV"))
                        .map(|t| (t.kind, t.value.to_vec()))
                        .collect();
                    return ProxyInfo {
                        local: header.command == ppp::v2::Command::Local,
                        source,
                        destination,
                        tlvs,
                    };
                }
            }
            assert!(self.fill().await > 0, "closed inside the PROXY header");
        }
    }

    /// The next frame's payload; `None` when the gateway closed the connection.
    pub async fn read_frame(&mut self) -> Option<Vec<u8>> {
        loop {
            if self.buf.len() >= 4 {
                let len = u32::from_be_bytes(self.buf[..4].try_into().unwrap()) as usize;
                if self.buf.len() >= 4 + len {
                    self.buf.advance(4);
                    return Some(self.buf.split_to(len).to_vec());
                }
            }
            if self.fill().await == 0 {
                assert!(self.buf.is_empty(), "closed inside a frame: {:?}", self.buf);
                return None;
            }
        }
    }

    /// Reads raw bytes until `n` have arrived or the gateway closed.
    pub async fn read_bytes(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            if self.fill().await == 0 {
                break;
            }
        }
        let take = self.buf.len().min(n);
        self.buf.split_to(take).to_vec()
    }

    pub async fn write_frame(&mut self, payload: &[u8]) {
        self.stream
            .write_all(&super::frame(payload))
            .await
            .expect("write to gateway");
    }
}
