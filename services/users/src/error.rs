use tessera_store::StoreError;
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
    #[error("a blocking task failed")]
    Join(#[from] tokio::task::JoinError),
}

/// The error and its causes on one line, for the log.
fn chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

impl From<Error> for Status {
    fn from(err: Error) -> Status {
        match err {
            Error::NotFound => Status::not_found("user not found"),
            Error::PermissionDenied(why) => Status::permission_denied(why),
            Error::UsernameTaken => Status::already_exists("username is taken"),
            Error::BadCredentials => Status::unauthenticated("invalid username or password"),
            other => tessera_mesh::errors::internal(chain(&other)),
        }
    }
}
