use tessera_store::{StoreError, error_chain};
use tonic::Status;

/// Everything PostService can fail with, mapped to a gRPC status in [`From<Error> for Status`]
/// (the one place).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The post asked for does not exist.
    #[error("post not found")]
    NotFound,
    /// The caller may not do this; the reason goes back to them as is.
    #[error("{0}")]
    PermissionDenied(&'static str),
    /// The etag sent with an update is not the stored one.
    #[error("the post changed since it was read; read it again and retry")]
    StaleEtag,
    /// The end user's account was deleted (their token may still be valid for a while).
    #[error("the author's account was deleted")]
    AuthorDeleted,
    /// The database failed; UNAVAILABLE when it was only busy, INTERNAL otherwise.
    #[error("storage failed")]
    Store(#[from] StoreError),
    /// A stored row does not decode (a post's tags are not a JSON list of strings).
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

impl From<sqlx::Error> for Error {
    fn from(err: sqlx::Error) -> Self {
        Error::Store(StoreError::from(err))
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Status {
        match err {
            Error::NotFound => Status::not_found("post not found"),
            Error::PermissionDenied(why) => Status::permission_denied(why),
            Error::StaleEtag => Status::aborted(err.to_string()),
            Error::AuthorDeleted => Status::failed_precondition(err.to_string()),
            Error::Store(e) if e.is_transient() => Status::unavailable(e.to_string()),
            other => tessera_mesh::errors::internal(error_chain(&other)),
        }
    }
}
