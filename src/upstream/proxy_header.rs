//! The PROXY v2 header that opens each upstream connection (SPEC section 6): who the client
//! is, as HAProxy's `send-proxy-v2-ssl-cn` would say it, plus portcullis' own identity TLVs.
//! Built with `ppp`'s v2 [`Builder`]; the SSL TLV's sub-TLVs are `ppp` TLVs too.

use std::io;
use std::net::{IpAddr, SocketAddr};

use ppp::v2::{Builder, Command, Protocol, Type, TypeLengthValue, Version, WriteToHeader};
use rustls::ServerConnection;

use crate::admission::normalize_ip;
use crate::auth::Principal;
use crate::codec::Framing;

/// `PP2_CLIENT_SSL`: the client connected over TLS.
const PP2_CLIENT_SSL: u8 = 0x01;
/// `PP2_CLIENT_CERT_CONN`: the client presented a certificate on this connection.
const PP2_CLIENT_CERT_CONN: u8 = 0x02;
/// portcullis' custom TLVs, in the range the PROXY spec reserves for applications.
pub const TLV_IDENTITY: u8 = 0xE0;
pub const TLV_METHOD: u8 = 0xE1;
pub const TLV_FRAMING: u8 = 0xE2;

/// What the upstream is told about one client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientInfo {
    /// The client address of SPEC section 1 (the real client behind a trusted balancer).
    pub source: SocketAddr,
    /// The gateway's address the client connected to.
    pub destination: SocketAddr,
    pub alpn: Option<Vec<u8>>,
    /// The SNI the client sent.
    pub sni: Option<String>,
    /// `TLSv1.2` or `TLSv1.3`.
    pub tls_version: &'static str,
    /// The cipher suite as rustls names it.
    pub cipher: &'static str,
    pub client_cert: bool,
    /// The client certificate's subject CN, when there is one.
    pub cn: Option<String>,
    /// The authenticated identity (`anonymous` under `auth.mode = "none"`).
    pub identity: String,
    /// `mtls`, `token` or `none`.
    pub method: &'static str,
    pub framing: Framing,
}

impl ClientInfo {
    /// Reads the TLS facts off an established connection.
    pub fn from_tls(
        conn: &ServerConnection,
        source: SocketAddr,
        destination: SocketAddr,
        principal: Option<&Principal>,
        framing: Framing,
    ) -> ClientInfo {
        let tls_version = match conn.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
            Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
            _ => "unknown",
        };
        let cipher = conn
            .negotiated_cipher_suite()
            .and_then(|s| s.suite().as_str())
            .unwrap_or("unknown");
        let leaf = conn.peer_certificates().and_then(|chain| chain.first());
        ClientInfo {
            source,
            destination,
            alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
            sni: conn.server_name().map(str::to_string),
            tls_version,
            cipher,
            client_cert: leaf.is_some(),
            cn: leaf.and_then(|cert| subject_cn(cert.as_ref())),
            identity: principal.map_or_else(|| "anonymous".into(), |p| p.identity.clone()),
            method: principal.map_or("none", |p| p.method.as_str()),
            framing,
        }
    }
}

/// The subject CN, for `PP2_SUBTYPE_SSL_CN`. Left out when it holds a control character:
/// the identity may come from a DNS SAN that passed the check while the CN did not, and
/// backends log this value.
fn subject_cn(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str()
        .ok()
        .filter(|cn| crate::auth::is_printable(cn))
        .map(str::to_string)
}

/// The PROXY v2 header (PROXY command, TCP) for `client`. Fails only when a TLV would not
/// fit the header's 16-bit lengths.
pub fn proxy_v2(client: &ClientInfo) -> io::Result<Vec<u8>> {
    let mut header = Builder::with_addresses(
        Version::Two | Command::Proxy,
        Protocol::Stream,
        same_family(client.source, client.destination),
    );
    if let Some(alpn) = &client.alpn {
        header = header.write_tlv(Type::ALPN, alpn)?;
    }
    if let Some(sni) = &client.sni {
        header = header.write_tlv(Type::Authority, sni.as_bytes())?;
    }
    header
        .write_tlv(Type::SSL, &ssl_value(client)?)?
        .write_tlv(TLV_IDENTITY, client.identity.as_bytes())?
        .write_tlv(TLV_METHOD, client.method.as_bytes())?
        .write_tlv(TLV_FRAMING, client.framing.as_str().as_bytes())?
        .build()
}

/// The LOCAL header a health check sends: "this connection carries no client".
pub fn local_v2() -> Vec<u8> {
    // 16 fixed bytes, no address, no TLV: cannot exceed the 16-bit length.
    Builder::new(Version::Two | Command::Local, 0)
        .build()
        .unwrap_or_default()
}

/// `PP2_TYPE_SSL`'s value: client flags, verify (0 = verified), then the sub-TLVs.
fn ssl_value(client: &ClientInfo) -> io::Result<Vec<u8>> {
    let mut flags = PP2_CLIENT_SSL;
    if client.client_cert {
        flags |= PP2_CLIENT_CERT_CONN;
    }
    let mut value = vec![flags, 0, 0, 0, 0];
    let mut sub = vec![
        TypeLengthValue::new(Type::SSLVersion, client.tls_version.as_bytes()),
        TypeLengthValue::new(Type::SSLCipher, client.cipher.as_bytes()),
    ];
    if let Some(cn) = &client.cn {
        sub.push(TypeLengthValue::new(Type::SSLCommonName, cn.as_bytes()));
    }
    for tlv in sub {
        value.extend_from_slice(&tlv.to_bytes()?);
    }
    Ok(value)
}

/// Both addresses in one family, as a v2 header needs: IPv4 when both are (IPv4-mapped
/// addresses included), else both as IPv6.
fn same_family(source: SocketAddr, destination: SocketAddr) -> (SocketAddr, SocketAddr) {
    let (s, d) = (normalize_ip(source.ip()), normalize_ip(destination.ip()));
    let to_v6 = |ip: IpAddr| match ip {
        IpAddr::V4(v4) => IpAddr::V6(v4.to_ipv6_mapped()),
        v6 => v6,
    };
    let (s, d) = match (s, d) {
        (IpAddr::V4(_), IpAddr::V4(_)) => (s, d),
        _ => (to_v6(s), to_v6(d)),
    };
    (
        SocketAddr::new(s, source.port()),
        SocketAddr::new(d, destination.port()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client() -> ClientInfo {
        ClientInfo {
            source: "[::ffff:192.0.2.7]:40000".parse().unwrap(),
            destination: "127.0.0.1:8443".parse().unwrap(),
            alpn: Some(b"demo/1".to_vec()),
            sni: Some("localhost".into()),
            tls_version: "TLSv1.3",
            cipher: "TLS13_AES_128_GCM_SHA256",
            client_cert: true,
            cn: Some("client".into()),
            identity: "alice".into(),
            method: "mtls",
            framing: Framing::Binary,
        }
    }

    #[test]
    fn header_parses_back_with_every_tlv() {
        let bytes = proxy_v2(&client()).unwrap();
        let header = ppp::v2::Header::try_from(bytes.as_slice()).unwrap();
        assert_eq!(header.command, Command::Proxy);
        match header.addresses {
            ppp::v2::Addresses::IPv4(a) => {
                assert_eq!(a.source_address.to_string(), "192.0.2.7");
                assert_eq!(a.source_port, 40000);
                assert_eq!(a.destination_port, 8443);
            }
            other => panic!("{other:?}"),
        }
        let tlvs: Vec<(u8, Vec<u8>)> = header
            .tlvs()
            .map(|t| t.unwrap())
            .map(|t| (t.kind, t.value.to_vec()))
            .collect();
        let get = |kind: u8| tlvs.iter().find(|t| t.0 == kind).map(|t| t.1.clone());
        assert_eq!(get(0x01).unwrap(), b"demo/1");
        assert_eq!(get(0x02).unwrap(), b"localhost");
        assert_eq!(get(TLV_IDENTITY).unwrap(), b"alice");
        assert_eq!(get(TLV_METHOD).unwrap(), b"mtls");
        assert_eq!(get(TLV_FRAMING).unwrap(), b"binary");
        let ssl = get(0x20).unwrap();
        assert_eq!(ssl[0], PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN);
        assert_eq!(&ssl[1..5], &[0, 0, 0, 0]);
        let sub: Vec<(u8, Vec<u8>)> = ppp::v2::TypeLengthValues::from(&ssl[5..])
            .map(|t| t.unwrap())
            .map(|t| (t.kind, t.value.to_vec()))
            .collect();
        assert_eq!(
            sub,
            vec![
                (0x21, b"TLSv1.3".to_vec()),
                (0x23, b"TLS13_AES_128_GCM_SHA256".to_vec()),
                (0x22, b"client".to_vec()),
            ]
        );
    }

    #[test]
    fn mixed_families_become_ipv6() {
        let mut c = client();
        c.source = "[2001:db8::1]:5".parse().unwrap();
        let bytes = proxy_v2(&c).unwrap();
        let header = ppp::v2::Header::try_from(bytes.as_slice()).unwrap();
        assert!(matches!(header.addresses, ppp::v2::Addresses::IPv6(_)));
    }

    #[test]
    fn local_header_is_sixteen_bytes() {
        let bytes = local_v2();
        assert_eq!(bytes.len(), 16);
        let header = ppp::v2::Header::try_from(bytes.as_slice()).unwrap();
        assert_eq!(header.command, Command::Local);
    }
}
