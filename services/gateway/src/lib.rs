//! Tessera's public edge: the one service reachable from outside the cluster.
//!
//! [`public_service`] builds the whole public port from the upstream channels, the token
//! keys and the limits; `tessera serve gateway`, `tessera up` and the tests serve exactly
//! that. Inside it:
//! - [`PublicProxy`] admits every public method, FeedService included (per-address and
//!   per-user rate limits, the end user's token verified whenever one is present and
//!   required where the contract says so), reads the request under the edge's own size
//!   limit, and forwards it unchanged to the internal service that owns the method; unary
//!   responses are read whole before they go out and streams are bounded, so a client that
//!   does not read holds no upstream connection;
//! - [`Feed`] implements `tessera.gateway.v1.FeedService`, views composed from several
//!   internal services with a bounded number of downstream calls; it runs in-process behind
//!   the proxy, and its downstream calls carry the reader's token;
//! - health and reflection, which lists only the public methods.
//!
//! [`HttpJson`] is the front of the public port for everything that is not native gRPC:
//! HTTP/JSON transcoded from the contracts' `google.api.http` options, gRPC-Web, CORS,
//! `/openapi.json` and the web front end, each call turned into a gRPC call through the same
//! public request path.
//!
//! Not for: TLS, listeners, connection limits or the internal mTLS port (`tessera-mesh`
//! serves what this crate builds, see `tessera_mesh::edge`), nor any business rule of the
//! services behind it — the services verify tokens and enforce their own rules again, so the
//! gateway is a first line, not the only one.
//!
//! # Wiring it
//!
//! ```no_run
//! # fn f(
//! #     channel_for: impl Fn(&str) -> tessera_client::Channel,
//! #     keys: tessera_mesh::auth::TokenKeys,
//! # ) -> Result<(), tessera_gateway::Error> {
//! use tessera_gateway::{EdgeLimits, Upstreams, public_service};
//!
//! let mut upstreams = Upstreams::new();
//! for workload in ["users", "posts", "comments", "notifications"] {
//!     // Two channels to the same target: streams get connections of their own.
//!     upstreams.insert(workload, channel_for(workload), channel_for(workload));
//! }
//! let public = public_service(&upstreams, keys, EdgeLimits::default())?;
//! // Hand `public` to `tessera_mesh::server::Workload::run`, which serves it on the public
//! // port behind the public request path and connection limits.
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]

pub mod cache;
pub mod edge;
mod error;
pub mod http_json;
pub mod proxy;
pub mod public;
pub mod rate_limit;
pub mod service;
mod unread;

pub use cache::{Cache, CacheLimits};
pub use edge::{EdgeLimits, Upstreams, public_service, public_service_cached};
pub use error::Error;
pub use http_json::{Edge, HttpJson};
pub use proxy::{ClientAddr, PublicProxy, SizeLimits};
pub use public::{PublicMethod, public_methods, public_methods_in};
pub use rate_limit::{Quota, RateLimits};
pub use service::Feed;
