//! The verification cache: a repeated login with the same password costs an HMAC and a map
//! lookup (microseconds) instead of an argon2 run.
//!
//! The key is HMAC-SHA256, under a random key made at start and never stored, of
//! `(address, 0x00, password)`: neither the password nor an unkeyed hash of it is kept, so a
//! memory dump does not give an offline guessing target. Only successful verifications are
//! cached; a wrong password always runs the hash.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hmac::digest::KeyInit;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use zeroize::Zeroize;

use crate::policy::Credential;

type HmacSha256 = Hmac<Sha256>;

/// How long a verified password is trusted without hashing again, and how many to remember.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheConfig {
    pub ttl: Duration,
    /// Never exceeded: when full, expired entries go first, then arbitrary ones.
    pub capacity: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            ttl: Duration::from_secs(5 * 60),
            capacity: 100_000,
        }
    }
}

/// The cache key of one (address, password) pair.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Tag([u8; 32]);

#[derive(Clone, Copy)]
struct Entry {
    credential: Credential,
    expires: Instant,
}

pub(crate) struct VerificationCache {
    /// Keyed once; each tag clones this state (the key's pads are already absorbed).
    mac: HmacSha256,
    config: CacheConfig,
    entries: Mutex<HashMap<Tag, Entry>>,
}

impl VerificationCache {
    pub(crate) fn new(config: CacheConfig) -> VerificationCache {
        let mut key = [0u8; 64];
        rand::rngs::OsRng.fill_bytes(&mut key);
        let mac = <HmacSha256 as KeyInit>::new(&key.into());
        key.zeroize();
        VerificationCache {
            mac,
            config,
            entries: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn tag(&self, address: &str, password: &[u8]) -> Tag {
        let mut mac = self.mac.clone();
        mac.update(address.as_bytes());
        mac.update(&[0]);
        mac.update(password);
        Tag(mac.finalize().into_bytes().into())
    }

    /// The cached credential for `tag`, if it has not expired.
    pub(crate) fn lookup(&self, tag: &Tag) -> Option<Credential> {
        let now = Instant::now();
        let mut entries = self.lock();
        match entries.get(tag) {
            Some(entry) if entry.expires > now => Some(entry.credential),
            Some(_) => {
                entries.remove(tag);
                None
            }
            None => None,
        }
    }

    /// Remembers a successful verification. `Credential::Invalid` is never stored.
    pub(crate) fn insert(&self, tag: Tag, credential: Credential) {
        if credential == Credential::Invalid || self.config.capacity == 0 {
            return;
        }
        let now = Instant::now();
        let Some(expires) = now.checked_add(self.config.ttl) else {
            return;
        };
        let mut entries = self.lock();
        if entries.len() >= self.config.capacity && !entries.contains_key(&tag) {
            entries.retain(|_, e| e.expires > now);
            if entries.len() >= self.config.capacity {
                // Still full of live entries: drop an eighth. Tags are HMAC outputs, so the
                // map's order is as good as random, and the cost is amortised over many inserts.
                let drop = (self.config.capacity / 8).max(1);
                let victims: Vec<Tag> = entries.keys().take(drop).copied().collect();
                for victim in victims {
                    entries.remove(&victim);
                }
            }
        }
        entries.insert(
            tag,
            Entry {
                credential,
                expires,
            },
        );
    }

    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Tag, Entry>> {
        // A panic while holding this lock cannot leave the map inconsistent (every mutation is
        // a single std call), so a poisoned lock is still usable.
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(ttl: Duration, capacity: usize) -> VerificationCache {
        VerificationCache::new(CacheConfig { ttl, capacity })
    }

    #[test]
    fn tag_is_keyed_and_separates_address_from_password() {
        let a = cache(Duration::from_secs(60), 10);
        let b = cache(Duration::from_secs(60), 10);
        assert!(a.tag("u@x", b"pw") == a.tag("u@x", b"pw"));
        assert!(
            a.tag("u@x", b"pw") != b.tag("u@x", b"pw"),
            "per-process key"
        );
        assert!(a.tag("u@x", b"pw") != a.tag("u@x", b"pW"));
        assert!(a.tag("u@x", b"pw") != a.tag("u@xp", b"w"));
    }

    #[test]
    fn stores_successes_only_until_they_expire() {
        let c = cache(Duration::from_secs(60), 10);
        let tag = c.tag("u@x", b"pw");
        assert_eq!(c.lookup(&tag), None);
        c.insert(tag, Credential::Invalid);
        assert_eq!(c.lookup(&tag), None, "failures are never cached");
        c.insert(tag, Credential::AppPassword);
        assert_eq!(c.lookup(&tag), Some(Credential::AppPassword));

        let expired = cache(Duration::ZERO, 10);
        let tag = expired.tag("u@x", b"pw");
        expired.insert(tag, Credential::MainPassword);
        assert_eq!(expired.lookup(&tag), None);
        assert_eq!(expired.len(), 0, "an expired entry is removed when met");
    }

    #[test]
    fn never_grows_past_capacity() {
        let c = cache(Duration::from_secs(60), 16);
        for i in 0..1000 {
            let tag = c.tag(&format!("user{i}@example.com"), b"pw");
            c.insert(tag, Credential::MainPassword);
            assert!(c.len() <= 16, "{} entries after {i}", c.len());
        }
        let newest = c.tag("user999@example.com", b"pw");
        assert_eq!(c.lookup(&newest), Some(Credential::MainPassword));
    }

    #[test]
    fn a_full_cache_drops_expired_entries_first() {
        let c = cache(Duration::ZERO, 4);
        for i in 0..4 {
            c.insert(c.tag(&format!("u{i}@x"), b"pw"), Credential::MainPassword);
        }
        // All four have expired (TTL zero): making room removes all of them.
        c.insert(c.tag("new@x", b"pw"), Credential::MainPassword);
        assert_eq!(c.len(), 1);
    }
}
