//! Tessera's public edge: the one service reachable from outside the cluster.
//!
//! It holds two things. [`Feed`] implements `tessera.gateway.v1.FeedService`, views composed
//! from several internal services with a bounded number of downstream calls. [`PublicProxy`]
//! is the tower service behind the public port: it forwards the methods the contracts mark
//! `public` to the internal services unchanged (streams included), after checking the
//! end user's token and per-user and per-address rate limits. [`HttpJson`] is the front of the
//! public port for everything that is not native gRPC: HTTP/JSON transcoded from the contracts'
//! `google.api.http` options, gRPC-Web, CORS, `/openapi.json` and the web front end, each call
//! turned into a gRPC call through the same public request path.
//!
//! Not for: TLS, listeners, reflection or the internal mTLS port (`tessera-mesh` and the
//! binary wire those up), nor any business rule of the services behind it — the services
//! verify tokens and enforce their own rules again, so the gateway is a first line, not the
//! only one.
//!
//! # Wiring it
//!
//! ```no_run
//! # fn f(
//! #     channel_for: impl Fn(&str) -> tessera_client::Channel,
//! #     keys: tessera_mesh::auth::TokenKeys,
//! # ) -> Result<(), tessera_gateway::GatewayError> {
//! use std::collections::HashMap;
//!
//! use tessera::{
//!     comments::v1::comment_service_client::CommentServiceClient,
//!     gateway::v1::feed_service_server::FeedServiceServer,
//!     posts::v1::post_service_client::PostServiceClient,
//!     users::v1::user_service_client::UserServiceClient,
//! };
//! use tessera_client::Channel;
//! use tessera_gateway::{Feed, PublicProxy, RateLimits, public_methods};
//!
//! let feed = Feed::new(
//!     PostServiceClient::new(channel_for("posts")),
//!     CommentServiceClient::new(channel_for("comments")),
//!     UserServiceClient::new(channel_for("users")),
//! );
//! // FeedService itself is served in-process behind the proxy, so it gets the same token
//! // checks and rate limits as everything else on the public port.
//! let feed = Channel::from_service(FeedServiceServer::new(feed));
//! let mut routes = HashMap::new();
//! for m in public_methods()? {
//!     // "tessera.posts.v1" -> "posts"
//!     let channel = match m.package.split('.').nth(1) {
//!         Some("gateway") => feed.clone(),
//!         Some(service) => channel_for(service),
//!         None => continue,
//!     };
//!     routes.insert(m.path, channel);
//! }
//! let proxy = PublicProxy::new(routes, keys, RateLimits::default())?;
//! // Serve `proxy` (a tower Service<http::Request<tonic::body::Body>>) on the public port,
//! // inserting `ClientAddr(peer_ip)` into each request's extensions.
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]

mod error;
pub mod feed;
pub mod http_json;
pub mod proxy;
pub mod public;
pub mod rate_limit;

pub use error::GatewayError;
pub use feed::Feed;
pub use http_json::{Edge, HttpJson};
pub use proxy::{ClientAddr, PublicProxy};
pub use public::{PublicMethod, public_methods, public_methods_in};
pub use rate_limit::{Quota, RateLimits};
