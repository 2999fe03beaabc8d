//! The PROXY protocol (v1 text and v2 binary, SPEC section 2.4): the real client address of
//! a connection that a trusted load balancer forwards.
//!
//! The header is read into one buffer whose size is fixed by configuration (v1: 107 bytes;
//! v2: 16 + `max_v2_bytes`), within `header_timeout`, and parsed with the `ppp` crate. Bytes
//! read past the header are the start of the TLS handshake: they are handed on through
//! [`Rewind`], never lost. Only peers inside `proxy_protocol.trusted` are read this way.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use ipnet::IpNet;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::admission::normalize_ip;
use crate::config::{ProxyMode, ProxyProtocolSection};
use crate::error::RejectReason;

/// The v1 header's first bytes.
const V1_PREFIX: &[u8] = b"PROXY ";
/// The longest v1 header, `\r\n` included.
const V1_MAX: usize = 107;
/// The v2 signature.
const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
/// The v2 fixed part: signature, version/command, family/protocol, length.
const V2_FIXED: usize = 16;

/// What the PROXY stage decided about a connection.
#[derive(Debug)]
pub enum Outcome {
    /// Go on with this client address (the header's, or the socket's).
    Client(IpAddr),
    /// The peer closed before sending a byte: a balancer's TCP health check. Close quietly.
    Closed,
    /// Refuse the connection.
    Refused(RejectReason),
}

/// The PROXY settings in force.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    mode: ProxyMode,
    trusted: Vec<IpNet>,
    header_timeout: Duration,
    max_v2_bytes: usize,
}

impl ProxySettings {
    pub fn new(section: &ProxyProtocolSection) -> Self {
        ProxySettings {
            mode: section.mode,
            trusted: section.trusted.clone(),
            header_timeout: section.header_timeout,
            max_v2_bytes: section.max_v2_bytes,
        }
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        self.mode != ProxyMode::Off && self.trusted.iter().any(|net| net.contains(&ip))
    }

    /// What can be decided without reading a byte: for a peer that is not a trusted
    /// balancer, its own address (or, in `required` mode, a refusal). `None` when a header
    /// must be read first.
    pub fn decide_without_reading(
        &self,
        socket_ip: IpAddr,
    ) -> Option<Result<IpAddr, RejectReason>> {
        if self.trusts(socket_ip) {
            return None;
        }
        Some(match self.mode {
            ProxyMode::Required => Err(RejectReason::ProxyRequired),
            _ => Ok(socket_ip),
        })
    }

    /// Decides the client address of a connection from `socket_ip`, reading a header from
    /// a trusted peer. Bytes read past the header are left in `io`.
    pub async fn accept(&self, io: &mut Rewind, socket_ip: IpAddr) -> Outcome {
        if let Some(decided) = self.decide_without_reading(socket_ip) {
            return match decided {
                Ok(ip) => Outcome::Client(ip),
                Err(reason) => Outcome::Refused(reason),
            };
        }
        let read = tokio::time::timeout(self.header_timeout, self.read_header(io)).await;
        match read {
            Ok(Ok(Header::Source(Some(source)))) => {
                io.source_port = Some(source.port());
                Outcome::Client(normalize_ip(source.ip()))
            }
            Ok(Ok(Header::Source(None))) => Outcome::Client(socket_ip),
            Ok(Ok(Header::Absent)) if self.mode == ProxyMode::Optional => {
                Outcome::Client(socket_ip)
            }
            Ok(Ok(Header::Absent)) => Outcome::Refused(RejectReason::ProxyRequired),
            Ok(Ok(Header::PeerClosed)) => Outcome::Closed,
            Ok(Err(e)) => {
                tracing::debug!(%socket_ip, error = %e, "bad PROXY header");
                Outcome::Refused(RejectReason::BadProxyHeader)
            }
            Err(_) => Outcome::Refused(RejectReason::BadProxyHeader),
        }
    }

    async fn read_header(&self, io: &mut Rewind) -> Result<Header, HeaderError> {
        let mut buf = vec![0u8; (V2_FIXED + self.max_v2_bytes).max(V1_MAX)];
        let mut len = 0;
        loop {
            if let Some(done) = self.parse(&buf[..len])? {
                let (header, used) = done;
                io.prefix = Bytes::copy_from_slice(&buf[used..len]);
                return Ok(header);
            }
            let n = io
                .inner
                .read(&mut buf[len..])
                .await
                .map_err(HeaderError::Io)?;
            if n == 0 {
                return if len == 0 {
                    Ok(Header::PeerClosed)
                } else {
                    Err(HeaderError::Truncated)
                };
            }
            len += n;
        }
    }

    /// Parses what has arrived: `None` when more bytes are needed, else the header and how
    /// many bytes it used (0 when there is no header).
    fn parse(&self, bytes: &[u8]) -> Result<Option<(Header, usize)>, HeaderError> {
        if bytes.starts_with(V1_PREFIX) {
            parse_v1(bytes)
        } else if bytes.starts_with(V2_SIGNATURE) {
            parse_v2(bytes, self.max_v2_bytes)
        } else if bytes.is_empty() || looks_like_header(bytes) {
            Ok(None) // the start of a signature: wait for more
        } else {
            Ok(Some((Header::Absent, 0)))
        }
    }
}

/// A parsed header.
#[derive(Debug, PartialEq, Eq)]
enum Header {
    /// The source address; `None` for v2 LOCAL, v1 UNKNOWN and non-TCP families.
    Source(Option<SocketAddr>),
    /// The first bytes are not a PROXY header.
    Absent,
    /// Closed before any byte.
    PeerClosed,
}

#[derive(Debug, thiserror::Error)]
enum HeaderError {
    #[error("header longer than its cap")]
    TooLarge,
    #[error("connection closed inside the header")]
    Truncated,
    #[error("malformed header: {0}")]
    Malformed(String),
    #[error(transparent)]
    Io(io::Error),
}

fn parse_v1(bytes: &[u8]) -> Result<Option<(Header, usize)>, HeaderError> {
    let Some(cr) = bytes.windows(2).position(|w| w == b"\r\n") else {
        return if bytes.len() >= V1_MAX {
            Err(HeaderError::TooLarge)
        } else {
            Ok(None)
        };
    };
    let used = cr + 2;
    if used > V1_MAX {
        return Err(HeaderError::TooLarge);
    }
    let header = ppp::v1::Header::try_from(&bytes[..used])
        .map_err(|e| HeaderError::Malformed(e.to_string()))?;
    let source = match header.addresses {
        ppp::v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        ppp::v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        ppp::v1::Addresses::Unknown => None,
    };
    Ok(Some((Header::Source(source), used)))
}

fn parse_v2(bytes: &[u8], max_v2_bytes: usize) -> Result<Option<(Header, usize)>, HeaderError> {
    if bytes.len() < V2_FIXED {
        return Ok(None);
    }
    let body = usize::from(u16::from_be_bytes([bytes[14], bytes[15]]));
    if body > max_v2_bytes {
        return Err(HeaderError::TooLarge);
    }
    let used = V2_FIXED + body;
    if bytes.len() < used {
        return Ok(None);
    }
    let header = ppp::v2::Header::try_from(&bytes[..used])
        .map_err(|e| HeaderError::Malformed(e.to_string()))?;
    let source = match (header.command, header.protocol, header.addresses) {
        (ppp::v2::Command::Proxy, ppp::v2::Protocol::Stream, ppp::v2::Addresses::IPv4(a)) => {
            Some(SocketAddr::from((a.source_address, a.source_port)))
        }
        (ppp::v2::Command::Proxy, ppp::v2::Protocol::Stream, ppp::v2::Addresses::IPv6(a)) => {
            Some(SocketAddr::from((a.source_address, a.source_port)))
        }
        _ => None,
    };
    Ok(Some((Header::Source(source), used)))
}

/// True when `bytes` (the first a peer sent) are the start of a PROXY header: a sign of a
/// spoofing attempt or a misconfigured balancer when the peer is not trusted.
pub fn looks_like_header(bytes: &[u8]) -> bool {
    !bytes.is_empty()
        && (V1_PREFIX.starts_with(&bytes[..bytes.len().min(V1_PREFIX.len())])
            || V2_SIGNATURE.starts_with(&bytes[..bytes.len().min(V2_SIGNATURE.len())]))
}

/// A TCP stream with bytes already read from it (past a PROXY header) put back in front.
pub struct Rewind {
    prefix: Bytes,
    inner: TcpStream,
    /// The client's source port from a trusted PROXY header (the upstream is told it).
    source_port: Option<u16>,
}

impl Rewind {
    pub fn new(inner: TcpStream) -> Self {
        Rewind {
            prefix: Bytes::new(),
            inner,
            source_port: None,
        }
    }

    pub fn tcp(&self) -> &TcpStream {
        &self.inner
    }

    /// The client's port: the trusted PROXY header's source port, else `socket_port` (the
    /// peer port `accept` returned: asking the socket again would cost a syscall).
    pub fn client_port(&self, socket_port: u16) -> u16 {
        self.source_port.unwrap_or(socket_port)
    }

    /// Copies the first bytes the peer sent into `buf` without consuming them; waits for at
    /// least one. `Ok(0)` means the peer closed before sending any.
    pub async fn peek(&self, buf: &mut [u8]) -> io::Result<usize> {
        if self.prefix.is_empty() {
            return self.inner.peek(buf).await;
        }
        let n = self.prefix.len().min(buf.len());
        buf[..n].copy_from_slice(&self.prefix[..n]);
        Ok(n)
    }
}

impl AsyncRead for Rewind {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> ProxySettings {
        ProxySettings {
            mode: ProxyMode::Optional,
            trusted: vec![],
            header_timeout: Duration::from_secs(1),
            max_v2_bytes: 512,
        }
    }

    fn v2(command: u8, family: u8, addresses: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x20 | command);
        h.push(family);
        h.extend_from_slice(&(addresses.len() as u16).to_be_bytes());
        h.extend_from_slice(addresses);
        h
    }

    #[test]
    fn v1_tcp4_tcp6_unknown() {
        let s = settings();
        let h = b"PROXY TCP4 192.0.2.7 198.51.100.1 5555 443\r\n\x16\x03";
        let (header, used) = s.parse(h).unwrap().unwrap();
        assert_eq!(
            header,
            Header::Source(Some("192.0.2.7:5555".parse().unwrap()))
        );
        assert_eq!(&h[used..], b"\x16\x03", "bytes past the header are kept");
        let h = b"PROXY TCP6 2001:db8::1 2001:db8::2 5555 443\r\n";
        assert_eq!(
            s.parse(h).unwrap().unwrap().0,
            Header::Source(Some("[2001:db8::1]:5555".parse().unwrap()))
        );
        assert_eq!(
            s.parse(b"PROXY UNKNOWN\r\n").unwrap().unwrap().0,
            Header::Source(None)
        );
    }

    #[test]
    fn v2_proxy_local_and_caps() {
        let s = settings();
        let mut addrs = vec![192, 0, 2, 9, 198, 51, 100, 1];
        addrs.extend_from_slice(&[0x15, 0xb3, 0x01, 0xbb]);
        let h = v2(1, 0x11, &addrs);
        assert_eq!(
            s.parse(&h).unwrap().unwrap(),
            (
                Header::Source(Some("192.0.2.9:5555".parse().unwrap())),
                h.len()
            )
        );
        let local = v2(0, 0x00, &[]);
        assert_eq!(s.parse(&local).unwrap().unwrap().0, Header::Source(None));
        let mut big = v2(1, 0x11, &addrs);
        big[14..16].copy_from_slice(&513u16.to_be_bytes());
        assert!(matches!(s.parse(&big), Err(HeaderError::TooLarge)));
    }

    #[test]
    fn partial_headers_wait_and_other_bytes_are_not_headers() {
        let s = settings();
        assert!(s.parse(b"").unwrap().is_none());
        assert!(s.parse(b"PRO").unwrap().is_none());
        assert!(s.parse(b"PROXY TCP4 1.2.3.4").unwrap().is_none());
        assert!(s.parse(&V2_SIGNATURE[..5]).unwrap().is_none());
        assert!(s.parse(&v2(1, 0x11, &[0; 12])[..14]).unwrap().is_none());
        assert_eq!(
            s.parse(b"\x16\x03\x01").unwrap().unwrap(),
            (Header::Absent, 0)
        );
        assert!(s.parse(b"PROXY garbage\r\n").is_err());
        let long = [b"PROXY ".as_slice(), &[b'1'; 120]].concat();
        assert!(matches!(s.parse(&long), Err(HeaderError::TooLarge)));
    }

    #[test]
    fn looks_like_header_only_for_proxy_prefixes() {
        assert!(looks_like_header(b"PROXY TCP4"));
        assert!(looks_like_header(b"PRO"));
        assert!(looks_like_header(&V2_SIGNATURE[..4]));
        assert!(!looks_like_header(b"\x16\x03\x01"));
        assert!(!looks_like_header(b"PING"));
    }
}
