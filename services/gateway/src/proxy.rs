//! The public port's tower service: admits a request (route, rate limits, token) and forwards
//! it unchanged to the internal service that owns the method.
//!
//! Forwarding is at the HTTP/2 level: headers (`authorization`, `grpc-timeout`,
//! `traceparent`, ...) and the body stream go through as they came, and the response streams
//! back the same way, so server-streaming methods work without the gateway decoding a single
//! message. Rejections are trailers-only gRPC responses (HTTP 200, `grpc-status` in the
//! headers), which every gRPC client understands.
//!
//! Admission, in order, each step cheaper than the next:
//! 1. per-address token bucket: counts every request, before any signature is checked, so a
//!    flood of forged tokens cannot buy CPU;
//! 2. route lookup: a method not marked public is UNIMPLEMENTED;
//! 3. the bearer token, if present, must verify (UNAUTHENTICATED otherwise, even for methods
//!    that do not need one: a client sending a bad token should learn so); methods whose rule
//!    says `user: true` need one;
//! 4. per-user token bucket, keyed by the token's subject.

use std::{
    collections::HashMap,
    convert::Infallible,
    future::Future,
    net::IpAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use tessera_client::Channel;
use tessera_mesh::auth::{EndUser, TokenKeys};
use tonic::{body::Body, transport::server::TcpConnectInfo};
use tower::{Service, ServiceExt};

use crate::{
    GatewayError, RateLimits,
    public::public_methods,
    rate_limit::{Buckets, address_key},
};

/// The client's address, inserted into the request extensions by whoever accepts the
/// connection. When absent, the proxy falls back to tonic's [`TcpConnectInfo`]; with neither,
/// only the per-user limit applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientAddr(pub IpAddr);

struct Route {
    channel: Channel,
    user: bool,
}

struct Inner {
    routes: HashMap<String, Route>,
    keys: TokenKeys,
    per_user: Buckets<String>,
    per_address: Buckets<IpAddr>,
}

/// `Service<http::Request<tonic::body::Body>>` serving the public methods. Cheap to clone.
#[derive(Clone)]
pub struct PublicProxy {
    inner: Arc<Inner>,
}

impl PublicProxy {
    /// `routes` maps gRPC paths (`/tessera.posts.v1.PostService/CreatePost`) to the channel
    /// of the service that owns them. Every path must be a method the contracts mark public
    /// (else [`GatewayError::NotPublic`]); whether it needs a token comes from the same rule.
    pub fn new(
        routes: HashMap<String, Channel>,
        keys: TokenKeys,
        limits: RateLimits,
    ) -> Result<Self, GatewayError> {
        let public: HashMap<String, bool> = public_methods()?
            .into_iter()
            .map(|m| (m.path, m.user))
            .collect();
        let mut table = HashMap::with_capacity(routes.len());
        for (path, channel) in routes {
            let Some(&user) = public.get(&path) else {
                return Err(GatewayError::NotPublic(path));
            };
            table.insert(path, Route { channel, user });
        }
        Ok(Self {
            inner: Arc::new(Inner {
                routes: table,
                keys,
                per_user: Buckets::new(limits.per_user, limits.max_tracked),
                per_address: Buckets::new(limits.per_address, limits.max_tracked),
            }),
        })
    }

    /// The paths this proxy serves.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.inner.routes.keys().map(String::as_str)
    }
}

impl Inner {
    /// Decides whether the request may pass; returns the channel to send it to.
    async fn admit(&self, req: &mut http::Request<Body>) -> Result<Channel, GatewayError> {
        if let Some(ip) = client_ip(req)
            && !self.per_address.try_acquire(&address_key(ip))
        {
            return Err(GatewayError::RateLimited("address"));
        }
        let path = req.uri().path();
        let route = self
            .routes
            .get(path)
            .ok_or_else(|| GatewayError::UnknownMethod(path.to_owned()))?;

        let token = bearer_token(req.headers())?;
        match token {
            Some(token) => {
                let claims = self.keys.verify(&token).await?;
                if !self.per_user.try_acquire(&claims.sub) {
                    return Err(GatewayError::RateLimited("user"));
                }
                // Handlers served in-process (FeedService) read the verified user from here;
                // over the network the downstream service verifies the header again.
                req.extensions_mut().insert(EndUser {
                    claims,
                    token: token.into(),
                });
            }
            None if route.user => return Err(GatewayError::TokenRequired),
            None => {}
        }
        Ok(route.channel.clone())
    }
}

/// The bearer token of the `authorization` header, if there is one.
fn bearer_token(headers: &http::HeaderMap) -> Result<Option<String>, GatewayError> {
    let Some(value) = headers.get(http::header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .map_err(|_| GatewayError::BadAuthorizationHeader)?;
    let (scheme, token) = value
        .split_once(' ')
        .ok_or(GatewayError::BadAuthorizationHeader)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(GatewayError::BadAuthorizationHeader);
    }
    Ok(Some(token.to_owned()))
}

fn client_ip<B>(req: &http::Request<B>) -> Option<IpAddr> {
    let ext = req.extensions();
    ext.get::<ClientAddr>().map(|a| a.0).or_else(|| {
        ext.get::<TcpConnectInfo>()
            .and_then(TcpConnectInfo::remote_addr)
            .map(|a| a.ip())
    })
}

impl Service<http::Request<Body>> for PublicProxy {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Readiness is the downstream channel's business, checked per call in `oneshot`.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move {
            let result = match inner.admit(&mut req).await {
                Ok(channel) => channel
                    .oneshot(req)
                    .await
                    .map_err(GatewayError::Unavailable),
                Err(e) => Err(e),
            };
            Ok(result.unwrap_or_else(|e| {
                tracing::debug!(error = %e, "public request rejected");
                tonic::Status::from(e).into_http()
            }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer_headers() {
        let mut h = http::HeaderMap::new();
        assert!(matches!(bearer_token(&h), Ok(None)));
        h.insert(
            "authorization",
            http::HeaderValue::from_static("Bearer abc"),
        );
        assert!(matches!(bearer_token(&h), Ok(Some(t)) if t == "abc"));
        h.insert(
            "authorization",
            http::HeaderValue::from_static("bearer  abc "),
        );
        assert!(matches!(bearer_token(&h), Ok(Some(t)) if t == "abc"));
        for bad in ["Basic abc", "Bearer", "Bearer ", "abc"] {
            h.insert("authorization", http::HeaderValue::from_static(bad));
            assert!(
                matches!(bearer_token(&h), Err(GatewayError::BadAuthorizationHeader)),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn routes_must_be_public() {
        let mut routes = HashMap::new();
        routes.insert(
            "/tessera.posts.v1.PostService/WatchEvents".to_owned(),
            Channel::from_service(tower::service_fn(|_req: http::Request<Body>| async {
                Ok::<_, Infallible>(http::Response::new(Body::default()))
            })),
        );
        let err = PublicProxy::new(
            routes,
            TokenKeys::fixed(tessera_mesh::token::Verifier::new()),
            RateLimits::default(),
        )
        .err();
        assert!(matches!(err, Some(GatewayError::NotPublic(p)) if p.ends_with("WatchEvents")));
    }
}
