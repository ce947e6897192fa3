//! The public port's tower service: admits a request (route, rate limits, token) and forwards
//! it unchanged to the internal service that owns the method.
//!
//! Forwarding is at the HTTP/2 level: headers (`authorization`, `grpc-timeout`,
//! `traceparent`, ...) go through as they came, and no message is decoded. Rejections are
//! trailers-only gRPC responses (HTTP 200, `grpc-status` in the headers), which every gRPC
//! client understands; a downstream status comes back with its own code, and UNAVAILABLE
//! means no upstream could be reached.
//!
//! What a client does with its connection must not charge the connections the gateway
//! shares with every other caller, so the proxy holds data itself rather than leaving it
//! in an upstream flow-control window:
//! - the request message is read whole, under the edge's own size limit, before anything
//!   goes upstream (RESOURCE_EXHAUSTED past it, without troubling the service);
//! - a unary response is read whole (under a size limit) before it goes back out, so a
//!   client that never reads holds gateway memory, bounded by its stream and connection
//!   limits, and not an upstream stream;
//! - a streamed response is pumped from upstream into a small per-stream buffer; a client
//!   that lets it fill is cut off with RESOURCE_EXHAUSTED and the upstream stream is reset;
//! - what is held unread is also counted per client address, over all its connections and
//!   streams (see `unread`), so spreading a never-reading client over many streams does not
//!   multiply the memory it can pin.
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

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use bytes::{Buf, Bytes, BytesMut};
use http_body::Frame;
use http_body_util::BodyExt;
use tessera_client::Channel;
use tessera_mesh::{
    auth::{EndUser, TokenKeys},
    context,
};
use tonic::{Status, body::Body, transport::server::TcpConnectInfo};
use tower::{BoxError, Service, ServiceExt};

use crate::{
    Error, RateLimits,
    public::public_methods,
    rate_limit::{Buckets, address_key},
    unread::{Charge, Ledger},
};

/// The client's address, inserted into the request extensions by whoever accepts the
/// connection. When absent, the proxy falls back to the mesh server's
/// [`tessera_mesh::stack::PeerInfo`], then tonic's [`TcpConnectInfo`]; with none, only the
/// per-user limit applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientAddr(pub IpAddr);

/// How much the proxy holds for one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SizeLimits {
    /// The largest request message forwarded (the edge's own limit, checked before any
    /// upstream sees the call).
    pub max_request: usize,
    /// The largest unary response (all its messages) read back before it goes out.
    pub max_response: usize,
    /// Unread bytes held for one streamed response before its client is cut off.
    pub stream_buffer: usize,
    /// Unread response bytes (unary and streamed) held for one client address at once, over
    /// all its connections and streams.
    pub unread_per_address: usize,
}

impl Default for SizeLimits {
    fn default() -> Self {
        Self {
            max_request: 4 * 1024 * 1024,
            max_response: 4 * 1024 * 1024,
            stream_buffer: 256 * 1024,
            unread_per_address: 32 * 1024 * 1024,
        }
    }
}

struct Route {
    channel: Channel,
    user: bool,
    client_streaming: bool,
    server_streaming: bool,
}

struct Inner {
    routes: HashMap<String, Route>,
    keys: TokenKeys,
    per_user: Buckets<String>,
    per_address: Buckets<IpAddr>,
    sizes: SizeLimits,
    unread: Arc<Ledger>,
}

/// `Service<http::Request<tonic::body::Body>>` serving the public methods. Cheap to clone.
#[derive(Clone)]
pub struct PublicProxy {
    inner: Arc<Inner>,
}

impl PublicProxy {
    /// `routes` maps gRPC paths (`/tessera.posts.v1.PostService/CreatePost`) to the channel
    /// of the service that owns them. Every path must be a method the contracts mark public
    /// (else [`Error::NotPublic`]); whether it needs a token comes from the same rule.
    pub fn new(
        routes: HashMap<String, Channel>,
        keys: TokenKeys,
        limits: RateLimits,
    ) -> Result<Self, Error> {
        Self::with_sizes(routes, keys, limits, SizeLimits::default())
    }

    /// [`PublicProxy::new`] with explicit message and buffer sizes.
    pub fn with_sizes(
        routes: HashMap<String, Channel>,
        keys: TokenKeys,
        limits: RateLimits,
        sizes: SizeLimits,
    ) -> Result<Self, Error> {
        let public: HashMap<String, _> = public_methods()?
            .into_iter()
            .map(|m| (m.path.clone(), m))
            .collect();
        let mut table = HashMap::with_capacity(routes.len());
        for (path, channel) in routes {
            let Some(method) = public.get(&path) else {
                return Err(Error::NotPublic(path));
            };
            table.insert(
                path,
                Route {
                    channel,
                    user: method.user,
                    client_streaming: method.client_streaming,
                    server_streaming: method.server_streaming,
                },
            );
        }
        Ok(Self {
            inner: Arc::new(Inner {
                routes: table,
                keys,
                per_user: Buckets::new(limits.per_user, limits.max_tracked),
                per_address: Buckets::new(limits.per_address, limits.max_tracked),
                sizes,
                unread: Ledger::new(sizes.unread_per_address),
            }),
        })
    }
}

impl Inner {
    /// Decides whether the request may pass; returns its route and the verified token.
    async fn admit(
        &self,
        req: &mut http::Request<Body>,
    ) -> Result<(&Route, Option<Arc<str>>), Error> {
        if let Some(ip) = client_ip(req)
            && !self.per_address.try_acquire(&address_key(ip))
        {
            return Err(Error::RateLimited("address"));
        }
        let path = req.uri().path();
        let route = self
            .routes
            .get(path)
            .ok_or_else(|| Error::UnknownMethod(path.to_owned()))?;

        let token = bearer_token(req.headers())?;
        match token {
            Some(token) => {
                let claims = self.keys.verify(&token).await?;
                if !self.per_user.try_acquire(&claims.sub) {
                    return Err(Error::RateLimited("user"));
                }
                // Handlers served in-process (FeedService) read the verified user from here;
                // over the network the downstream service verifies the header again.
                let token: Arc<str> = token.into();
                req.extensions_mut().insert(EndUser {
                    claims,
                    token: token.clone(),
                });
                Ok((route, Some(token)))
            }
            None if route.user => Err(Error::TokenRequired),
            None => Ok((route, None)),
        }
    }

    /// Sends an admitted call upstream and brings its answer back, holding no more of it
    /// in an upstream connection than the upstream sends at once.
    async fn forward(
        &self,
        route: &Route,
        req: http::Request<Body>,
        token: Option<Arc<str>>,
    ) -> Result<http::Response<Body>, Error> {
        let ip = client_ip(&req);
        let req = if route.client_streaming {
            req
        } else {
            one_message(req, self.sizes.max_request).await?
        };
        // Downstream calls made in-process (FeedService's fan-out) carry the reader's token
        // and the call's deadline from here.
        let mut ctx = context::current().unwrap_or_default();
        if token.is_some() {
            ctx.token = token;
        }
        let resp = context::scope(ctx, route.channel.clone().oneshot(req))
            .await
            .map_err(upstream_error)?;
        let unread = self.unread.clone();
        let charge = move |n| unread.charge(ip, n);
        if route.server_streaming {
            Ok(pumped(resp, self.sizes.stream_buffer, charge))
        } else {
            whole(resp, self.sizes.max_response, charge).await
        }
    }
}

/// A channel's failure: a `Status` it chose (deadline, no ready replica, ...) keeps its code;
/// anything else means the call could not be carried.
fn upstream_error(err: BoxError) -> Error {
    match err.downcast::<Status>() {
        Ok(status) => Error::Status(*status),
        Err(other) => Error::Unavailable(other),
    }
}

/// The request with exactly its first message as the body, read under `limit`.
async fn one_message(req: http::Request<Body>, limit: usize) -> Result<http::Request<Body>, Error> {
    let (parts, mut body) = req.into_parts();
    let mut buf = BytesMut::new();
    let mut need = None;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            break;
        };
        buf.extend_from_slice(&data);
        if need.is_none() && buf.len() >= 5 {
            let len = (&buf[1..5]).get_u32() as usize;
            if len > limit {
                return Err(Status::resource_exhausted(format!(
                    "message of {len} bytes exceeds the limit of {limit} bytes"
                ))
                .into());
            }
            need = Some(5 + len);
        }
        if need.is_some_and(|n| buf.len() >= n) {
            break;
        }
    }
    if let Some(n) = need {
        buf.truncate(n);
    }
    Ok(http::Request::from_parts(
        parts,
        Body::new(http_body_util::Full::new(buf.freeze())),
    ))
}

/// A unary response read whole, so the upstream stream is done before the client reads.
async fn whole(
    resp: http::Response<Body>,
    limit: usize,
    charge: impl Fn(usize) -> Option<Charge>,
) -> Result<http::Response<Body>, Error> {
    if resp.headers().contains_key("grpc-status") {
        // Trailers-only: nothing follows.
        return Ok(resp);
    }
    let (parts, mut body) = resp.into_parts();
    let mut data = BytesMut::new();
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        match frame?.into_data() {
            Ok(chunk) => {
                if data.len().saturating_add(chunk.len()) > limit {
                    return Err(Status::resource_exhausted(format!(
                        "the response exceeds the gateway's limit of {limit} bytes"
                    ))
                    .into());
                }
                data.extend_from_slice(&chunk);
            }
            Err(frame) => trailers = frame.into_trailers().ok(),
        }
    }
    let Some(charge) = charge(data.len()) else {
        return Err(unread_exhausted());
    };
    Ok(http::Response::from_parts(
        parts,
        Body::new(Replay {
            data: Some((data.freeze(), charge)).filter(|(d, _)| !d.is_empty()),
            trailers,
        }),
    ))
}

fn unread_exhausted() -> Error {
    Status::resource_exhausted("too many unread responses for this client address; read them first")
        .into()
}

/// A response already read: its data, then its trailers.
struct Replay {
    /// The data, charged to the client's address until the server takes it to send.
    data: Option<(Bytes, Charge)>,
    trailers: Option<http::HeaderMap>,
}

impl http_body::Body for Replay {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        if let Some((data, _charge)) = this.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }
}

/// What the pump of one streamed response shares with the body the client reads.
struct Pumped {
    /// Bytes pumped and not yet read by the client.
    unread: AtomicUsize,
    /// The client let `unread` pass the buffer: the stream is over for it.
    overflowed: AtomicBool,
}

/// A streamed response whose upstream is read by a task of its own into a buffer of at most
/// `limit` unread bytes: a client that stops reading is cut off (RESOURCE_EXHAUSTED) and the
/// upstream stream dropped, instead of its data waiting in the upstream connection's window.
fn pumped(
    resp: http::Response<Body>,
    limit: usize,
    charge: impl Fn(usize) -> Option<Charge> + Send + 'static,
) -> http::Response<Body> {
    if resp.headers().contains_key("grpc-status") {
        return resp;
    }
    let (parts, mut upstream) = resp.into_parts();
    // Frames are also counted: many empty ones must not queue without bound either.
    let (tx, rx) = tokio::sync::mpsc::channel::<(Result<Frame<Bytes>, Status>, Charge)>(64);
    let shared = Arc::new(Pumped {
        unread: AtomicUsize::new(0),
        overflowed: AtomicBool::new(false),
    });
    let pump = shared.clone();
    tokio::spawn(async move {
        loop {
            let frame = tokio::select! {
                frame = upstream.frame() => frame,
                () = tx.closed() => return,
            };
            let Some(frame) = frame else { return };
            let len = frame
                .as_ref()
                .ok()
                .and_then(Frame::data_ref)
                .map_or(0, Bytes::len);
            let unread = pump.unread.fetch_add(len, Ordering::AcqRel) + len;
            let charged = charge(len);
            let sent = match charged {
                Some(charged) if unread <= limit => tx.try_send((frame, charged)).is_ok(),
                _ => false,
            };
            if !sent {
                pump.overflowed.store(true, Ordering::Release);
                // Wake the reader, if it is waiting, to end the stream.
                drop(tx);
                tracing::debug!("a public stream's client is not reading; cut off");
                return;
            }
        }
    });
    http::Response::from_parts(
        parts,
        Body::new(PumpedBody {
            rx,
            shared,
            done: false,
        }),
    )
}

struct PumpedBody {
    rx: tokio::sync::mpsc::Receiver<(Result<Frame<Bytes>, Status>, Charge)>,
    shared: Arc<Pumped>,
    done: bool,
}

impl http_body::Body for PumpedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        if this.shared.overflowed.load(Ordering::Acquire) {
            this.done = true;
            let status =
                Status::resource_exhausted("the stream was not read fast enough; subscribe again");
            let mut trailers = http::HeaderMap::new();
            if status.add_header(&mut trailers).is_err() {
                return Poll::Ready(Some(Err(status)));
            }
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        match this.rx.poll_recv(cx) {
            Poll::Ready(Some((frame, _charge))) => {
                if let Some(data) = frame.as_ref().ok().and_then(Frame::data_ref) {
                    this.shared.unread.fetch_sub(data.len(), Ordering::AcqRel);
                }
                Poll::Ready(Some(frame))
            }
            Poll::Ready(None) if this.shared.overflowed.load(Ordering::Acquire) => {
                // Overflowed while we waited: answer that on the next poll.
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Poll::Ready(None) => {
                this.done = true;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// The bearer token of the `authorization` header, if there is one (parsed as the mesh does,
/// answered with the gateway's own error).
fn bearer_token(headers: &http::HeaderMap) -> Result<Option<String>, Error> {
    tessera_mesh::headers::bearer_token(headers)
        .map(|token| token.map(str::to_owned))
        .map_err(|_| Error::BadAuthorizationHeader)
}

fn client_ip<B>(req: &http::Request<B>) -> Option<IpAddr> {
    let ext = req.extensions();
    ext.get::<ClientAddr>()
        .map(|a| a.0)
        .or_else(|| {
            ext.get::<tessera_mesh::stack::PeerInfo>()
                .map(|p| p.remote_addr.ip())
        })
        .or_else(|| {
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
                Ok((route, token)) => inner.forward(route, req, token).await,
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
                matches!(bearer_token(&h), Err(Error::BadAuthorizationHeader)),
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
        assert!(matches!(err, Some(Error::NotPublic(p)) if p.ends_with("WatchEvents")));
    }
}
