//! Who a connection is: a token's name (`AUTH <token>`) or a client certificate's identity
//! (SPEC section 2.3).
//!
//! Tokens are configured only as SHA-256 digests, so the configuration file is not a secret
//! worth stealing; a presented token is hashed and compared against every digest in
//! constant time, so timing tells an attacker neither which token nor how much of it matched.

use rustls_pki_types::CertificateDer;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::TokenEntry;
pub use crate::error::AuthMethod;

/// An authenticated identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub identity: String,
    pub method: AuthMethod,
    /// For a token: its digest, so that a reload can tell whether the token is still
    /// configured ([`TokenStore::still_holds`]).
    pub token_digest: Option<[u8; 32]>,
}

/// The configured tokens, as digests.
#[derive(Debug, Clone, Default)]
pub struct TokenStore {
    entries: Vec<(String, [u8; 32])>,
}

/// A configured token digest that is not 64 hex characters.
#[derive(Debug, thiserror::Error)]
#[error("token {name:?}: sha256 must be 64 hex characters")]
pub struct BadDigest {
    pub name: String,
}

impl TokenStore {
    pub fn from_entries(entries: &[TokenEntry]) -> Result<Self, BadDigest> {
        let entries = entries
            .iter()
            .map(|e| {
                let mut digest = [0u8; 32];
                hex::decode_to_slice(&e.sha256, &mut digest).map_err(|_| BadDigest {
                    name: e.name.clone(),
                })?;
                Ok((e.name.clone(), digest))
            })
            .collect::<Result<_, _>>()?;
        Ok(TokenStore { entries })
    }

    /// The name of the token whose digest matches, checking every entry so that the time
    /// taken does not depend on which one (if any) matched.
    pub fn verify(&self, token: &[u8]) -> Option<Principal> {
        let digest: [u8; 32] = Sha256::digest(token).into();
        let mut found = None;
        for (name, expected) in &self.entries {
            if bool::from(digest.ct_eq(expected)) {
                found = Some(name);
            }
        }
        found.map(|name| Principal {
            identity: name.clone(),
            method: AuthMethod::Token,
            token_digest: Some(digest),
        })
    }

    /// Whether the token a principal authenticated with is still configured under its name.
    /// False for a principal that did not authenticate with a token.
    pub fn still_holds(&self, principal: &Principal) -> bool {
        let Some(digest) = &principal.token_digest else {
            return false;
        };
        self.entries
            .iter()
            .any(|(name, expected)| *name == principal.identity && expected == digest)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The SHA-256 of a token, in lower-case hex: what `[[auth.tokens]] sha256` stores.
pub fn token_digest_hex(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A client certificate whose identity holds a control character (`\n`, `\r`, ESC, ...) or
/// a Unicode line separator: used as is, it would inject lines into text replies and logs.
/// Such a certificate does not authenticate; its connection is closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("client certificate identity holds control characters")]
pub struct UnsafeIdentity;

/// The identity of a verified client certificate: its first DNS SAN, else its subject CN.
/// `Ok(None)` when it has neither (such a certificate does not authenticate), an error when
/// the identity is not safe to print.
pub fn certificate_identity(cert: &CertificateDer<'_>) -> Result<Option<String>, UnsafeIdentity> {
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return Ok(None);
    };
    let dns = parsed
        .subject_alternative_name()
        .ok()
        .flatten()
        .and_then(|san| {
            san.value.general_names.iter().find_map(|name| match name {
                x509_parser::extensions::GeneralName::DNSName(dns) => Some(dns.to_string()),
                _ => None,
            })
        });
    let identity = dns.or_else(|| {
        parsed
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_string)
    });
    match identity {
        Some(identity) if !is_printable(&identity) => Err(UnsafeIdentity),
        identity => Ok(identity),
    }
}

/// True when `text` holds no control character and no Unicode line or paragraph separator.
/// True when `text` holds no control character and no Unicode line or paragraph separator:
/// it cannot break a line of a reply, a log or a backend's log.
pub fn is_printable(text: &str) -> bool {
    !text
        .chars()
        .any(|c| c.is_control() || matches!(c, '\u{2028}' | '\u{2029}'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifies_by_digest() {
        let store = TokenStore::from_entries(&[
            TokenEntry {
                name: "alice".into(),
                sha256: token_digest_hex("s3cret"),
            },
            TokenEntry {
                name: "bob".into(),
                sha256: token_digest_hex("other"),
            },
        ])
        .unwrap();
        assert_eq!(store.verify(b"s3cret").unwrap().identity, "alice");
        assert_eq!(store.verify(b"other").unwrap().identity, "bob");
        assert!(store.verify(b"s3cre").is_none());
        assert!(store.verify(b"").is_none());
    }

    #[test]
    fn a_removed_or_rotated_token_is_no_longer_held() {
        let entry = |name: &str, token: &str| TokenEntry {
            name: name.into(),
            sha256: token_digest_hex(token),
        };
        let before = TokenStore::from_entries(&[entry("alice", "a1"), entry("bob", "b1")]).unwrap();
        let alice = before.verify(b"a1").unwrap();
        let bob = before.verify(b"b1").unwrap();
        let after = TokenStore::from_entries(&[entry("alice", "a1"), entry("bob", "b2")]).unwrap();
        assert!(after.still_holds(&alice));
        assert!(!after.still_holds(&bob), "bob's token was rotated");
        let removed = TokenStore::from_entries(&[entry("bob", "b1")]).unwrap();
        assert!(!removed.still_holds(&alice));
    }

    #[test]
    fn identity_prefers_dns_san_then_cn() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["svc.example".into()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "cn-name");
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(
            certificate_identity(cert.der()).unwrap().as_deref(),
            Some("svc.example")
        );

        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "cn-only");
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(
            certificate_identity(cert.der()).unwrap().as_deref(),
            Some("cn-only")
        );
    }

    #[test]
    fn identities_with_control_characters_are_refused() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["evil\nOK identity=admin".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert_eq!(certificate_identity(cert.der()), Err(UnsafeIdentity));
        for cn in [
            "evil\r",
            "bell\u{7}",
            "esc\u{1b}[31m",
            "c1\u{85}",
            "ls\u{2028}",
        ] {
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params.distinguished_name.push(
                rcgen::DnType::CommonName,
                rcgen::DnValue::Utf8String(cn.into()),
            );
            let cert = params.self_signed(&key).unwrap();
            assert_eq!(
                certificate_identity(cert.der()),
                Err(UnsafeIdentity),
                "{cn:?}"
            );
        }
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Jane Doe (ops) é");
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(
            certificate_identity(cert.der()).unwrap().as_deref(),
            Some("Jane Doe (ops) é")
        );
    }
}
