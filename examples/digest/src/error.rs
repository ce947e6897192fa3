use tessera_mesh::errors::error_chain;
use tessera_store::StoreError;
use tonic::Status;

/// Everything DigestService can fail with, mapped to a gRPC status in
/// [`From<Error> for Status`] (the one place).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The database failed: UNAVAILABLE when it stayed busy, else an opaque INTERNAL.
    #[error("storage failed")]
    Store(#[from] StoreError),
    /// An upstream call failed; its status is passed on (UNAVAILABLE, DEADLINE_EXCEEDED, …)
    /// so the caller sees why.
    #[error("{0} failed: {1}")]
    Upstream(&'static str, Status),
}

impl From<sqlx::Error> for Error {
    fn from(err: sqlx::Error) -> Self {
        Error::Store(StoreError::from(err))
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Status {
        match err {
            Error::Store(e) if e.is_transient() => Status::unavailable(e.to_string()),
            Error::Upstream(what, status) => {
                Status::new(status.code(), format!("{what}: {}", status.message()))
            }
            other => tessera_mesh::errors::internal(error_chain(&other)),
        }
    }
}
