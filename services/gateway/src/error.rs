//! The gateway's one error type and its mapping to gRPC statuses.

use tessera_mesh::token::TokenError;
use tonic::Status;
use tower::BoxError;

/// Everything that can go wrong in the gateway.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The path is not a public method served here.
    #[error("method {0} is not served here")]
    UnknownMethod(String),
    /// The method needs an end user and the request carries no token.
    #[error("an access token is required")]
    TokenRequired,
    /// A token was presented and did not verify.
    #[error("invalid access token: {0}")]
    BadToken(#[from] TokenError),
    /// The `authorization` header is not `Bearer <token>`.
    #[error("the authorization header must be \"Bearer <token>\"")]
    BadAuthorizationHeader,
    /// A token bucket for this caller is empty.
    #[error("rate limit exceeded for {0}")]
    RateLimited(&'static str),
    /// The downstream channel failed before producing a response.
    #[error("downstream call failed: {0}")]
    Unavailable(BoxError),
    /// A status already built: a validation failure, or a downstream reply passed through.
    #[error("{}: {}", .0.code(), .0.message())]
    Status(#[from] Status),
    /// The routing table names a method the contracts do not mark public.
    #[error("route {0} is not a public method")]
    NotPublic(String),
    /// The contracts' descriptor set could not be read.
    #[error("reading the descriptor set: {0}")]
    Descriptor(#[from] prost::DecodeError),
    /// A `google.api.http` rule in the contracts cannot be served as written.
    #[error("HTTP rule: {0}")]
    HttpRule(String),
    /// Anything else unexpected.
    #[error("{0}")]
    Internal(String),
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        match err {
            Error::UnknownMethod(path) => {
                Status::unimplemented(format!("method {path} is not served here"))
            }
            Error::TokenRequired => Status::unauthenticated("an access token is required"),
            Error::BadToken(e) => Status::unauthenticated(format!("invalid access token: {e}")),
            Error::BadAuthorizationHeader => {
                Status::unauthenticated("the authorization header must be \"Bearer <token>\"")
            }
            Error::RateLimited(what) => {
                Status::resource_exhausted(format!("rate limit exceeded for this {what}"))
            }
            Error::Unavailable(e) => {
                tracing::warn!(error = %e, "downstream call failed");
                Status::unavailable("the service is unavailable")
            }
            Error::Status(status) => status,
            e @ (Error::NotPublic(_)
            | Error::Descriptor(_)
            | Error::HttpRule(_)
            | Error::Internal(_)) => tessera_mesh::errors::internal(e),
        }
    }
}
