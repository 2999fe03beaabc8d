//! TLS: the rustls server configuration, built from PEM files and kept behind `ArcSwap` so a
//! reload replaces it for new handshakes while live connections keep the one they started
//! with. The handshake itself runs under `handshake_timeout` in [`crate::session`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::config::{Config, TlsVersion};

/// Why TLS material could not be loaded. The old material stays in use.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls.cert {path}: {message}")]
    Cert { path: PathBuf, message: String },
    #[error("tls.key {path}: {message}")]
    Key { path: PathBuf, message: String },
    #[error("tls.client_ca {path}: {message}")]
    ClientCa { path: PathBuf, message: String },
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
}

/// What the TLS settings of the configuration say, kept to rebuild on reload.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
    min_version: TlsVersion,
    alpn: Vec<Vec<u8>>,
    require_client_cert: bool,
}

impl TlsSettings {
    pub fn from_config(config: &Config) -> Self {
        TlsSettings {
            cert: config.tls.cert.clone(),
            key: config.tls.key.clone(),
            client_ca: config.tls.client_ca().map(Path::to_path_buf),
            min_version: config.tls.min_version,
            alpn: config
                .tls
                .alpn
                .iter()
                .map(|p| p.as_bytes().to_vec())
                .collect(),
            require_client_cert: config.auth.require_client_cert,
        }
    }

    /// The files whose change should trigger a reload.
    pub fn watched_files(&self) -> Vec<&Path> {
        let mut files = vec![self.cert.as_path(), self.key.as_path()];
        files.extend(self.client_ca.as_deref());
        files
    }
}

/// One loaded certificate, key and client CA.
pub struct TlsMaterial {
    pub server_config: Arc<ServerConfig>,
    /// The leaf certificate's notAfter, in seconds since the epoch (for the expiry gauge).
    pub not_after: i64,
    /// The leaf certificate's serial number, hex (for logs and reload tests).
    pub serial: String,
}

impl TlsMaterial {
    /// Reads the files and builds a server configuration: TLS 1.2 (unless `min_version` is
    /// 1.3) and 1.3, session tickets on, the configured ALPN, and client certificates
    /// verified against `client_ca` when set.
    pub fn load(settings: &TlsSettings) -> Result<Self, TlsError> {
        let certs = load_certs(&settings.cert)?;
        let key = PrivateKeyDer::from_pem_file(&settings.key).map_err(|e| TlsError::Key {
            path: settings.key.clone(),
            message: pem_message(e),
        })?;
        let (not_after, serial) = leaf_facts(&certs[0]).ok_or_else(|| TlsError::Cert {
            path: settings.cert.clone(),
            message: "the first certificate is not valid X.509".into(),
        })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let versions: &[&rustls::SupportedProtocolVersion] = match settings.min_version {
            TlsVersion::V1_2 => &[&rustls::version::TLS13, &rustls::version::TLS12],
            TlsVersion::V1_3 => &[&rustls::version::TLS13],
        };
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)?;
        let builder = match &settings.client_ca {
            None => builder.with_no_client_auth(),
            Some(path) => {
                let roots = load_roots(path)?;
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
                let verifier = if settings.require_client_cert {
                    verifier
                } else {
                    verifier.allow_unauthenticated()
                };
                let verifier = verifier.build().map_err(|e| TlsError::ClientCa {
                    path: path.clone(),
                    message: e.to_string(),
                })?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_single_cert(certs, key)?;
        config.alpn_protocols = settings.alpn.clone();
        config.ticketer = rustls::crypto::ring::Ticketer::new()?;
        Ok(TlsMaterial {
            server_config: Arc::new(config),
            not_after,
            serial,
        })
    }
}

/// The live TLS configuration: handshakes take the current one, a reload swaps it.
pub struct TlsState {
    settings: TlsSettings,
    current: ArcSwap<ServerConfig>,
}

impl TlsState {
    pub fn new(settings: TlsSettings, material: &TlsMaterial) -> Self {
        TlsState {
            settings,
            current: ArcSwap::new(material.server_config.clone()),
        }
    }

    /// An acceptor for one new connection, using the configuration current right now.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.load_full())
    }

    /// Loads the files again; on success the new configuration serves new handshakes,
    /// while established connections keep the one they started with.
    pub fn reload(&self) -> Result<TlsMaterial, TlsError> {
        let material = TlsMaterial::load(&self.settings)?;
        self.current.store(material.server_config.clone());
        Ok(material)
    }

    /// A fingerprint of the watched files (size and modification time), to notice changes.
    pub fn files_fingerprint(&self) -> Vec<Option<(u64, std::time::SystemTime)>> {
        self.settings
            .watched_files()
            .into_iter()
            .map(|path| {
                let meta = std::fs::metadata(path).ok()?;
                Some((meta.len(), meta.modified().ok()?))
            })
            .collect()
    }

    pub fn settings(&self) -> &TlsSettings {
        &self.settings
    }
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
