//! Refresh tokens in the OAuth2 shape: opaque random strings handed out by Login, stored
//! only as their SHA-256, single use (each RefreshToken call rotates to a new one in the same
//! session, the "family"), and revocable.
//!
//! Reuse detection: a token that was already rotated, presented again, means two parties
//! hold the session (one of them stole it); the whole family is revoked and both must log in
//! again (OAuth 2.0 Security BCP, section 4.14). Revocation deletes the family's rows, so a
//! revoked token is simply unknown afterwards.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use ring::rand::{SecureRandom, SystemRandom};
use tessera_store::{Backend, Tx, now_micros};

use crate::{Error, Users, service::db_err};

/// 256 bits: guessing is hopeless, so the stored hash needs no salt or slow KDF.
const TOKEN_BYTES: usize = 32;
/// Longer inputs are not tokens this service issued; refused before hashing.
pub(crate) const MAX_TOKEN_LEN: usize = 128;

/// Why a refresh token was refused (all UNAUTHENTICATED).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Never issued, revoked, or pruned after expiry.
    Unknown,
    /// Past its lifetime.
    Expired,
    /// Already rotated: the session is revoked.
    Reused,
}

impl Refused {
    pub(crate) fn message(self) -> &'static str {
        match self {
            Refused::Unknown => "the refresh token is unknown or revoked",
            Refused::Expired => "the refresh token has expired",
            Refused::Reused => "the refresh token was already used; its session is revoked",
        }
    }
}

/// A successful rotation: who, with which role now, and the next token.
pub(crate) struct Rotated {
    pub user_id: String,
    pub role: String,
    pub refresh_token: String,
}

/// The stored form of a token: lowercase hex SHA-256.
pub(crate) fn token_hash(token: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn new_token() -> Result<String, Error> {
    let mut bytes = [0_u8; TOKEN_BYTES];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| Error::Password("no randomness for a refresh token".into()))?;
    Ok(B64.encode(bytes))
}

fn new_family() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

/// Inserts a new token of `family` for `user_id`, valid for the configured TTL from now.
async fn insert(
    tx: &mut Tx,
    users: &Users,
    family: &str,
    user_id: &str,
    now: i64,
) -> Result<String, Error> {
    let token = new_token()?;
    let ttl = i64::try_from(users.inner.config.refresh_token_ttl.as_micros()).unwrap_or(i64::MAX);
    sqlx::query(
        "INSERT INTO refresh_tokens \
         (token_hash, family_id, user_id, create_time, expire_time, used_time) \
         VALUES ($1, $2, $3, $4, $5, NULL)",
    )
    .bind(token_hash(&token))
    .bind(family)
    .bind(user_id)
    .bind(now)
    .bind(now.saturating_add(ttl))
    .execute(&mut **tx)
    .await
    .map_err(db_err)?;
    Ok(token)
}

/// Revokes every session of `user_id` (role changed, user deleted), in the caller's
/// transaction so the revocation commits with the change.
pub(crate) async fn revoke_user(tx: &mut Tx, user_id: &str) -> Result<u64, Error> {
    Ok(sqlx::query("DELETE FROM refresh_tokens WHERE user_id = $1")
        .bind(user_id)
        .execute(&mut **tx)
        .await
        .map_err(db_err)?
        .rows_affected())
}

async fn revoke_family(tx: &mut Tx, family: &str) -> Result<(), Error> {
    sqlx::query("DELETE FROM refresh_tokens WHERE family_id = $1")
        .bind(family)
        .execute(&mut **tx)
        .await
        .map_err(db_err)?;
    Ok(())
}

impl Users {
    /// Starts a new session for `user_id` (Login) and returns its first refresh token.
    /// Expired tokens (anyone's: they are useless, and a reuse past expiry is refused as
    /// unknown anyway) are pruned on the way, through the expiry index.
    pub(crate) async fn start_session(&self, user_id: &str) -> Result<String, Error> {
        let now = now_micros();
        let mut tx = self.db().begin().await?;
        sqlx::query("DELETE FROM refresh_tokens WHERE expire_time <= $1")
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        let token = insert(&mut tx, self, &new_family(), user_id, now).await?;
        tx.commit().await?;
        Ok(token)
    }

    /// Uses up `token` and returns the user it belongs to (as stored now: current role) with
    /// the next token of the same session. A used, expired or unknown token is refused; a
    /// used one revokes its session.
    pub(crate) async fn rotate(&self, token: &str) -> Result<Result<Rotated, Refused>, Error> {
        let hash = token_hash(token);
        let now = now_micros();
        let mut tx = self.db().begin().await?;
        // Claiming with a conditional UPDATE makes concurrent uses of one token exact: the
        // row lock (PostgreSQL) or the write lock (SQLite) lets exactly one of them see it
        // unused.
        let claimed = sqlx::query(
            "UPDATE refresh_tokens SET used_time = $1 \
             WHERE token_hash = $2 AND used_time IS NULL AND expire_time > $1",
        )
        .bind(now)
        .bind(&hash)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?
        .rows_affected();
        let row: Option<(String, String, Option<i64>)> = sqlx::query_as(
            "SELECT family_id, user_id, used_time FROM refresh_tokens WHERE token_hash = $1",
        )
        .bind(&hash)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db_err)?;
        let Some((family, user_id, used)) = row else {
            return Ok(Err(Refused::Unknown));
        };
        if claimed == 0 {
            revoke_family(&mut tx, &family).await?;
            tx.commit().await?;
            return Ok(Err(if used.is_some() {
                tracing::warn!(%user_id, "a used refresh token was presented again; session revoked");
                Refused::Reused
            } else {
                Refused::Expired
            }));
        }
        // The user as stored now: the new access token carries the current role. (Deleting
        // the user revokes its tokens in the same transaction; checked anyway.)
        let role: Option<String> = sqlx::query_scalar(&format!(
            "SELECT role FROM users WHERE user_id = $1{}",
            share_lock(self.db().backend())
        ))
        .bind(&user_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db_err)?;
        let Some(role) = role else {
            revoke_family(&mut tx, &family).await?;
            tx.commit().await?;
            return Ok(Err(Refused::Unknown));
        };
        let refresh_token = insert(&mut tx, self, &family, &user_id, now).await?;
        tx.commit().await?;
        Ok(Ok(Rotated {
            user_id,
            role,
            refresh_token,
        }))
    }

    /// Revokes the session `token` belongs to. Unknown tokens are not an error (RFC 7009:
    /// the outcome, no usable session, is the same), so a retried Logout succeeds.
    pub(crate) async fn end_session(&self, token: &str) -> Result<bool, Error> {
        let mut tx = self.db().begin().await?;
        let family: Option<String> =
            sqlx::query_scalar("SELECT family_id FROM refresh_tokens WHERE token_hash = $1")
                .bind(token_hash(token))
                .fetch_optional(&mut *tx)
                .await
                .map_err(db_err)?;
        let Some(family) = family else {
            return Ok(false);
        };
        revoke_family(&mut tx, &family).await?;
        tx.commit().await?;
        Ok(true)
    }
}

/// ` FOR SHARE` on PostgreSQL: a row read to decide a write stays as read until commit.
/// SQLite's write transaction already excludes other writers.
pub(crate) fn share_lock(backend: Backend) -> &'static str {
    match backend {
        Backend::Postgres => " FOR SHARE",
        Backend::Sqlite => "",
    }
}
