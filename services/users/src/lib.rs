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
//! - `bootstrap_admin`: when a user with exactly that username is created, it gets the ADMIN
//!   role. Nothing else can create an ADMIN except `SetUserRole` by an ADMIN.
//! - Role changes apply to tokens issued afterwards; tokens already issued keep their role
//!   until they expire (`token_ttl`).
//! - `DeleteUser` removes the row and appends `UserDeleted` in the same transaction; posts and
//!   comments follow from that event.
//! - `CreateUser` with a `request_id` seen before (for the same username and email) returns
//!   the user it created the first time.
//! - Password hashing (CreateUser, Login) is bounded: `hash_concurrency` hashes at once on
//!   their own threads, `hash_queue` more calls waiting, past that RESOURCE_EXHAUSTED. A
//!   username (known or not) with `login_failures_per_minute` recent failures is refused,
//!   right password included, with RESOURCE_EXHAUSTED and a retry hint (`RetryInfo`) until
//!   its count drains; a successful login clears it. Both are per replica.

#![forbid(unsafe_code)]

mod error;
mod hashing;
mod service;
mod throttle;

use std::{sync::Arc, time::Duration};

use tessera_mesh::token::{DEFAULT_TOKEN_TTL, Signer, Verifier};
use tessera_store::{Backend, Db, Migration, now_micros};

pub use error::Error;

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
];

/// How UserService behaves beyond its storage.
#[derive(Clone, Debug)]
pub struct UsersConfig {
    /// The username that is made ADMIN when it is created (how the first admin comes to be).
    pub bootstrap_admin: Option<String>,
    /// How long an access token from Login is valid.
    pub token_ttl: Duration,
    /// argon2id cost. The default is OWASP's recommendation (19 MiB, 2 passes); tests may
    /// lower it. Hashes record their parameters, so changing this keeps old passwords valid.
    pub password_params: argon2::Params,
    /// Hashes computed at once (CreateUser and Login); each holds the memory cost of
    /// `password_params` while it runs. Default: the CPUs this process may use.
    pub hash_concurrency: usize,
    /// Hashes that may wait for a turn; past it RESOURCE_EXHAUSTED.
    pub hash_queue: usize,
    /// Failed logins per username and minute before logins for it are refused for a while.
    pub login_failures_per_minute: u32,
}

impl Default for UsersConfig {
    fn default() -> Self {
        let limits = tessera_mesh::service_limits::ServiceLimits::default();
        Self {
            bootstrap_admin: None,
            token_ttl: DEFAULT_TOKEN_TTL,
            password_params: argon2::Params::default(),
            hash_concurrency: limits.password_hash_concurrency,
            hash_queue: limits.password_hash_queue,
            login_failures_per_minute: limits.login_failures_per_minute,
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
    /// The bound on concurrent password hashing.
    hashing: hashing::Hashing,
    /// Failed logins per username.
    throttle: throttle::LoginThrottle,
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
        let hashing = hashing::Hashing::new(
            config.password_params.clone(),
            config.hash_concurrency,
            config.hash_queue,
        )?;
        let dummy_hash = hashing
            .hash(uuid::Uuid::now_v7().simple().to_string())
            .await?;
        let throttle = throttle::LoginThrottle::new(config.login_failures_per_minute);
        Ok(Users {
            inner: Arc::new(Inner {
                db,
                config,
                signer,
                verifier,
                jwks,
                dummy_hash,
                hashing,
                throttle,
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
