//! UserService: accounts, argon2id password hashes, refresh-token sessions, and the Ed25519
//! keys that sign end-user access tokens (EdDSA JWTs verified by every other service through `GetJwks`).
//!
//! Not for: verifying tokens on requests (the mesh server stack does that) or anything about
//! posts and comments (they follow `WatchEvents` and clean up after `UserDeleted`).
//!
//! # Constructing it
//!
//! ```no_run
//! # async fn f() -> Result<(), tessera_users::Error> {
//! use tessera::users::v1::user_service_server::UserServiceServer;
//! use tessera_users::{Kek, Users, UsersConfig};
//!
//! let config = UsersConfig {
//!     // The account with this username is created as ADMIN (the first admin).
//!     bootstrap_admin: Some("root".into()),
//!     // Seals the signing keys in the database (a mounted Secret file).
//!     key_encryption_key: Some(Kek::load("/var/run/tessera/kek/key".as_ref())?),
//!     ..UsersConfig::default()
//! };
//! // A SQLite path, or a postgres:// URL.
//! let users = Users::open("/var/lib/tessera/users.db", config).await?;
//! // Its own keys, for the users process's server stack; kept current as keys rotate.
//! let keys = users.token_keys();
//! # let (_stop, shutdown) = tokio::sync::watch::channel(false);
//! tokio::spawn(users.clone().maintain_keys(shutdown));
//! let service = UserServiceServer::new(users.clone());
//! # Ok(()) }
//! ```
//!
//! [`Users::with_db`] takes an already opened [`tessera_store::Db`] (e.g. a PostgreSQL schema)
//! and runs [`MIGRATIONS`] on it.
//!
//! # Behaviour
//!
//! - Signing keys live in the database sealed with the key-encryption key (see [`keys`]); a
//!   new one takes over every `key_rotation` or on demand ([`rotate_now`]), and old ones are
//!   published until their tokens have expired. Tokens carry `kid`, `sub` (user id), `role`,
//!   `iat`, `exp`.
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
//! - Password hashing (CreateUser, Login) is bounded: `hash_concurrency` hashes at once on
//!   their own threads, `hash_queue` more calls waiting, past that RESOURCE_EXHAUSTED. A
//!   username (known or not) with `login_failures_per_minute` recent failures is refused,
//!   right password included, with RESOURCE_EXHAUSTED and a retry hint (`RetryInfo`) until
//!   its count drains; a successful login clears it. Both are per replica.

#![forbid(unsafe_code)]

mod error;
mod hashing;
pub mod keys;
mod service;
mod sessions;
mod throttle;

use std::time::Duration;

use tessera_store::Migration;

pub use error::Error;
pub use keys::{Kek, KekError, rotate_now};
pub use service::Users;
pub use sessions::Refused;

/// The service's schema. Passed to [`tessera_store::Db::open`] by [`Users::open`]; exposed for tools.
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
    // Signing keys sealed with the key-encryption key (AES-256-GCM, AAD = kid). Keys in
    // `signing_keys` (plaintext, older versions) are moved here and deleted at start.
    Migration::per_backend(
        "sealed_signing_keys",
        "CREATE TABLE sealed_signing_keys (
            kid TEXT PRIMARY KEY,
            sealed BLOB NOT NULL,
            create_time BIGINT NOT NULL
        )",
        "CREATE TABLE sealed_signing_keys (
            kid TEXT PRIMARY KEY,
            sealed BYTEA NOT NULL,
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
        CREATE INDEX refresh_tokens_user ON refresh_tokens (user_id);
        CREATE INDEX refresh_tokens_expiry ON refresh_tokens (expire_time);",
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

pub use tessera_mesh::config::tokens::{
    DEFAULT_ACCESS_TOKEN_TTL, DEFAULT_REFRESH_TOKEN_TTL, DEFAULT_SIGNING_KEY_ROTATION,
};

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
    /// How often a new signing key takes over.
    pub key_rotation: Duration,
    /// Seals signing keys at rest; required ([`Kek::load`], [`Kek::load_or_create`]).
    pub key_encryption_key: Option<Kek>,
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
            token_ttl: DEFAULT_ACCESS_TOKEN_TTL,
            refresh_token_ttl: DEFAULT_REFRESH_TOKEN_TTL,
            key_rotation: DEFAULT_SIGNING_KEY_ROTATION,
            key_encryption_key: None,
            password_params: argon2::Params::default(),
            hash_concurrency: limits.password_hash_concurrency,
            hash_queue: limits.password_hash_queue,
            login_failures_per_minute: limits.login_failures_per_minute,
        }
    }
}
