//! The comment service's one error type, mapped to `tonic::Status` in one place.

use tessera_store::{StoreError, error_chain};
use tonic::Status;

/// Everything CommentService can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad input: an INVALID_ARGUMENT with field violations, built by `Violations`.
    #[error("invalid argument: {}", .0.message())]
    Invalid(Status),
    /// The named resource does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// The caller may not do this.
    #[error("permission denied: {0}")]
    PermissionDenied(&'static str),
    /// The token's user has been deleted.
    #[error("the user no longer exists")]
    UserGone,
    /// A downstream service answered with an error; passed through as it is.
    #[error("downstream: {}: {}", .0.code(), .0.message())]
    Upstream(Status),
    /// The database failed; UNAVAILABLE when it was only busy, INTERNAL otherwise.
    #[error("storage")]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        Self::Store(e.into())
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        match err {
            Error::Invalid(status) | Error::Upstream(status) => status,
            Error::NotFound(what) => Status::not_found(format!("{what} not found")),
            Error::PermissionDenied(why) => Status::permission_denied(why),
            Error::UserGone => Status::unauthenticated("the user no longer exists"),
            Error::Store(e) if e.is_transient() => Status::unavailable(e.to_string()),
            e @ Error::Store(_) => tessera_mesh::errors::internal(error_chain(&e)),
        }
    }
}
