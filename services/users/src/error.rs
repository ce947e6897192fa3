use std::time::Duration;
use tessera_store::{StoreError, error_chain};

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// Everything UserService can fail with, mapped to a gRPC status in [`From<Error> for Status`]
/// (the one place).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The user asked for does not exist.
    #[error("user not found")]
    NotFound,
    /// The caller may not do this; the reason goes back to them as is.
    #[error("{0}")]
    PermissionDenied(&'static str),
    /// Another user already holds the username.
    #[error("username is taken")]
    UsernameTaken,
    /// Login failures: one message whether the user is unknown or the password wrong.
    #[error("invalid username or password")]
    BadCredentials,
    /// Every password-hashing slot and the queue before them are taken.
    #[error("too many password checks in progress")]
    HashingBusy,
    /// Too many failed logins for the username lately; allowed again after the duration.
    #[error("too many failed logins for this username")]
    Throttled(std::time::Duration),
    /// The database failed; UNAVAILABLE when it was only busy, INTERNAL otherwise.
    #[error("storage failed")]
    Store(#[from] StoreError),
    /// Hashing could not run (no thread, no randomness); not a wrong password.
    #[error("password hashing failed: {0}")]
    Password(String),
    /// A signing key could not be generated or parsed.
    #[error("the token signing key is unusable: {0}")]
    Key(#[from] tessera_mesh::token::TokenError),
    /// A stored password hash or signing key cannot be read back, or key handling broke an
    /// invariant.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// The key-encryption key could not be loaded or created.
    #[error("the key-encryption key is unusable: {0}")]
    Kek(#[from] crate::keys::KekError),
    /// Signing keys are sealed at rest, and no key-encryption key was configured.
    #[error("no key-encryption key configured for the signing keys")]
    NoKeyEncryptionKey,
    /// A spawned task panicked or was cancelled.
    #[error("a blocking task failed")]
    Join(#[from] tokio::task::JoinError),
}

impl From<Error> for Status {
    fn from(err: Error) -> Status {
        match err {
            Error::NotFound => Status::not_found("user not found"),
            Error::PermissionDenied(why) => Status::permission_denied(why),
            Error::UsernameTaken => Status::already_exists("username is taken"),
            Error::BadCredentials => Status::unauthenticated("invalid username or password"),
            Error::HashingBusy => retry_later(
                "too many password checks in progress; try again in 1 s",
                Duration::from_secs(1),
            ),
            Error::Throttled(after) => retry_later(
                &format!(
                    "too many failed logins for this username; try again in {} s",
                    after.as_secs().max(1)
                ),
                after,
            ),
            Error::Store(e) if e.is_transient() => Status::unavailable(e.to_string()),
            other => tessera_mesh::errors::internal(error_chain(&other)),
        }
    }
}

/// RESOURCE_EXHAUSTED with the wait in the message and as `google.rpc.RetryInfo`.
fn retry_later(message: &str, after: Duration) -> Status {
    Status::with_error_details(
        Code::ResourceExhausted,
        message,
        ErrorDetails::with_retry_info(Some(after)),
    )
}
