//! Development set-up (SPEC section 4): a CA, a server and a client certificate made with
//! rcgen, a random token, and a `portcullis.toml` that uses them, so that a fresh clone
//! serves with `cargo run --release` and nothing else.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

use crate::auth::token_digest_hex;
use crate::config::DEFAULT_CONFIG_FILE;

/// The dev listener: loopback only, never the dual-stack wildcard of the default config.
pub const DEV_LISTEN: &str = "127.0.0.1:8443";
/// Where the dev token is kept, relative to the working directory.
pub const DEV_TOKEN_FILE: &str = "certs/dev-token";

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} already exists; pass --force to replace it")]
    Exists { path: PathBuf },
    #[error("cannot generate a certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
}

/// What to do when a file to be written already exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// Refuse, before anything is written: a CA key silently replaced would orphan every
    /// certificate it signed.
    Refuse,
    /// Replace it (`certs generate --force`); each file is swapped in whole by a rename.
    Replace,
}

/// The files `certs generate` writes.
#[derive(Debug, Clone)]
pub struct CertPaths {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl CertPaths {
    /// Every file, keys first.
    pub fn all(&self) -> [&Path; 6] {
        [
            self.ca_key.as_path(),
            self.server_key.as_path(),
            self.client_key.as_path(),
            self.ca_cert.as_path(),
            self.server_cert.as_path(),
            self.client_cert.as_path(),
        ]
    }

    pub fn in_dir(dir: &Path) -> Self {
        CertPaths {
            ca_cert: dir.join("ca.pem"),
            ca_key: dir.join("ca.key"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
        }
    }
}

/// The default server names: what a local client connects to.
pub fn default_sans() -> Vec<String> {
    vec!["localhost".into(), "127.0.0.1".into(), "::1".into()]
}

/// How long generated certificates are valid: long enough for a development setup to keep
/// working, short enough that the expiry gauge and alert have something to say.
const VALIDITY_DAYS: i64 = 365;

/// Parameters valid from yesterday (clock skew) for [`VALIDITY_DAYS`], with the extensions
/// strict validators require of every certificate (SPEC 9): a Subject Key Identifier, and,
/// on certificates signed by the CA, an Authority Key Identifier.
fn params(names: Vec<String>, common_name: &str) -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::new(names)?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(VALIDITY_DAYS);
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&rand::random::<[u8; 16]>()));
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// A leaf: not a CA (basic constraints CA:FALSE, which rcgen writes with the SKI), a
/// digital-signature key (ECDSA), for one purpose.
fn leaf_params(
    names: Vec<String>,
    common_name: &str,
    purpose: ExtendedKeyUsagePurpose,
) -> Result<CertificateParams, rcgen::Error> {
    let mut params = params(names, common_name)?;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![purpose];
    Ok(params)
}

/// Generates a CA, a server certificate for `sans` and a client certificate (identity
/// `dev-client`) into `dir`, refusing to replace any existing file. Keys are ECDSA P-256,
/// mode 0600 from their first byte.
pub fn generate_certs(dir: &Path, sans: &[String]) -> Result<CertPaths, BootstrapError> {
    generate_certs_with(dir, sans, Existing::Refuse)
}

/// [`generate_certs`], saying what to do with existing files. With [`Existing::Refuse`]
/// nothing is written when any of the six files exists.
pub fn generate_certs_with(
    dir: &Path,
    sans: &[String],
    existing: Existing,
) -> Result<CertPaths, BootstrapError> {
    let paths = CertPaths::in_dir(dir);
    if existing == Existing::Refuse {
        if let Some(path) = paths.all().into_iter().find(|p| p.exists()) {
            return Err(BootstrapError::Exists { path: path.into() });
        }
    }
    create_dir(dir)?;

    let ca_key = KeyPair::generate()?;
    let mut ca_params = params(Vec::new(), "portcullis dev CA")?;
    // Path length 0: this CA signs leaves only.
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = ca_params.self_signed(&ca_key)?;

    let server_key = KeyPair::generate()?;
    let server_params = leaf_params(
        sans.to_vec(),
        "portcullis",
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    let server = server_params.signed_by(&server_key, &ca, &ca_key)?;

    let client_key = KeyPair::generate()?;
    let client_params = leaf_params(
        vec!["dev-client".to_string()],
        "dev-client",
        ExtendedKeyUsagePurpose::ClientAuth,
    )?;
    let client = client_params.signed_by(&client_key, &ca, &ca_key)?;

    let files = [
        (&paths.ca_key, ca_key.serialize_pem(), SECRET),
        (&paths.ca_cert, ca.pem(), PUBLIC),
        (&paths.server_key, server_key.serialize_pem(), SECRET),
        (&paths.server_cert, server.pem(), PUBLIC),
        (&paths.client_key, client_key.serialize_pem(), SECRET),
        (&paths.client_cert, client.pem(), PUBLIC),
    ];
    for (path, pem, mode) in files {
        write_file(path, pem.as_bytes(), mode, existing)?;
    }
    Ok(paths)
}

/// The mode of keys and tokens: the owner's only.
const SECRET: u32 = 0o600;
/// The mode of certificates and the configuration.
const PUBLIC: u32 = 0o644;

/// A fresh random token (256 bits, hex) and its SHA-256 for the configuration.
pub fn new_token() -> (String, String) {
    let bytes: [u8; 32] = rand::random();
    let token = hex::encode(bytes);
    let digest = token_digest_hex(&token);
    (token, digest)
}

/// The `[[auth.tokens]]` entry for a token digest.
pub fn token_entry(name: &str, digest: &str) -> String {
    format!("[[auth.tokens]]\nname = \"{name}\"\nsha256 = \"{digest}\"\n")
}

/// What the dev bootstrap made or found.
#[derive(Debug, Clone)]
pub struct DevSetup {
    pub config_path: PathBuf,
    pub token: Option<String>,
    pub created: bool,
}

/// Creates the dev certificates, token and `portcullis.toml` in `dir`, unless the config
/// already exists, in which case everything is reused.
pub fn dev_setup(dir: &Path) -> Result<DevSetup, BootstrapError> {
    let config_path = dir.join(DEFAULT_CONFIG_FILE);
    let token_path = dir.join(DEV_TOKEN_FILE);
    if config_path.exists() {
        let token = fs::read_to_string(&token_path)
            .ok()
            .map(|t| t.trim().to_string());
        return Ok(DevSetup {
            config_path,
            token,
            created: false,
        });
    }
    generate_certs(&dir.join("certs"), &default_sans())?;
    let (token, digest) = new_token();
    write_file(
        &token_path,
        format!("{token}\n").as_bytes(),
        SECRET,
        Existing::Refuse,
    )?;
    let config = format!(
        "# Development configuration written by `portcullis` on first run.\n\
         # Keys and their defaults: see README.md.\n\n\
         [server]\nlisten = \"{DEV_LISTEN}\"\n\n\
         [tls]\ncert = \"certs/server.pem\"\nkey = \"certs/server.key\"\nclient_ca = \"certs/ca.pem\"\n\n\
         {}",
        token_entry("dev", &digest)
    );
    write_file(&config_path, config.as_bytes(), PUBLIC, Existing::Refuse)?;
    Ok(DevSetup {
        config_path,
        token: Some(token),
        created: true,
    })
}

/// The lines printed when serving a dev setup: how to connect by hand to `listen` (the
/// bound address, so the hint stays true under `--listen`). The README shows them verbatim
/// (tests/readme.rs).
pub fn dev_instructions(setup: &DevSetup, listen: std::net::SocketAddr) -> String {
    let mut out = String::new();
    if setup.created {
        out.push_str("portcullis: created a development setup (certs/, portcullis.toml)\n");
    }
    if let Some(token) = &setup.token {
        out.push_str(&format!("dev token:   {token}\n"));
    }
    out.push_str("client cert: certs/client.pem certs/client.key\n");
    out.push_str(&format!(
        "connect:     openssl s_client -connect {listen} -CAfile certs/ca.pem -quiet\n"
    ));
    out.push_str("then type:   PING, AUTH <token>, ECHO hello, WHOAMI, QUIT\n");
    out
}

fn create_dir(dir: &Path) -> Result<(), BootstrapError> {
    fs::create_dir_all(dir).map_err(|source| BootstrapError::Write {
        path: dir.into(),
        source,
    })
}

/// Writes `contents` to a new temporary file beside `path`, created with `mode` (so a key
/// is never readable by others, not even for an instant), then moves it into place: by a
/// hard link that fails if `path` exists ([`Existing::Refuse`]), or by a rename that
/// replaces it whole ([`Existing::Replace`]). A reader never sees a half-written file.
fn write_file(
    path: &Path,
    contents: &[u8],
    mode: u32,
    existing: Existing,
) -> Result<(), BootstrapError> {
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| BootstrapError::Write {
        path: path.into(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    create_dir(dir)?;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let temp = dir.join(format!(".{name}.{:016x}.tmp", rand::random::<u64>()));
    let written = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&temp)
        .and_then(|mut file| {
            // The umask may have cleared bits of `mode`; set exactly it, still before the
            // first byte.
            use std::os::unix::fs::PermissionsExt;
            file.set_permissions(fs::Permissions::from_mode(mode))?;
            file.write_all(contents)?;
            file.sync_all()
        })
        .and_then(|()| match existing {
            Existing::Refuse => fs::hard_link(&temp, path),
            Existing::Replace => fs::rename(&temp, path),
        });
    let _ = fs::remove_file(&temp);
    match written {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            Err(BootstrapError::Exists { path: path.into() })
        }
        other => other.map_err(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn dev_setup_creates_then_reuses() {
        let dir = tempfile::tempdir().unwrap();
        let first = dev_setup(dir.path()).unwrap();
        assert!(first.created);
        let token = first.token.clone().unwrap();
        assert_eq!(token.len(), 64);
        let mode = fs::metadata(dir.path().join("certs/server.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let mode = fs::metadata(dir.path().join(DEV_TOKEN_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        let config =
            crate::config::Config::load(Some(&first.config_path), [], &Default::default()).unwrap();
        assert_eq!(config.server.listen.to_string(), DEV_LISTEN);
        let store = crate::auth::TokenStore::from_entries(&config.auth.tokens).unwrap();
        assert_eq!(store.verify(token.as_bytes()).unwrap().identity, "dev");
        let settings = crate::tls::TlsSettings::from_config(&config);
        let ticketer = crate::tickets::Ticketer::new(config.tls.ticket_rotation).unwrap();
        crate::tls::TlsMaterial::load(&settings, std::sync::Arc::new(ticketer)).unwrap();

        let second = dev_setup(dir.path()).unwrap();
        assert!(!second.created);
        assert_eq!(second.token.as_deref(), Some(token.as_str()));
    }
}
