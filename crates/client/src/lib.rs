//! Typed clients for Tessera's services.
//!
//! Not for: serving (that is `tessera-mesh`).

#![forbid(unsafe_code)]

use std::task::{Context, Poll};

use tonic::body::Body;
use tower::{BoxError, Service, util::BoxCloneSyncService};

/// A cloneable channel to one target. Every typed client in Tessera runs over this type, so
/// services and tests can hand each other clients whatever stands behind them (a balanced
/// mTLS pool in production, an in-process service in unit tests).
#[derive(Clone)]
pub struct Channel {
    inner: BoxCloneSyncService<http::Request<Body>, http::Response<Body>, BoxError>,
}

impl Channel {
    /// Wraps any HTTP/2 gRPC service.
    pub fn from_service<S>(service: S) -> Self
    where
        S: Service<http::Request<Body>, Response = http::Response<Body>>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        Self {
            inner: BoxCloneSyncService::new(tower::ServiceExt::map_err(service, Into::into)),
        }
    }
}

impl Service<http::Request<Body>> for Channel {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = <BoxCloneSyncService<http::Request<Body>, http::Response<Body>, BoxError> as Service<http::Request<Body>>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        self.inner.call(req)
    }
}
