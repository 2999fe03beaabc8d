//! TLS session tickets: the keys that encrypt them, kept across reloads and, in cluster
//! mode, shared by every replica (SPEC 7).
//!
//! rustls' own ticketer makes fresh random keys with each `ServerConfig`, so a reload (which
//! builds a new one) would invalidate every ticket, and each replica would have its own.
//! [`Ticketer`] is created once per process and handed to every `ServerConfig` it builds.
//! Standalone its keys are random and rotate every `tls.ticket_rotation`; in cluster mode
//! the sync task installs the keys Redis holds for the current and previous rotation
//! periods ([`Ticketer::install_shared`]), so that a ticket issued by one replica resumes
//! on any other.
//!
//! A ticket is `key id (8) ‖ nonce (12) ‖ AES-256-GCM(state) ‖ tag (16)`, the key id bound
//! as associated data; the AEAD is the crypto provider's own library (aws-lc-rs, as rustls
//! is built here), never home-made. A ticket whose key is gone, or that does not
//! authenticate, is refused and the handshake falls back to a full one.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};

/// Bytes of a ticket key.
pub const KEY_LEN: usize = 32;
const ID_LEN: usize = 8;
/// The first byte of the id of a key shared through Redis; a local key's is 0.
const SHARED: u8 = 1;

/// One ticket key and its id.
struct TicketKey {
    id: [u8; ID_LEN],
    /// Shared between key sets: an aws-lc-rs key is not `Clone`.
    key: Arc<LessSafeKey>,
}

impl TicketKey {
    fn new(id: [u8; ID_LEN], bytes: &[u8; KEY_LEN]) -> Option<TicketKey> {
        let key = UnboundKey::new(&AES_256_GCM, bytes).ok()?;
        Some(TicketKey {
            id,
            key: Arc::new(LessSafeKey::new(key)),
        })
    }

    /// A fresh random local key.
    fn random(rng: &SystemRandom) -> Option<TicketKey> {
        let mut id = [0u8; ID_LEN];
        let mut bytes = [0u8; KEY_LEN];
        rng.fill(&mut id[1..]).ok()?;
        rng.fill(&mut bytes).ok()?;
        TicketKey::new(id, &bytes)
    }

    /// The id of the shared key of rotation period `epoch`.
    fn shared_id(epoch: u64) -> [u8; ID_LEN] {
        let mut id = epoch.to_be_bytes();
        id[0] = SHARED;
        id
    }
}

/// The keys in use: one encrypts, the others only decrypt.
struct KeySet {
    current: TicketKey,
    /// The keys before it, newest first, at most [`DECRYPT_ONLY`] of them.
    older: Vec<TicketKey>,
    /// When `current` was installed: standalone, it is replaced after `rotation`.
    since: Instant,
}

/// Keys that only decrypt: the previous rotation's, and the last local one (tickets issued
/// before this replica first reached Redis).
const DECRYPT_ONLY: usize = 2;

/// A `rustls::server::ProducesTickets` whose keys outlive `ServerConfig` rebuilds.
pub struct Ticketer {
    keys: ArcSwap<KeySet>,
    rotation: Duration,
    rng: SystemRandom,
    /// One rotation at a time.
    rotating: Mutex<()>,
}

impl std::fmt::Debug for Ticketer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticketer")
            .field("rotation", &self.rotation)
            .finish_non_exhaustive()
    }
}

/// Why no ticketer could be made: the system's random generator failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot make a session-ticket key: no randomness")]
pub struct NoRandomness;

impl Ticketer {
    /// A ticketer with a fresh random key, rotated every `rotation`.
    pub fn new(rotation: Duration) -> Result<Ticketer, NoRandomness> {
        let rng = SystemRandom::new();
        let current = TicketKey::random(&rng).ok_or(NoRandomness)?;
        Ok(Ticketer {
            keys: ArcSwap::from_pointee(KeySet {
                current,
                older: Vec::new(),
                since: Instant::now(),
            }),
            rotation,
            rng,
            rotating: Mutex::new(()),
        })
    }

    /// Installs the shared keys of rotation period `epoch` (and of the one before, when
    /// Redis still holds it). Nothing changes when `epoch`'s key is already current.
    pub fn install_shared(
        &self,
        epoch: u64,
        current: &[u8; KEY_LEN],
        previous: Option<&[u8; KEY_LEN]>,
    ) {
        let _one = self.rotating.lock().unwrap_or_else(|e| e.into_inner());
        let id = TicketKey::shared_id(epoch);
        let keys = self.keys.load();
        if keys.current.id == id {
            return;
        }
        let Some(current) = TicketKey::new(id, current) else {
            return;
        };
        let mut older = Vec::with_capacity(DECRYPT_ONLY);
        let previous_id = TicketKey::shared_id(epoch.wrapping_sub(1));
        if let Some(previous) = previous.and_then(|p| TicketKey::new(previous_id, p)) {
            older.push(previous);
        }
        // The key encrypting until now, unless it is the previous period's shared key
        // (already there): tickets this replica issued with it keep resuming here.
        if keys.current.id != previous_id {
            older.push(clone_key(&keys.current));
        }
        older.truncate(DECRYPT_ONLY);
        self.keys.store(Arc::new(KeySet {
            current,
            older,
            since: Instant::now(),
        }));
    }

    /// Standalone rotation (and the fallback when Redis has not answered for a whole
    /// period): a fresh random key once the current one is `rotation` old.
    fn rotate_if_due(&self) {
        if self.keys.load().since.elapsed() < self.rotation {
            return;
        }
        let _one = self.rotating.lock().unwrap_or_else(|e| e.into_inner());
        let keys = self.keys.load();
        if keys.since.elapsed() < self.rotation {
            return;
        }
        let Some(fresh) = TicketKey::random(&self.rng) else {
            return;
        };
        let older = vec![clone_key(&keys.current)];
        self.keys.store(Arc::new(KeySet {
            current: fresh,
            older,
            since: Instant::now(),
        }));
    }
}

/// Another handle on a key (the key schedule, not the key bytes, which are not kept).
fn clone_key(key: &TicketKey) -> TicketKey {
    TicketKey {
        id: key.id,
        key: key.key.clone(),
    }
}

impl rustls::server::ProducesTickets for Ticketer {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        u32::try_from(self.rotation.as_secs()).unwrap_or(u32::MAX)
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.rotate_if_due();
        let keys = self.keys.load();
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        let mut sealed = plain.to_vec();
        keys.current
            .key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(keys.current.id),
                &mut sealed,
            )
            .ok()?;
        let mut ticket = Vec::with_capacity(ID_LEN + NONCE_LEN + sealed.len());
        ticket.extend_from_slice(&keys.current.id);
        ticket.extend_from_slice(&nonce);
        ticket.extend_from_slice(&sealed);
        Some(ticket)
    }

    fn decrypt(&self, ticket: &[u8]) -> Option<Vec<u8>> {
        let (id, rest) = ticket.split_first_chunk::<ID_LEN>()?;
        let (nonce, sealed) = rest.split_first_chunk::<NONCE_LEN>()?;
        let keys = self.keys.load();
        let key = std::iter::once(&keys.current)
            .chain(&keys.older)
            .find(|k| k.id == *id)?;
        let mut buffer = sealed.to_vec();
        let plain = key
            .key
            .open_in_place(
                Nonce::assume_unique_for_key(*nonce),
                Aad::from(*id),
                &mut buffer,
            )
            .ok()?;
        Some(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use rustls::server::ProducesTickets;

    use super::*;

    #[test]
    fn tickets_round_trip_and_tampering_is_refused() {
        let t = Ticketer::new(Duration::from_secs(3600)).unwrap();
        let ticket = t.encrypt(b"session state").unwrap();
        assert_eq!(t.decrypt(&ticket).unwrap(), b"session state");
        let mut bad = ticket.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert_eq!(t.decrypt(&bad), None);
        assert_eq!(t.decrypt(&ticket[..10]), None);
        let other = Ticketer::new(Duration::from_secs(3600)).unwrap();
        assert_eq!(other.decrypt(&ticket), None, "another process's key");
    }

    #[test]
    fn shared_keys_decrypt_across_ticketers_and_the_previous_still_works() {
        let (k1, k2) = ([1u8; KEY_LEN], [2u8; KEY_LEN]);
        let a = Ticketer::new(Duration::from_secs(3600)).unwrap();
        let b = Ticketer::new(Duration::from_secs(3600)).unwrap();
        let local = a.encrypt(b"before").unwrap();
        a.install_shared(7, &k1, None);
        b.install_shared(7, &k1, None);
        let shared = a.encrypt(b"state").unwrap();
        assert_eq!(b.decrypt(&shared).unwrap(), b"state");
        assert_eq!(
            a.decrypt(&local).unwrap(),
            b"before",
            "local tickets survive"
        );
        b.install_shared(8, &k2, Some(&k1));
        assert_eq!(b.decrypt(&shared).unwrap(), b"state", "previous period");
        b.install_shared(9, &[3u8; KEY_LEN], Some(&k2));
        assert_eq!(b.decrypt(&shared), None, "two periods old");
    }

    #[test]
    fn standalone_keys_rotate_and_the_previous_still_decrypts() {
        let t = Ticketer::new(Duration::from_millis(30)).unwrap();
        let first = t.encrypt(b"one").unwrap();
        std::thread::sleep(Duration::from_millis(40));
        let second = t.encrypt(b"two").unwrap();
        assert_ne!(first[..ID_LEN], second[..ID_LEN], "rotated");
        assert_eq!(t.decrypt(&first).unwrap(), b"one");
        std::thread::sleep(Duration::from_millis(40));
        let _third = t.encrypt(b"three").unwrap();
        assert_eq!(t.decrypt(&first), None, "two rotations old");
    }
}
