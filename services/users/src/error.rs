use tessera_store::{StoreError, error_chain};
use tonic::Status;

/// Everything UserService can fail with, mapped to a gRPC status in [`From<Error> for Status`]
/// (the one place).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("user not found")]
    NotFound,
    #[error("{0}")]
    PermissionDenied(&'static str),
    #[error("username is taken")]
    UsernameTaken,
    /// Login failures: one message whether the user is unknown or the password wrong.
    #[error("invalid username or password")]
    BadCredentials,
    #[error("storage failed")]
    Store(#[from] StoreError),
    #[error("password hashing failed: {0}")]
    Password(String),
    #[error("the token signing key is unusable: {0}")]
    Key(#[from] tessera_mesh::token::TokenError),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("the key-encryption key is unusable: {0}")]
    Kek(#[from] crate::keys::KekError),
    #[error("no key-encryption key configured for the signing keys")]
    NoKeyEncryptionKey,
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
            Error::Store(e) if e.is_busy() => Status::unavailable(e.to_string()),
            other => tessera_mesh::errors::internal(error_chain(&other)),
        }
    }
}
