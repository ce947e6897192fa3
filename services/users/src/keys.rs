//! The keys that sign access tokens: a key ring in the users database, each private key
//! sealed at rest with AES-256-GCM under a key-encryption key (KEK) that never enters the
//! database (a mounted Secret file, or a generated file in the development data directory).
//!
//! Rotation: the newest key that has started signs. A new one is made when the current one
//! nears the rotation period (checked by [`Users::maintain_keys`](crate::Users::maintain_keys)
//! on every replica) or on demand ([`rotate_now`], the `tessera keys rotate` command); it is
//! published at once and starts signing [`PUBLISH_AHEAD`] later, when every replica serves
//! it from GetJwks. A key that no longer signs is still
//! published by GetJwks until every token it signed has expired (its successor's start plus
//! the access-token lifetime, plus a minute for clock skew), then deleted. Verifiers in other
//! services meet the new key id in a token and fetch the key set again.

use std::{fmt, path::Path, sync::Arc, time::Duration};

use base64::{Engine, engine::general_purpose::STANDARD};
use ring::{
    aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey},
    rand::{SecureRandom, SystemRandom},
};
use tessera_mesh::token::{Signer, Verifier};
use tessera_store::{Backend, Db, StoreError, Tx, now_micros};

use crate::Error;

/// The key-encryption key's file in a data directory, when no
/// `TESSERA_KEY_ENCRYPTION_KEY_FILE` is given (SQLite, development).
pub const DATA_DIR_KEK: &str = "key-encryption.key";

/// First byte of a sealed key: the format (AES-256-GCM, 96-bit random nonce, AAD = kid).
const SEALED_V1: u8 = 1;
/// Tokens verified shortly after they expire, on a clock a little behind, still find their
/// key.
const CLOCK_SKEW: Duration = Duration::from_secs(60);
/// A new key is published this long before it signs: twice the longest key check, so every
/// replica serves it from GetJwks before any token signed with it reaches a verifier (which
/// would otherwise fetch the key set from a replica that does not have it yet).
pub const PUBLISH_AHEAD: Duration = Duration::from_secs(10);

/// The key-encryption key: 32 bytes for AES-256-GCM.
#[derive(Clone)]
pub struct Kek(Arc<LessSafeKey>);

impl fmt::Debug for Kek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Kek(..)")
    }
}

/// Why a key-encryption key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KekError {
    /// The key file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The key file.
        path: String,
        /// What reading it failed with.
        source: std::io::Error,
    },
    /// A generated key could not be saved.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The key file.
        path: String,
        /// What writing it failed with.
        source: std::io::Error,
    },
    /// The file holds something other than 32 bytes, raw or base64.
    #[error("{path}: expected 32 bytes, raw or base64 (e.g. `openssl rand -base64 32`)")]
    Format {
        /// The key file.
        path: String,
    },
    /// The system had no randomness for a new key, or the cipher refused the bytes.
    #[error("no randomness to generate a key, or the key was refused")]
    Random,
}

impl Kek {
    /// A KEK from its 32 bytes.
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Kek, KekError> {
        let key = UnboundKey::new(&AES_256_GCM, bytes).map_err(|_| KekError::Random)?;
        Ok(Kek(Arc::new(LessSafeKey::new(key))))
    }

    /// A new random KEK (tests; [`Kek::load_or_create`] for files).
    pub fn generate() -> Result<Kek, KekError> {
        Kek::from_bytes(&random_key()?)
    }

    /// Reads a KEK file: 32 raw bytes, or their base64 (whitespace around it ignored).
    pub fn load(path: &Path) -> Result<Kek, KekError> {
        let shown = path.display().to_string();
        let raw = std::fs::read(path).map_err(|source| KekError::Read {
            path: shown.clone(),
            source,
        })?;
        let bytes: [u8; 32] = match <[u8; 32]>::try_from(raw.as_slice()) {
            Ok(b) => b,
            Err(_) => std::str::from_utf8(&raw)
                .ok()
                .and_then(|text| STANDARD.decode(text.trim()).ok())
                .and_then(|decoded| <[u8; 32]>::try_from(decoded.as_slice()).ok())
                .ok_or(KekError::Format { path: shown })?,
        };
        Kek::from_bytes(&bytes)
    }

    /// [`Kek::load`], or, when `path` does not exist, a new random KEK written there as
    /// base64, owner-only (0600) from its creation (the development data directory).
    pub fn load_or_create(path: &Path) -> Result<Kek, KekError> {
        if path.exists() {
            return Kek::load(path);
        }
        let key = random_key()?;
        let mut text = STANDARD.encode(key);
        text.push('\n');
        tessera_mesh::private::write_file(path, text.as_bytes(), true).map_err(|source| {
            KekError::Write {
                path: path.display().to_string(),
                source,
            }
        })?;
        tracing::info!(path = %path.display(), "generated a key-encryption key");
        Kek::from_bytes(&key)
    }

    fn seal(&self, kid: &str, plaintext: &[u8]) -> Result<Vec<u8>, Error> {
        let mut nonce = [0_u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| Error::Corrupt("no randomness for a nonce".into()))?;
        let mut sealed = plaintext.to_vec();
        self.0
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(kid.as_bytes()),
                &mut sealed,
            )
            .map_err(|_| Error::Corrupt("sealing a signing key failed".into()))?;
        let mut out = Vec::with_capacity(1 + NONCE_LEN + sealed.len());
        out.push(SEALED_V1);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    fn open(&self, kid: &str, sealed: &[u8]) -> Result<Vec<u8>, Error> {
        let wrong = || {
            Error::Corrupt(format!(
                "signing key {kid} cannot be decrypted: a different key-encryption key, or a damaged row"
            ))
        };
        let (&version, rest) = sealed.split_first().ok_or_else(wrong)?;
        if version != SEALED_V1 || rest.len() < NONCE_LEN {
            return Err(wrong());
        }
        let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| wrong())?;
        let mut buf = ciphertext.to_vec();
        let plain = self
            .0
            .open_in_place(nonce, Aad::from(kid.as_bytes()), &mut buf)
            .map_err(|_| wrong())?;
        Ok(plain.to_vec())
    }
}

fn random_key() -> Result<[u8; 32], KekError> {
    let mut key = [0_u8; 32];
    SystemRandom::new()
        .fill(&mut key)
        .map_err(|_| KekError::Random)?;
    Ok(key)
}

/// The key set as loaded: the signer and everything GetJwks publishes.
pub(crate) struct KeyRing {
    pub signer: Signer,
    pub verifier: Verifier,
    /// (kid, base64url x), newest first.
    pub jwks: Vec<(String, String)>,
}

/// How long keys live.
#[derive(Clone, Copy, Debug)]
pub(crate) struct KeyPolicy {
    pub rotation: Duration,
    pub access_token_ttl: Duration,
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

fn db_err(e: sqlx::Error) -> Error {
    Error::Store(StoreError::from(e))
}

async fn insert_key(tx: &mut Tx, kek: &Kek, now: i64) -> Result<String, Error> {
    let signer = Signer::generate()?;
    let sealed = kek.seal(signer.kid(), signer.pkcs8())?;
    sqlx::query("INSERT INTO sealed_signing_keys (kid, sealed, create_time) VALUES ($1, $2, $3)")
        .bind(signer.kid())
        .bind(sealed)
        .bind(now)
        .execute(&mut **tx)
        .await
        .map_err(db_err)?;
    Ok(signer.kid().to_owned())
}

/// Brings the key ring in `db` up to date and returns it, with the id of the key it added if
/// any, in one write transaction (PostgreSQL: under a table lock, so replicas agree on one
/// new key): plaintext keys of older versions are sealed and the plaintext deleted; a new key
/// is added when there is none (signing at once), or [`PUBLISH_AHEAD`] before the newest
/// turns the rotation period old, or when `rotate` is set (both signing from
/// [`PUBLISH_AHEAD`] later); keys whose tokens have all expired are deleted. The signer is
/// the newest key whose start has come.
pub(crate) async fn sync(
    db: &Db,
    kek: &Kek,
    policy: KeyPolicy,
    rotate: bool,
) -> Result<(KeyRing, Option<String>), Error> {
    let now = now_micros();
    let mut tx = db.begin().await?;
    if db.backend() == Backend::Postgres {
        sqlx::query("LOCK TABLE sealed_signing_keys IN EXCLUSIVE MODE")
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
    }
    // Keys from before encryption at rest: seal them, then forget the plaintext.
    let plain: Vec<(String, Vec<u8>, i64)> =
        sqlx::query_as("SELECT kid, pkcs8, create_time FROM signing_keys")
            .fetch_all(&mut *tx)
            .await
            .map_err(db_err)?;
    for (kid, pkcs8, create_time) in &plain {
        let sealed = kek.seal(kid, pkcs8)?;
        sqlx::query(
            "INSERT INTO sealed_signing_keys (kid, sealed, create_time) VALUES ($1, $2, $3)",
        )
        .bind(kid)
        .bind(sealed)
        .bind(create_time)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
    }
    if !plain.is_empty() {
        if db.backend() == Backend::Sqlite {
            // Zero the freed pages rather than leave the plaintext in the file's free list.
            sqlx::query("PRAGMA secure_delete = ON")
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
        }
        sqlx::query("DELETE FROM signing_keys")
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        tracing::info!(keys = plain.len(), "sealed plaintext signing keys");
    }

    let newest: Option<i64> =
        sqlx::query_scalar("SELECT MAX(create_time) FROM sealed_signing_keys")
            .fetch_one(&mut *tx)
            .await
            .map_err(db_err)?;
    let added = if rotate || is_due(newest, now, policy) {
        // The very first key signs at once: there is nothing to be ahead of.
        let start = match newest {
            None => now,
            Some(_) => now.saturating_add(micros(PUBLISH_AHEAD)),
        };
        let kid = insert_key(&mut tx, kek, start).await?;
        tracing::info!(
            kid,
            on_demand = rotate,
            signs_in_s = (start - now) / 1_000_000,
            "a new token signing key is published"
        );
        Some(kid)
    } else {
        None
    };

    let rows: Vec<(String, Vec<u8>, i64)> = sqlx::query_as(
        "SELECT kid, sealed, create_time FROM sealed_signing_keys ORDER BY create_time DESC, kid",
    )
    .fetch_all(&mut *tx)
    .await
    .map_err(db_err)?;
    let keep_for = micros(policy.access_token_ttl).saturating_add(micros(CLOCK_SKEW));
    let mut verifier = Verifier::new();
    let mut jwks = Vec::new();
    let mut kept: Vec<(i64, Signer)> = Vec::new();
    // The start of the key after this one: when this one stopped signing.
    let mut successor_start: Option<i64> = None;
    for (kid, sealed, create_time) in rows {
        if successor_start.is_some_and(|s| now.saturating_sub(s) > keep_for) {
            sqlx::query("DELETE FROM sealed_signing_keys WHERE kid = $1")
                .bind(&kid)
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
            tracing::info!(kid, "retired a token signing key (its tokens have expired)");
        } else {
            let key = Signer::from_pkcs8(&kek.open(&kid, &sealed)?)?;
            if key.kid() != kid {
                return Err(Error::Corrupt(format!(
                    "signing key {kid} has kid {}",
                    key.kid()
                )));
            }
            verifier.add_key(key.kid(), key.public_key());
            jwks.push((key.kid().to_owned(), key.public_key_b64()));
            kept.push((create_time, key));
        }
        successor_start = Some(create_time);
    }
    tx.commit().await?;
    let starts: Vec<i64> = kept.iter().map(|(start, _)| *start).collect();
    let index = signer_index(&starts, now)
        .ok_or_else(|| Error::Corrupt("no signing key after rotation".into()))?;
    let signer = kept.swap_remove(index).1;
    let ring = KeyRing {
        signer,
        verifier,
        jwks,
    };
    Ok((ring, added))
}

/// Whether a new key should be added now, given the newest key's start.
fn is_due(newest: Option<i64>, now: i64, policy: KeyPolicy) -> bool {
    newest.is_none_or(|t| {
        now.saturating_sub(t).saturating_add(micros(PUBLISH_AHEAD)) >= micros(policy.rotation)
    })
}

/// Which of the keys (starts newest first) signs at `now`: the newest that has started; the
/// oldest if none has (a clock set back), so signing never stops.
fn signer_index(starts: &[i64], now: i64) -> Option<usize> {
    starts
        .iter()
        .position(|start| *start <= now)
        .or_else(|| starts.len().checked_sub(1))
}

/// Adds a new signing key now (`tessera keys rotate`), returning its key id. Running users
/// replicas publish it at their next key check (at most 5 s) and sign with it from
/// [`PUBLISH_AHEAD`] on; tokens signed with earlier keys stay valid until they expire.
pub async fn rotate_now(db: &Db, kek: &Kek) -> Result<String, Error> {
    let policy = KeyPolicy {
        rotation: Duration::MAX,
        // The command does not know the servers' access-token lifetime: retire keys only
        // past the longest one allowed, never before a server would.
        access_token_ttl: tessera_mesh::config::tokens::MAX_ACCESS_TOKEN_TTL,
    };
    let (_, added) = sync(db, kek, policy, true).await?;
    added.ok_or_else(|| Error::Corrupt("rotation added no key".into()))
}

/// How often each replica looks at the key ring: bounds how long a key made elsewhere (by
/// another replica or `tessera keys rotate`) takes to sign here. A look is one small read;
/// the write transaction of [`sync`] runs only when something changed or is due.
pub(crate) fn check_interval(rotation: Duration) -> Duration {
    (rotation / 4).clamp(Duration::from_secs(1), Duration::from_secs(5))
}

/// Whether [`sync`] has work to do, from a plain read: a new key is due, a key is past its
/// retirement, the stored keys differ from `loaded` (kids newest first), another key than
/// `signing` should sign by now, or plaintext keys are left.
pub(crate) async fn needs_sync(
    db: &Db,
    policy: KeyPolicy,
    loaded: &[&str],
    signing: &str,
) -> Result<bool, Error> {
    let now = now_micros();
    let plain: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM signing_keys")
        .fetch_one(db.pool())
        .await
        .map_err(db_err)?;
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT kid, create_time FROM sealed_signing_keys ORDER BY create_time DESC, kid",
    )
    .fetch_all(db.pool())
    .await
    .map_err(db_err)?;
    let due = is_due(rows.first().map(|(_, t)| *t), now, policy);
    let starts: Vec<i64> = rows.iter().map(|(_, t)| *t).collect();
    let signer_moved = signer_index(&starts, now).is_some_and(|i| rows[i].0 != signing);
    let keep_for = micros(policy.access_token_ttl).saturating_add(micros(CLOCK_SKEW));
    let retiring = rows
        .windows(2)
        .any(|w| now.saturating_sub(w[0].1) > keep_for);
    let changed = rows
        .iter()
        .map(|(k, _)| k.as_str())
        .ne(loaded.iter().copied());
    Ok(plain > 0 || due || retiring || changed || signer_moved)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn seal_binds_the_kid_and_the_kek() {
        let kek = Kek::generate().unwrap();
        let sealed = kek.seal("kid-1", b"secret pkcs8").unwrap();
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
        assert_eq!(kek.open("kid-1", &sealed).unwrap(), b"secret pkcs8");
        assert!(kek.open("kid-2", &sealed).is_err(), "moved to another row");
        assert!(Kek::generate().unwrap().open("kid-1", &sealed).is_err());
        let mut flipped = sealed.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(kek.open("kid-1", &flipped).is_err());
        assert!(kek.open("kid-1", &[]).is_err());
    }

    #[test]
    fn kek_files_raw_or_base64_and_generated_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("raw");
        std::fs::write(&raw, [9_u8; 32]).unwrap();
        let b64 = dir.path().join("b64");
        std::fs::write(&b64, format!("  {}\n", STANDARD.encode([9_u8; 32]))).unwrap();
        let sealed = Kek::load(&raw).unwrap().seal("k", b"x").unwrap();
        assert_eq!(Kek::load(&b64).unwrap().open("k", &sealed).unwrap(), b"x");

        let short = dir.path().join("short");
        std::fs::write(&short, "c2hvcnQ=").unwrap();
        assert!(matches!(Kek::load(&short), Err(KekError::Format { .. })));
        assert!(matches!(
            Kek::load(&dir.path().join("missing")),
            Err(KekError::Read { .. })
        ));

        let generated = dir.path().join("key-encryption.key");
        let first = Kek::load_or_create(&generated).unwrap();
        let sealed = first.seal("k", b"y").unwrap();
        let again = Kek::load_or_create(&generated).unwrap();
        assert_eq!(
            again.open("k", &sealed).unwrap(),
            b"y",
            "reused, not replaced"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&generated).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
