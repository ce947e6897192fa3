//! UserService: accounts, argon2id password hashes, and the Ed25519 key that signs end-user
//! access tokens (EdDSA JWTs verified by every other service through `GetJwks`).
//!
//! Not for: verifying tokens on requests (the mesh server stack does that) or anything about
//! posts and comments (they follow `WatchEvents` and clean up after `UserDeleted`).
//!
//! # Constructing it
//!
//! ```no_run
//! # async fn f() -> Result<(), tessera_users::Error> {
//! use tessera::users::v1::user_service_server::UserServiceServer;
//! use tessera_users::{Users, UsersConfig};
//!
//! let config = UsersConfig {
//!     // The account with this username is created as ADMIN (the first admin).
//!     bootstrap_admin: Some("root".into()),
//!     ..UsersConfig::default()
//! };
//! // A SQLite path, or a postgres:// URL.
//! let users = Users::open("/var/lib/tessera/users.db", config).await?;
//! // Its own keys, for `TokenKeys::fixed` in the users process.
//! let keys = tessera_mesh::auth::TokenKeys::fixed(users.verifier());
//! let service = UserServiceServer::new(users.clone());
//! # Ok(()) }
//! ```
//!
//! [`Users::with_db`] takes an already opened [`tessera_store::Db`] (e.g. a PostgreSQL schema)
//! and runs [`MIGRATIONS`] on it.
//!
//! # Behaviour
//!
//! - The signing key is generated on first start and kept in the database, so tokens survive
//!   restarts. Tokens carry `kid`, `sub` (user id), `role`, `iat`, `exp`.
//! - `bootstrap_admin`: when a user with exactly that username is created while no ADMIN
//!   exists and no bootstrap grant was ever made in this database, it gets the ADMIN role,
//!   decided inside the insert transaction. Nothing else can create an ADMIN except
//!   `SetUserRole` by an ADMIN.
//! - Login returns a short-lived access token (`token_ttl`, minutes) and a refresh token
//!   (`refresh_token_ttl`); `RefreshToken` rotates it (single use, reuse revokes the session),
//!   `Logout` revokes it. Changing a user's role or deleting the user revokes their refresh
//!   tokens; access tokens already issued keep their role until they expire, but privileged
//!   decisions (`SetUserRole`, `DeleteUser` of another user) re-read the acting user's
//!   current row, so a deleted or demoted ADMIN is refused at once.
//! - `DeleteUser` removes the row and appends `UserDeleted` in the same transaction; posts and
//!   comments follow from that event.
//! - `CreateUser` with a `request_id` seen before (for the same username and email) returns
//!   the user it created the first time.

#![forbid(unsafe_code)]

mod error;
mod service;
mod sessions;

use std::{sync::Arc, time::Duration};

use tessera_mesh::token::{Signer, Verifier};
use tessera_store::{Backend, Db, Migration, now_micros};

pub use error::Error;
pub use sessions::Refused;

/// The service's schema. Passed to [`Db::open`] by [`Users::open`]; exposed for tools.
pub const MIGRATIONS: &[Migration] = &[
    Migration::portable(
        "users",
        "CREATE TABLE users (
            user_id TEXT PRIMARY KEY,
            username TEXT NOT NULL UNIQUE,
            display_name TEXT NOT NULL,
            email TEXT NOT NULL,
            password_hash TEXT NOT NULL,
            role TEXT NOT NULL,
            create_time BIGINT NOT NULL
        );
        CREATE TABLE create_requests (
            request_id TEXT PRIMARY KEY,
            user_id TEXT NOT NULL
        );
        CREATE INDEX create_requests_user ON create_requests (user_id);",
    ),
    Migration::per_backend(
        "signing_keys",
        "CREATE TABLE signing_keys (
            kid TEXT PRIMARY KEY,
            pkcs8 BLOB NOT NULL,
            create_time BIGINT NOT NULL
        )",
        "CREATE TABLE signing_keys (
            kid TEXT PRIMARY KEY,
            pkcs8 BYTEA NOT NULL,
            create_time BIGINT NOT NULL
        )",
    ),
    // Refresh tokens by their SHA-256 (never the token itself). A family is one login's
    // chain of rotations; `used_time` marks a rotated token, kept for reuse detection.
    Migration::portable(
        "refresh_tokens",
        "CREATE TABLE refresh_tokens (
            token_hash TEXT PRIMARY KEY,
            family_id TEXT NOT NULL,
            user_id TEXT NOT NULL,
            create_time BIGINT NOT NULL,
            expire_time BIGINT NOT NULL,
            used_time BIGINT
        );
        CREATE INDEX refresh_tokens_family ON refresh_tokens (family_id);
        CREATE INDEX refresh_tokens_user ON refresh_tokens (user_id);",
    ),
    // At most one row: the bootstrap admin was granted (once per database).
    Migration::portable(
        "bootstrap_admin",
        "CREATE TABLE bootstrap_admin (
            singleton INTEGER PRIMARY KEY CHECK (singleton = 1),
            user_id TEXT NOT NULL,
            grant_time BIGINT NOT NULL
        )",
    ),
];

pub use tessera_mesh::config::tokens::{DEFAULT_ACCESS_TOKEN_TTL, DEFAULT_REFRESH_TOKEN_TTL};

/// How UserService behaves beyond its storage.
#[derive(Clone, Debug)]
pub struct UsersConfig {
    /// The username that is made ADMIN when it is created (how the first admin comes to be).
    pub bootstrap_admin: Option<String>,
    /// How long an access token (from Login or RefreshToken) is valid: minutes, since it
    /// cannot be revoked before it expires.
    pub token_ttl: Duration,
    /// How long a refresh token is valid after it is issued (each rotation issues a new
    /// one, so a session in use lives on; an idle one ends after this).
    pub refresh_token_ttl: Duration,
    /// argon2id cost. The default is OWASP's recommendation (19 MiB, 2 passes); tests may
    /// lower it. Hashes record their parameters, so changing this keeps old passwords valid.
    pub password_params: argon2::Params,
}

impl Default for UsersConfig {
    fn default() -> Self {
        Self {
            bootstrap_admin: None,
            token_ttl: DEFAULT_ACCESS_TOKEN_TTL,
            refresh_token_ttl: DEFAULT_REFRESH_TOKEN_TTL,
            password_params: argon2::Params::default(),
        }
    }
}

/// The UserService implementation. Cheap to clone (shared state).
#[derive(Clone)]
pub struct Users {
    inner: Arc<Inner>,
}

struct Inner {
    db: Db,
    config: UsersConfig,
    signer: Signer,
    verifier: Verifier,
    /// Every stored public key as (kid, base64url x), for GetJwks.
    jwks: Vec<(String, String)>,
    /// A real hash of a random password, verified against when a login names an unknown
    /// user, so both failures take the same time.
    dummy_hash: String,
}

impl Users {
    /// Opens (creating and migrating if needed) the database at `target` (a SQLite path or a
    /// `postgres://` URL) and loads or creates the signing key.
    pub async fn open(target: &str, config: UsersConfig) -> Result<Users, Error> {
        let db = Db::open(target, MIGRATIONS).await?;
        Self::with_db(db, config).await
    }

    /// Like [`Users::open`] over an already connected database; runs [`MIGRATIONS`].
    pub async fn with_db(db: Db, config: UsersConfig) -> Result<Users, Error> {
        db.migrate(MIGRATIONS).await?;
        let (signer, verifier, jwks) = load_or_create_keys(&db).await?;
        let dummy_hash = service::hash_password(
            config.password_params.clone(),
            uuid::Uuid::now_v7().simple().to_string(),
        )
        .await?;
        Ok(Users {
            inner: Arc::new(Inner {
                db,
                config,
                signer,
                verifier,
                jwks,
                dummy_hash,
            }),
        })
    }

    /// A verifier for tokens this service signs (every stored key), for
    /// `tessera_mesh::auth::TokenKeys::fixed` in the users process.
    pub fn verifier(&self) -> Verifier {
        self.inner.verifier.clone()
    }

    /// The service's database.
    pub fn db(&self) -> &Db {
        &self.inner.db
    }
}

/// Loads every stored key (the newest signs) or, on first start, generates one. Serialized
/// across replicas by the write transaction (and a table lock on PostgreSQL), so replicas
/// starting together agree on one key.
async fn load_or_create_keys(db: &Db) -> Result<(Signer, Verifier, Vec<(String, String)>), Error> {
    let mut tx = db.begin().await?;
    if db.backend() == Backend::Postgres {
        sqlx::query("LOCK TABLE signing_keys IN EXCLUSIVE MODE")
            .execute(&mut *tx)
            .await
            .map_err(tessera_store::StoreError::from)?;
    }
    let rows: Vec<(String, Vec<u8>)> =
        sqlx::query_as("SELECT kid, pkcs8 FROM signing_keys ORDER BY create_time DESC, kid")
            .fetch_all(&mut *tx)
            .await
            .map_err(tessera_store::StoreError::from)?;
    let mut verifier = Verifier::new();
    let mut jwks = Vec::new();
    let mut newest = None;
    for (kid, pkcs8) in rows {
        let signer = Signer::from_pkcs8(&pkcs8)?;
        if signer.kid() != kid {
            return Err(Error::Corrupt(format!(
                "signing key {kid} has kid {}",
                signer.kid()
            )));
        }
        verifier.add_key(signer.kid(), signer.public_key());
        jwks.push((signer.kid().to_owned(), signer.public_key_b64()));
        if newest.is_none() {
            newest = Some(signer);
        }
    }
    let signer = match newest {
        Some(signer) => {
            tx.rollback().await?;
            signer
        }
        None => {
            let signer = Signer::generate()?;
            sqlx::query("INSERT INTO signing_keys (kid, pkcs8, create_time) VALUES ($1, $2, $3)")
                .bind(signer.kid())
                .bind(signer.pkcs8())
                .bind(now_micros())
                .execute(&mut *tx)
                .await
                .map_err(tessera_store::StoreError::from)?;
            tx.commit().await?;
            tracing::info!(kid = signer.kid(), "generated a token signing key");
            verifier.add_key(signer.kid(), signer.public_key());
            jwks.push((signer.kid().to_owned(), signer.public_key_b64()));
            signer
        }
    };
    Ok((signer, verifier, jwks))
}
