//! The whole public port, composed in one place: `tessera serve gateway`, `tessera up` and
//! the tests all serve what [`public_service`] builds.
//!
//! Every public method, FeedService included, goes through [`PublicProxy`]: rate limits per
//! address and per user, the token verified when present, the request read under the edge's
//! size limit, unary responses read whole and streams bounded. FeedService is served
//! in-process behind the proxy; its fan-out calls carry the reader's token. Health and
//! reflection (listing only what is public) are answered beside the proxy, without rate
//! limits, as they touch no upstream.
//!
//! Server-streaming methods get upstream channels of their own, so long-lived streams
//! (SubscribeNotifications) never take the stream slots or flow-control window of the
//! connections every unary call shares.

use std::{
    collections::HashMap,
    convert::Infallible,
    task::{Context, Poll},
};

use tessera::{
    comments::v1::comment_service_client::CommentServiceClient,
    gateway::v1::feed_service_server::FeedServiceServer,
    posts::v1::post_service_client::PostServiceClient,
    users::v1::user_service_client::UserServiceClient,
};
use tessera_client::Channel;
use tessera_mesh::{
    auth::TokenKeys, reflection::with_health_and_public_reflection, server::GrpcService,
};
use tonic::{body::Body, service::Routes};
use tower::{Service, util::BoxCloneSyncService};

use crate::{Cache, Error, Feed, PublicProxy, RateLimits, proxy::SizeLimits, public_methods};

/// The gRPC service every public method of the gateway itself belongs to.
pub const FEED_SERVICE: &str = "tessera.gateway.v1.FeedService";

/// The channels to the internal services, by workload name (`posts`).
#[derive(Clone, Default)]
pub struct Upstreams {
    unary: HashMap<String, Channel>,
    streaming: HashMap<String, Channel>,
}

impl Upstreams {
    /// An empty set; [`Upstreams::insert`] adds each workload.
    pub fn new() -> Self {
        Self::default()
    }

    /// `unary` carries every call with a single response; `streaming` the server-streaming
    /// ones. Give them separate connections (two channels built from the same target) so a
    /// flood of open streams cannot starve unary calls.
    pub fn insert(&mut self, workload: &str, unary: Channel, streaming: Channel) {
        self.unary.insert(workload.to_owned(), unary);
        self.streaming.insert(workload.to_owned(), streaming);
    }

    fn get(&self, workload: &str, streaming: bool) -> Option<Channel> {
        let table = if streaming {
            &self.streaming
        } else {
            &self.unary
        };
        table.get(workload).cloned()
    }
}

/// What the public port allows one call.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EdgeLimits {
    /// Calls per end user and per client address.
    pub rates: RateLimits,
    /// Bytes held for one call, one stream and one address.
    pub sizes: SizeLimits,
}

/// The gateway's public port: every public method of the contracts whose owner is among
/// `upstreams` (FeedService when posts, comments and users are), plus health and
/// reflection. Serve it behind `tessera_mesh`'s public request path
/// ([`tessera_mesh::server::Workload::run`] does), which adds telemetry, the deadline cap,
/// load shedding and the connection limits.
pub fn public_service(
    upstreams: &Upstreams,
    keys: TokenKeys,
    limits: EdgeLimits,
) -> Result<GrpcService, Error> {
    build(upstreams, keys, limits, None)
}

/// [`public_service`] with FeedService reading through `cache`, and the writes that change
/// what it holds dropping their keys from it (see [`crate::cache`]). Run its followers
/// ([`crate::cache::follow_post_events`], [`crate::cache::follow_user_events`]) beside it.
pub fn public_service_cached(
    upstreams: &Upstreams,
    keys: TokenKeys,
    limits: EdgeLimits,
    cache: &Cache,
) -> Result<GrpcService, Error> {
    build(upstreams, keys, limits, Some(cache))
}

fn build(
    upstreams: &Upstreams,
    keys: TokenKeys,
    limits: EdgeLimits,
    cache: Option<&Cache>,
) -> Result<GrpcService, Error> {
    let feed = match (
        upstreams.get("posts", false),
        upstreams.get("comments", false),
        upstreams.get("users", false),
    ) {
        (Some(posts), Some(comments), Some(users)) => {
            let feed = Feed::new(
                PostServiceClient::new(posts),
                CommentServiceClient::new(comments),
                UserServiceClient::new(users),
            );
            let feed = match cache {
                Some(cache) => feed.with_cache(cache.clone()),
                None => feed,
            };
            Some(Channel::from_service(
                FeedServiceServer::new(feed).max_decoding_message_size(limits.sizes.max_request),
            ))
        }
        _ => None,
    };
    let mut routes = HashMap::new();
    let mut advertised: Vec<String> = Vec::new();
    for method in public_methods()? {
        // `tessera.posts.v1.PostService` is owned by the `posts` workload.
        let channel = match method.package.split('.').nth(1) {
            Some("gateway") => feed.clone(),
            Some(workload) => upstreams.get(workload, method.server_streaming),
            None => None,
        };
        let Some(channel) = channel else { continue };
        let channel = match cache {
            Some(cache) => crate::cache::invalidating(&method.path, channel, cache),
            None => channel,
        };
        if !advertised.contains(&method.service) {
            advertised.push(method.service.clone());
        }
        routes.insert(method.path, channel);
    }
    let proxy = PublicProxy::with_sizes(routes, keys, limits.rates, limits.sizes)?;
    let health = tonic_health::server::HealthReporter::new();
    let local =
        with_health_and_public_reflection(Routes::default(), &health, &advertised).prepare();
    Ok(BoxCloneSyncService::new(Split { local, proxy }))
}

/// Health and reflection answered here; everything else (unknown paths too, so they count
/// against the caller's rate limit) through the proxy.
#[derive(Clone)]
struct Split {
    local: Routes,
    proxy: PublicProxy,
}

fn is_local(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.Health/")
        || path.starts_with("/grpc.reflection.v1.ServerReflection/")
        || path.starts_with("/grpc.reflection.v1alpha.ServerReflection/")
}

impl Service<http::Request<Body>> for Split {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = futures::future::Either<
        <Routes as Service<http::Request<Body>>>::Future,
        <PublicProxy as Service<http::Request<Body>>>::Future,
    >;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Both are always ready (tonic's router and the proxy decide per call).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        if is_local(req.uri().path()) {
            futures::future::Either::Left(self.local.call(req))
        } else {
            futures::future::Either::Right(self.proxy.call(req))
        }
    }
}
