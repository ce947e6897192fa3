//! The notification service's one error type, mapped to `tonic::Status` in one place.

use tessera_store::{StoreError, error_chain};
use tonic::Status;

/// Everything NotificationService can fail with.
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
    PermissionDenied(String),
    /// The user holds the most subscriptions one user may (the limit).
    #[error("too many open subscriptions for this user (at most {0})")]
    TooManySubscriptions(usize),
    /// This replica serves the most subscriptions it may (the limit).
    #[error("this replica has its maximum of {0} open subscriptions")]
    ReplicaFull(usize),
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
            Error::Invalid(status) => status,
            Error::NotFound(what) => Status::not_found(format!("{what} not found")),
            Error::PermissionDenied(why) => Status::permission_denied(why),
            Error::TooManySubscriptions(max) => Status::resource_exhausted(format!(
                "you have {max} open subscriptions, the most one user may hold; close one \
                 before subscribing again"
            )),
            Error::ReplicaFull(max) => Status::unavailable(format!(
                "this replica serves its maximum of {max} subscriptions; try again shortly"
            )),
            Error::Store(e) if e.is_transient() => Status::unavailable(e.to_string()),
            e @ Error::Store(_) => tessera_mesh::errors::internal(error_chain(&e)),
        }
    }
}
