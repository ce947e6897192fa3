//! Typed clients for Tessera's services, over channels that make a workload a good mesh
//! citizen without code in its handlers: they present the workload certificate (mTLS) and
//! accept only the SPIFFE id of the service they dial ([`ClientBuilder::channel_to`]), find
//! the replicas of a target (`static:` lists, `dns:` names re-resolved for Kubernetes headless
//! Services), balance calls with power of two choices over peak-EWMA latency, carry the
//! remaining deadline, the end user's token and the trace context of the call being handled,
//! and retry idempotent methods on UNAVAILABLE or a lost connection under a retry budget. A
//! unary response is read to its end before it is handed on, within the call's deadline: a
//! replica silent after the headers fails the call at the deadline, and an idempotent call
//! whose replica dies in the middle of a response is retried around.
//!
//! Errors reach callers as `tonic::Status`: UNAVAILABLE when no replica could be reached
//! (after a connect timeout of waiting, then at once until one is back), DEADLINE_EXCEEDED
//! when the call's deadline passed, FAILED_PRECONDITION from a [`Clients`] accessor for a
//! service that was given no target.
//!
//! Not for: serving (that is `tessera-mesh`), or calls to anything but Tessera services
//! (retry rules come from Tessera's contracts).
//!
//! An internal service calling PostService:
//!
//! ```no_run
//! use std::time::Duration;
//! use tessera::posts::v1::GetPostRequest;
//! use tessera_client::{ClientBuilder, Targets};
//! use tessera_mesh::tls::TlsFiles;
//!
//! # async fn handler() -> Result<(), Box<dyn std::error::Error>> {
//! let files = TlsFiles::in_dir("/var/run/secrets/tessera".as_ref());
//! let clients = ClientBuilder::mtls_files(files, Duration::from_secs(30))?.clients(&Targets {
//!     posts: Some("dns:posts.tessera.svc.cluster.local:8443".into()),
//!     ..Targets::default()
//! })?;
//! // Inside a handler, the call inherits the incoming deadline, token and trace.
//! let request = GetPostRequest { post_id: "p-1".into() };
//! let post = clients.posts().get_post(request).await?.into_inner();
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]

mod builder;
mod call;
mod clients;
mod discover;
mod endpoint;
mod error;
mod load;
mod methods;
mod propagate;
pub mod roles;
mod target;

use std::task::{Context, Poll};

use tonic::{Status, body::Body};
use tower::{BoxError, Service, util::BoxCloneSyncService};

pub use builder::{ClientBuilder, RetryBudget};
pub use clients::{Clients, Targets};
pub use error::Error;
pub use target::{Resolve, ResolveFuture};

/// A cloneable channel to one target. Every typed client in Tessera runs over this type, so
/// services and tests can hand each other clients whatever stands behind them (a balanced
/// mTLS pool in production, an in-process service in unit tests).
#[derive(Clone)]
pub struct Channel {
    inner: Inner,
}

#[derive(Clone)]
enum Inner {
    Service(BoxCloneSyncService<http::Request<Body>, http::Response<Body>, BoxError>),
    Balanced(call::Balanced),
    Failing(Status),
}

impl Channel {
    /// Wraps any HTTP/2 gRPC service: an in-process server in tests, so a typed client calls
    /// it without sockets or certificates.
    ///
    /// ```
    /// use tessera::posts::v1::{
    ///     GetPostRequest, GetPostResponse, Post, post_service_client::PostServiceClient,
    ///     post_service_server::PostServiceServer,
    /// };
    /// use tessera_client::Channel;
    /// # use tessera::posts::v1::{post_service_server::PostService, *};
    /// # use tonic::{Request, Response, Status};
    /// # struct OnePost;
    /// # #[tonic::async_trait]
    /// # impl PostService for OnePost {
    /// #     async fn get_post(&self, r: Request<GetPostRequest>) -> Result<Response<GetPostResponse>, Status> {
    /// #         let post_id = r.into_inner().post_id;
    /// #         Ok(Response::new(GetPostResponse { post: Some(Post { post_id, ..Default::default() }) }))
    /// #     }
    /// #     async fn create_post(&self, _: Request<CreatePostRequest>) -> Result<Response<CreatePostResponse>, Status> { Err(Status::unimplemented("")) }
    /// #     async fn list_posts(&self, _: Request<ListPostsRequest>) -> Result<Response<ListPostsResponse>, Status> { Err(Status::unimplemented("")) }
    /// #     async fn update_post(&self, _: Request<UpdatePostRequest>) -> Result<Response<UpdatePostResponse>, Status> { Err(Status::unimplemented("")) }
    /// #     async fn delete_post(&self, _: Request<DeletePostRequest>) -> Result<Response<DeletePostResponse>, Status> { Err(Status::unimplemented("")) }
    /// #     type WatchEventsStream = futures::stream::Empty<Result<WatchEventsResponse, Status>>;
    /// #     async fn watch_events(&self, _: Request<WatchEventsRequest>) -> Result<Response<Self::WatchEventsStream>, Status> { Err(Status::unimplemented("")) }
    /// # }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// // `OnePost` implements the generated PostService trait.
    /// let channel = Channel::from_service(PostServiceServer::new(OnePost));
    /// let mut posts = PostServiceClient::new(channel);
    /// let request = GetPostRequest { post_id: "p-1".into() };
    /// let post = posts.get_post(request).await.unwrap().into_inner().post.unwrap();
    /// assert_eq!(post.post_id, "p-1");
    /// # }
    /// ```
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
            inner: Inner::Service(BoxCloneSyncService::new(tower::ServiceExt::map_err(
                service,
                Into::into,
            ))),
        }
    }

    fn balanced(balanced: call::Balanced) -> Self {
        Self {
            inner: Inner::Balanced(balanced),
        }
    }

    /// Connects to the target's replicas now rather than on the first call, and waits up to
    /// `within` for one to be ready; true if one is. For start-up (readiness), so the first
    /// calls do not pay for the handshakes; calls work either way.
    pub async fn warm_up(&self, within: std::time::Duration) -> bool {
        match &self.inner {
            Inner::Balanced(balanced) => balanced.warm_up(within).await,
            Inner::Service(_) => true,
            Inner::Failing(_) => false,
        }
    }

    /// A channel that answers every call with `error`.
    fn failing(error: Error) -> Self {
        Self {
            inner: Inner::Failing(error.into()),
        }
    }
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.inner {
            Inner::Service(_) => "service",
            Inner::Balanced(_) => "balanced",
            Inner::Failing(_) => "failing",
        };
        f.debug_tuple("Channel").field(&kind).finish()
    }
}

impl Service<http::Request<Body>> for Channel {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future =
        <BoxCloneSyncService<http::Request<Body>, http::Response<Body>, BoxError> as Service<
            http::Request<Body>,
        >>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        match &mut self.inner {
            Inner::Service(service) => service.poll_ready(cx),
            // Readiness is settled per call: waiting for a replica is part of the call, under
            // its deadline.
            Inner::Balanced(_) | Inner::Failing(_) => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        match &mut self.inner {
            Inner::Service(service) => service.call(request),
            Inner::Balanced(balanced) => balanced.call(request),
            Inner::Failing(status) => Box::pin(std::future::ready(Err(
                Box::new(status.clone()) as BoxError
            ))),
        }
    }
}
