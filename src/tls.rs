//! TLS: the rustls server configuration, built from PEM files and kept behind `ArcSwap` so a
//! reload replaces it for new handshakes while live connections keep the one they started
//! with. The client-certificate verifier is kept beside it, so that after a reload the
//! certificates of open connections can be checked again (revocation, SPEC section 9).
//! The handshake itself runs under `handshake_timeout` in [`crate::handshake`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::crypto::aws_lc_rs::cipher_suite::{
    TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
    TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
    TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256, TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
    TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384, TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
};
use rustls::crypto::aws_lc_rs::kx_group::{SECP256R1, SECP384R1, X25519, X25519MLKEM768};
use rustls::crypto::{CryptoProvider, SupportedKxGroup};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::SupportedCipherSuite;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime};
use tokio_rustls::TlsAcceptor;

use crate::config::{CipherPreference, Config, TlsVersion};
use crate::tickets::Ticketer;

/// Key-exchange groups (SPEC 9): the post-quantum hybrid that browsers and OpenSSL 3.5
/// offer first, then the classical curves. rustls takes the first group of the client's
/// list that is also in this one, so the hybrid is used whenever a client offers it ahead
/// of X25519, as every client that offers it does.
pub const KX_GROUPS: &[&dyn SupportedKxGroup] = &[X25519MLKEM768, X25519, SECP256R1, SECP384R1];

/// Why TLS material could not be loaded. The old material stays in use.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls.cert {path}: {message}")]
    Cert { path: PathBuf, message: String },
    #[error("tls.key {path}: {message}")]
    Key { path: PathBuf, message: String },
    #[error("tls.client_ca {path}: {message}")]
    ClientCa { path: PathBuf, message: String },
    #[error("tls.client_crl {path}: {message}")]
    ClientCrl { path: PathBuf, message: String },
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
}

/// What the TLS settings of the configuration say, kept to rebuild on reload.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
    client_crl: Vec<PathBuf>,
    min_version: TlsVersion,
    alpn: Vec<Vec<u8>>,
    require_client_cert: bool,
    cipher_preference: CipherPreference,
}

impl TlsSettings {
    pub fn from_config(config: &Config) -> Self {
        TlsSettings {
            cert: config.tls.cert.clone(),
            key: config.tls.key.clone(),
            client_ca: config.tls.client_ca().map(Path::to_path_buf),
            client_crl: config.tls.client_crl.clone(),
            min_version: config.tls.min_version,
            alpn: config
                .tls
                .alpn
                .iter()
                .map(|p| p.as_bytes().to_vec())
                .collect(),
            require_client_cert: config.auth.require_client_cert,
            cipher_preference: config.tls.cipher_preference,
        }
    }

    /// The files whose change should trigger a reload.
    pub fn watched_files(&self) -> Vec<&Path> {
        let mut files = vec![self.cert.as_path(), self.key.as_path()];
        files.extend(self.client_ca.as_deref());
        files.extend(self.client_crl.iter().map(PathBuf::as_path));
        files
    }
}

/// One loaded certificate, key, client CA and CRLs.
pub struct TlsMaterial {
    pub server_config: Arc<ServerConfig>,
    /// The client-certificate verifier inside `server_config`, when mTLS is on.
    client_verifier: Option<Arc<dyn ClientCertVerifier>>,
    /// The leaf certificate's notAfter, in seconds since the epoch (for the expiry gauge).
    pub not_after: i64,
    /// The leaf certificate's serial number, hex (for logs and reload tests).
    pub serial: String,
}

impl TlsMaterial {
    /// Reads the files and builds a server configuration: TLS 1.2 (unless `min_version` is
    /// 1.3) and 1.3, the aws-lc-rs provider with [`KX_GROUPS`], the server's cipher-suite
    /// order unless `cipher_preference = "client"`, session tickets on, the configured ALPN,
    /// and client certificates verified against `client_ca` when set, and refused when a
    /// `client_crl` revokes them. Tickets are made by `ticketer`, the process's one (it
    /// outlives reloads).
    pub fn load(settings: &TlsSettings, ticketer: Arc<Ticketer>) -> Result<Self, TlsError> {
        let certs = load_certs(&settings.cert)?;
        let key = PrivateKeyDer::from_pem_file(&settings.key).map_err(|e| TlsError::Key {
            path: settings.key.clone(),
            message: pem_message(e),
        })?;
        let (not_after, serial) = leaf_facts(&certs[0]).ok_or_else(|| TlsError::Cert {
            path: settings.cert.clone(),
            message: "the first certificate is not valid X.509".into(),
        })?;
        let provider = Arc::new(provider());
        let versions: &[&rustls::SupportedProtocolVersion] = match settings.min_version {
            TlsVersion::V1_2 => &[&rustls::version::TLS13, &rustls::version::TLS12],
            TlsVersion::V1_3 => &[&rustls::version::TLS13],
        };
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)?;
        let client_verifier = client_verifier(settings, provider)?;
        let builder = match &client_verifier {
            None => builder.with_no_client_auth(),
            Some(verifier) => builder.with_client_cert_verifier(verifier.clone()),
        };
        let mut config = builder.with_single_cert(certs, key)?;
        config.alpn_protocols = settings.alpn.clone();
        config.ignore_client_order = settings.cipher_preference == CipherPreference::Server;
        config.ticketer = ticketer;
        Ok(TlsMaterial {
            server_config: Arc::new(config),
            client_verifier,
            not_after,
            serial,
        })
    }
}

/// aws-lc-rs (rustls' default provider; ring has no post-quantum key exchange) with
/// [`KX_GROUPS`] and [`CIPHER_SUITES`].
fn provider() -> CryptoProvider {
    CryptoProvider {
        kx_groups: KX_GROUPS.to_vec(),
        cipher_suites: CIPHER_SUITES.to_vec(),
        ..rustls::crypto::aws_lc_rs::default_provider()
    }
}

/// aws-lc-rs' suites in server preference, AES-128-GCM first in each TLS version (as Go's
/// and BoringSSL's servers order them). AES-128 matches the strength of the key exchange
/// and signature (X25519, P-256: 128-bit), and is in NIST's first post-quantum security
/// category; its suite's SHA-256 key schedule runs on the SHA extensions of current x86 and
/// ARM CPUs, which have none for SHA-384: with AES-256-GCM-SHA384 first, SHA-512 blocks
/// were 14-19 % of a full handshake's server CPU here (benches/compare-results.md). The
/// other suites stay for clients that offer only them, and `cipher_preference = "client"`
/// gives a client that prefers AES-256 its choice.
const CIPHER_SUITES: &[SupportedCipherSuite] = &[
    TLS13_AES_128_GCM_SHA256,
    TLS13_AES_256_GCM_SHA384,
    TLS13_CHACHA20_POLY1305_SHA256,
    TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
    TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
    TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
    TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
];

/// The client-certificate verifier of `settings`, when mTLS is on. With CRLs, only the
/// client's own certificate is checked for revocation, and a certificate whose issuer has no
/// CRL in the list is refused: a CRL file that names the wrong CA fails closed.
fn client_verifier(
    settings: &TlsSettings,
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Result<Option<Arc<dyn ClientCertVerifier>>, TlsError> {
    let Some(path) = &settings.client_ca else {
        return Ok(None);
    };
    let roots = load_roots(path)?;
    let mut crls = Vec::new();
    for crl in &settings.client_crl {
        crls.extend(load_crls(crl)?);
    }
    let mut verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
    if !crls.is_empty() {
        verifier = verifier.with_crls(crls).only_check_end_entity_revocation();
    }
    if !settings.require_client_cert {
        verifier = verifier.allow_unauthenticated();
    }
    let verifier = verifier.build().map_err(|e| TlsError::ClientCa {
        path: path.clone(),
        message: e.to_string(),
    })?;
    Ok(Some(verifier))
}

/// What serves new handshakes right now.
struct Active {
    settings: TlsSettings,
    server_config: Arc<ServerConfig>,
    client_verifier: Option<Arc<dyn ClientCertVerifier>>,
}

/// The live TLS configuration: handshakes take the current one, a reload swaps it.
pub struct TlsState {
    current: ArcSwap<Active>,
    /// The session-ticket keys, the same in every configuration built (SPEC 7: tickets
    /// survive reloads).
    ticketer: Arc<Ticketer>,
}

impl TlsState {
    pub fn new(settings: TlsSettings, material: TlsMaterial, ticketer: Arc<Ticketer>) -> Self {
        TlsState {
            ticketer,
            current: ArcSwap::from_pointee(Active {
                settings,
                server_config: material.server_config,
                client_verifier: material.client_verifier,
            }),
        }
    }

    /// The ticketer every configuration of this process uses.
    pub fn ticketer(&self) -> Arc<Ticketer> {
        self.ticketer.clone()
    }

    /// An acceptor for one new connection, using the configuration current right now.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.load().server_config.clone())
    }

    /// Serves new handshakes with `material` (loaded from `settings`); established
    /// connections keep the configuration they started with.
    pub fn install(&self, settings: TlsSettings, material: TlsMaterial) {
        self.current.store(Arc::new(Active {
            settings,
            server_config: material.server_config,
            client_verifier: material.client_verifier,
        }));
    }

    /// Whether a client certificate chain (leaf first), accepted at its handshake, still
    /// verifies against the current client CA and CRLs. False when mTLS is now off.
    pub fn client_chain_verifies(&self, chain: &[CertificateDer<'_>]) -> bool {
        let current = self.current.load();
        let (Some(verifier), Some((leaf, intermediates))) =
            (&current.client_verifier, chain.split_first())
        else {
            return false;
        };
        verifier
            .verify_client_cert(leaf, intermediates, UnixTime::now())
            .is_ok()
    }

    /// A fingerprint of the watched files (size and modification time), to notice changes.
    pub fn files_fingerprint(&self) -> Vec<Option<(u64, std::time::SystemTime)>> {
        self.current
            .load()
            .settings
            .watched_files()
            .into_iter()
            .map(file_fingerprint)
            .collect()
    }
}

/// A file's size and modification time, `None` when it cannot be read.
pub fn file_fingerprint(path: &Path) -> Option<(u64, std::time::SystemTime)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.len(), meta.modified().ok()?))
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = |message: String| TlsError::Cert {
        path: path.into(),
        message,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(pem_message(e)))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(pem_message(e)))?;
    if certs.is_empty() {
        return Err(err("no CERTIFICATE block found".into()));
    }
    Ok(certs)
}

fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let err = |message: String| TlsError::ClientCa {
        path: path.into(),
        message,
    };
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| err(pem_message(e)))? {
        let cert = cert.map_err(|e| err(pem_message(e)))?;
        roots.add(cert).map_err(|e| err(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(err("no CERTIFICATE block found".into()));
    }
    Ok(roots)
}

/// The CRLs in one file: PEM (any number of `X509 CRL` blocks) or a single DER CRL. Each is
/// parsed here, so a broken file is named in the error.
fn load_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let err = |message: String| TlsError::ClientCrl {
        path: path.into(),
        message,
    };
    let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let crls = if bytes.starts_with(b"-----BEGIN") {
        CertificateRevocationListDer::pem_slice_iter(&bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| err(pem_message(e)))?
    } else {
        vec![CertificateRevocationListDer::from(bytes)]
    };
    if crls.is_empty() {
        return Err(err("no X509 CRL block found".into()));
    }
    for crl in &crls {
        x509_parser::parse_x509_crl(crl.as_ref())
            .map_err(|e| err(format!("not a valid CRL: {e}")))?;
    }
    Ok(crls)
}

fn pem_message(e: rustls_pki_types::pem::Error) -> String {
    match e {
        rustls_pki_types::pem::Error::Io(io) => io.to_string(),
        rustls_pki_types::pem::Error::NoItemsFound => {
            "no PEM block of the expected kind found".into()
        }
        other => other.to_string(),
    }
}

fn leaf_facts(cert: &CertificateDer<'_>) -> Option<(i64, String)> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    Some((
        parsed.validity().not_after.timestamp(),
        parsed.raw_serial_as_string(),
    ))
}
