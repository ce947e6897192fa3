//! The crate's one error type and its one mapping to `tonic::Status`.

use std::{io, net::SocketAddr};

use tessera_mesh::errors::error_chain;
use tonic::Status;
use tower::BoxError;

/// Everything that can go wrong building a channel or carrying a call.
///
/// Building a channel fails with the configuration variants; the request-path variants never
/// reach callers as `Error`: the channel hands them to tonic as a [`Status`] (see the `From`
/// impl, the only place they are mapped).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A target string that is neither `static:host:port,...`, `dns:name:port` nor `host:port`.
    #[error("invalid target {target:?}: {reason}")]
    InvalidTarget {
        /// The target as given.
        target: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A builder setting outside its range.
    #[error("invalid client setting {setting}: {reason}")]
    InvalidSetting {
        /// The builder method.
        setting: &'static str,
        /// The accepted range.
        reason: &'static str,
    },
    /// Channels spawn their resolver on the current Tokio runtime.
    #[error("channels must be built inside a Tokio runtime")]
    NoRuntime,
    /// `tessera::FILE_DESCRIPTOR_SET` did not decode (a build problem, not a runtime one).
    #[error("the contracts' descriptor set does not decode")]
    Descriptor(#[source] prost::DecodeError),
    /// Loading the workload certificate, key or trust bundle.
    #[error("loading client TLS material")]
    Tls(#[from] tessera_mesh::tls::TlsError),
    /// TCP or TLS connect to one endpoint.
    #[error("connecting to {addr}")]
    Connect {
        /// The endpoint.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The HTTP/2 handshake with one endpoint.
    #[error("HTTP/2 handshake with {addr}")]
    Handshake {
        /// The endpoint.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: BoxError,
    },
    /// The connection failed while carrying a call. `sent` is false when the request provably
    /// never left this process, so any method may be sent again elsewhere.
    #[error("call to {addr} failed on the connection")]
    Transport {
        /// The endpoint.
        addr: SocketAddr,
        /// Whether the request may have reached the server.
        sent: bool,
        /// Why.
        #[source]
        source: BoxError,
    },
    /// The connection failed after a unary response's headers and before its end (unary
    /// responses are read whole before they are handed on). An idempotent call is sent again
    /// elsewhere, as after a failure before the headers.
    #[error("the connection failed while a response was read")]
    ResponseCut {
        /// Why.
        #[source]
        source: BoxError,
    },
    /// No replica of the target could take a call for a whole connect timeout (none resolved,
    /// or none reachable); until one can, calls fail at once instead of waiting.
    #[error("no ready replica of {target}")]
    NoReadyReplica {
        /// The target.
        target: String,
    },
    /// The call's deadline (its own, the default, or the inherited one) passed.
    #[error("deadline exceeded")]
    DeadlineExceeded,
    /// A [`crate::Clients`] accessor for a service that was given no target.
    #[error("no target configured for {0}")]
    NoTarget(&'static str),
}

impl Error {
    /// Whether a call that failed this way may be sent again: if it provably never left, any
    /// method; if the connection failed under it, only an idempotent one.
    pub(crate) fn retryable(&self, idempotent: bool) -> bool {
        match self {
            Self::Transport { sent: false, .. } => true,
            Self::Transport { sent: true, .. } | Self::ResponseCut { .. } => idempotent,
            _ => false,
        }
    }
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        match &error {
            Error::DeadlineExceeded => Status::deadline_exceeded(error.to_string()),
            Error::Connect { .. }
            | Error::Handshake { .. }
            | Error::Transport { .. }
            | Error::ResponseCut { .. }
            | Error::NoReadyReplica { .. } => Status::unavailable(error_chain(&error)),
            Error::NoTarget(_) => Status::failed_precondition(error.to_string()),
            Error::InvalidTarget { .. }
            | Error::InvalidSetting { .. }
            | Error::NoRuntime
            | Error::Descriptor(_)
            | Error::Tls(_) => Status::internal(error_chain(&error)),
        }
    }
}

/// Turns whatever the balanced stack failed with into the boxed `Status` tonic expects (tonic
/// downcasts a boxed `Status` back, so the code survives).
pub(crate) fn into_status(error: BoxError) -> BoxError {
    let status = match error.downcast::<Error>() {
        Ok(error) => Status::from(*error),
        Err(other) => match other.downcast::<Status>() {
            Ok(status) => *status,
            Err(other) => Status::unavailable(error_chain(&*other)),
        },
    };
    Box::new(status)
}
