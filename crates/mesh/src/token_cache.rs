//! Tokens already verified, so a token's Ed25519 signature is checked once per process rather
//! than on every hop and every call that carries it.
//!
//! An entry is the exact token text, its claims and the key that verified it. A hit is only
//! good while the token has not expired and the key set still holds that same key under that
//! key id: a key that is rotated out or revoked stops its cached tokens at once, as it stops
//! them uncached. Only tokens that verified are stored, so forged or garbage tokens cannot
//! fill the cache. Size is bounded by two generations: new entries go to the young one; when
//! it is full it becomes the old one and the previous old one is dropped, and a hit in the old
//! generation moves the entry back to the young one (least recently used tokens go first).

use std::{collections::HashMap, sync::Mutex};

use crate::token::{TokenError, UserClaims, Verifier};

/// How many verified tokens a process keeps by default: a few MiB at most.
pub const DEFAULT_CAPACITY: usize = 4096;

struct Entry {
    claims: UserClaims,
    kid: Box<str>,
    key: Box<[u8]>,
}

#[derive(Default)]
struct Generations {
    young: HashMap<Box<str>, Entry>,
    old: HashMap<Box<str>, Entry>,
}

/// A bounded cache of verified tokens (see the module documentation).
pub(crate) struct TokenCache {
    /// Entries per generation: the cache holds at most twice this.
    generation: usize,
    entries: Mutex<Generations>,
}

impl TokenCache {
    /// A cache of at most `capacity` tokens (at least two).
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            generation: (capacity / 2).max(1),
            entries: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Generations> {
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The claims of `token` if it was verified before with a key `verifier` still holds and
    /// has not expired at `now` (seconds since the epoch); `Expired` once it has; `None` when
    /// it must be verified in full.
    pub(crate) fn get(
        &self,
        token: &str,
        verifier: &Verifier,
        now: u64,
    ) -> Option<Result<UserClaims, TokenError>> {
        let mut entries = self.lock();
        let entries = &mut *entries;
        let entry = match entries.young.get(token) {
            Some(entry) => entry,
            None => {
                // Seen recently enough to keep: back to the young generation.
                let (text, entry) = entries.old.remove_entry(token)?;
                self.make_room(entries);
                entries.young.entry(text).or_insert(entry)
            }
        };
        if verifier.key(&entry.kid) != Some(&*entry.key) {
            // Rotated out or revoked, or the id now names another key: verify in full.
            entries.young.remove(token);
            return None;
        }
        if entry.claims.exp <= now {
            entries.young.remove(token);
            return Some(Err(TokenError::Expired));
        }
        Some(Ok(entry.claims.clone()))
    }

    /// Records that `token` verified as `claims` with the key `kid` of `verifier`.
    pub(crate) fn insert(&self, token: &str, claims: &UserClaims, kid: &str, verifier: &Verifier) {
        let Some(key) = verifier.key(kid) else {
            return;
        };
        let entry = Entry {
            claims: claims.clone(),
            kid: kid.into(),
            key: key.into(),
        };
        let mut entries = self.lock();
        self.make_room(&mut entries);
        entries.young.insert(token.into(), entry);
    }

    /// Turns a full young generation into the old one, dropping the previous old one.
    fn make_room(&self, entries: &mut Generations) {
        if entries.young.len() >= self.generation {
            entries.old = std::mem::take(&mut entries.young);
        }
    }

    /// How many tokens are held.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        let entries = self.lock();
        entries.young.len() + entries.old.len()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::time::Duration;

    use super::*;
    use crate::token::Signer;

    fn verifier_of(signers: &[&Signer]) -> Verifier {
        let mut v = Verifier::new();
        for s in signers {
            v.add_key(s.kid(), s.public_key());
        }
        v
    }

    /// Verifies in full and caches, as `TokenKeys::verify` does on a miss.
    fn verified(cache: &TokenCache, verifier: &Verifier, token: &str) -> UserClaims {
        let claims = verifier.verify(token).unwrap();
        let kid = Verifier::peek_kid(token).unwrap();
        cache.insert(token, &claims, &kid, verifier);
        claims
    }

    #[test]
    fn a_hit_returns_the_claims_until_the_token_expires_and_never_after() {
        let signer = Signer::generate().unwrap();
        let verifier = verifier_of(&[&signer]);
        let cache = TokenCache::new(16);
        let (token, _) = signer.sign("u-1", "USER", Duration::from_secs(60));
        assert!(cache.get(&token, &verifier, 0).is_none(), "empty cache");
        let claims = verified(&cache, &verifier, &token);
        assert_eq!(
            cache.get(&token, &verifier, claims.exp - 1),
            Some(Ok(claims.clone()))
        );
        assert_eq!(
            cache.get(&token, &verifier, claims.exp),
            Some(Err(TokenError::Expired))
        );
        assert_eq!(cache.len(), 0, "an expired token is dropped");
        // Another token of the same user is its own entry.
        let (other, _) = signer.sign("u-1", "ADMIN", Duration::from_secs(60));
        assert!(cache.get(&other, &verifier, 0).is_none());
    }

    #[test]
    fn a_key_rotated_out_or_replaced_stops_its_cached_tokens() {
        let signer = Signer::generate().unwrap();
        let next = Signer::generate().unwrap();
        let cache = TokenCache::new(16);
        let both = verifier_of(&[&signer, &next]);
        let (token, claims) = signer.sign("u-1", "USER", Duration::from_secs(60));
        verified(&cache, &both, &token);
        assert_eq!(
            cache.get(&token, &both, claims.iat),
            Some(Ok(claims.clone()))
        );
        // The key set no longer has the signing key: verify in full (which refuses it).
        let rotated = verifier_of(&[&next]);
        assert!(cache.get(&token, &rotated, claims.iat).is_none());
        assert_eq!(rotated.verify(&token), Err(TokenError::UnknownKey));
        // The same key id now naming another key is no match either.
        verified(&cache, &both, &token);
        let mut impostor = Verifier::new();
        impostor.add_key(signer.kid(), next.public_key());
        assert!(cache.get(&token, &impostor, claims.iat).is_none());
    }

    #[test]
    fn the_cache_stays_bounded_and_keeps_what_is_used() {
        let signer = Signer::generate().unwrap();
        let verifier = verifier_of(&[&signer]);
        let cache = TokenCache::new(8);
        let (kept, _) = signer.sign("kept", "USER", Duration::from_secs(60));
        verified(&cache, &verifier, &kept);
        for i in 0..40 {
            let (token, _) = signer.sign(&format!("u-{i}"), "USER", Duration::from_secs(60));
            verified(&cache, &verifier, &token);
            assert!(cache.len() <= 8, "{} entries after {i}", cache.len());
            // Used on every round, so never evicted.
            assert!(
                matches!(cache.get(&kept, &verifier, 0), Some(Ok(_))),
                "round {i}"
            );
        }
        assert!(cache.len() >= 4, "{}", cache.len());
    }
}
