//! The public port's non-gRPC front: HTTP/JSON transcoding, gRPC-Web, CORS, `/openapi.json`
//! and the web front end, as one tower service ([`Edge`]) around the public gRPC service.
//!
//! Every JSON or gRPC-Web call becomes a real gRPC request (`POST /pkg.Service/Method`,
//! `application/grpc`, the caller's `authorization` and trace headers, the connection's
//! extensions) to the wrapped service, so it passes through the same public pipeline as a
//! native gRPC call: metrics and spans by method, deadline, load shedding, message limits,
//! the gateway's token check and rate limits, and the services' own checks. Routes come from
//! the `google.api.http` options of the public methods ([`rules`]); no route is written here.
//!
//! Server-streaming methods are answered as newline-delimited JSON (`application/x-ndjson`),
//! one response message per line; an error after the first message ends the stream with a
//! line `{"error": {code, message, details}}`.
//!
//! Not for: anything gRPC clients see (they pass straight through), TLS or listeners.

pub mod openapi;
pub mod rules;
pub mod template;
pub mod transcode;
mod web;

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use tonic::{Code, Status, body::Body};
use tower::{Layer, Service, ServiceExt};

pub use rules::Api;

use crate::Error;
use rules::{Binding, Lookup};

type BoxFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

/// What the edge needs besides the service it wraps; build once, [`HttpJson::wrap`] per port.
#[derive(Clone, Debug)]
pub struct HttpJson {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    api: Api,
    openapi: Bytes,
    /// Origins allowed to call from a browser on another origin (`TESSERA_CORS_ORIGINS`).
    cors_origins: Vec<HeaderValue>,
    /// Largest JSON body read, in bytes.
    max_body: usize,
    /// How long a client has to send the whole body (`TESSERA_PUBLIC_BODY_TIMEOUT_MS`, as for
    /// gRPC requests on the same port), so a slow sender cannot hold a call open.
    body_timeout: std::time::Duration,
}

impl HttpJson {
    /// Reads the bindings from the contracts; `cors_origins` are exact origins
    /// (`https://app.example.com`), none by default.
    pub fn new(cors_origins: &[String], max_body: usize) -> Result<Self, Error> {
        let api = Api::contracts()?;
        let openapi = serde_json::to_vec_pretty(&openapi::document(&api))
            .map_err(|e| Error::Internal(e.to_string()))?;
        let cors_origins = cors_origins
            .iter()
            .map(|o| {
                HeaderValue::from_str(o)
                    .map_err(|_| Error::Internal(format!("bad CORS origin {o:?}")))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            shared: Arc::new(Shared {
                api,
                openapi: openapi.into(),
                cors_origins,
                max_body,
                body_timeout: tessera_mesh::edge::PublicLimits::default().body_timeout,
            }),
        })
    }

    /// How long a client may take to send a JSON body (by default the public port's
    /// `TESSERA_PUBLIC_BODY_TIMEOUT_MS` default); past it 408 with DEADLINE_EXCEEDED.
    pub fn with_body_timeout(mut self, timeout: std::time::Duration) -> Self {
        if let Some(shared) = Arc::get_mut(&mut self.shared) {
            shared.body_timeout = timeout;
        }
        self
    }

    /// The OpenAPI document, as served at `/openapi.json`.
    pub fn openapi_json(&self) -> Bytes {
        self.shared.openapi.clone()
    }

    /// `inner` (the public gRPC service, with its whole request path) behind the edge.
    pub fn wrap<S>(&self, inner: S) -> Edge<S>
    where
        S: Clone,
    {
        Edge {
            web: tonic_web::GrpcWebLayer::new().layer(inner.clone()),
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The edge as the public port's outermost layer (see `Workload::with_public_edge`).
pub fn public_edge(
    cors_origins: &[String],
    max_body: usize,
    body_timeout: std::time::Duration,
) -> Result<tessera_mesh::server::PublicEdge, Error> {
    let edge = HttpJson::new(cors_origins, max_body)?.with_body_timeout(body_timeout);
    Ok(Arc::new(move |path| {
        tessera_mesh::server::GrpcService::new(edge.wrap(path))
    }))
}

/// The tower service of [`HttpJson::wrap`].
#[derive(Clone)]
pub struct Edge<S> {
    inner: S,
    web: tonic_web::GrpcWebService<S>,
    shared: Arc<Shared>,
}

impl<S> Service<Request<Body>> for Edge<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Each call readies its own clone of the inner service.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let shared = self.shared.clone();
        let origin = allowed_origin(&shared, req.headers());
        if req.method() == Method::OPTIONS
            && req
                .headers()
                .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
        {
            return Box::pin(std::future::ready(Ok(preflight(origin, req.headers()))));
        }
        // Native gRPC is most of the traffic: one header look-up, no allocation, then straight
        // through.
        let content_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .map_or(&b""[..], HeaderValue::as_bytes);
        let fut: BoxFuture = if has_prefix(content_type, b"application/grpc-web") {
            Box::pin(self.web.clone().oneshot(req))
        } else if has_prefix(content_type, b"application/grpc") {
            Box::pin(self.inner.clone().oneshot(req))
        } else {
            let inner = self.inner.clone();
            Box::pin(async move { Ok(http_request(shared, inner, req).await) })
        };
        match origin {
            None => fut,
            Some(origin) => Box::pin(async move {
                let mut resp = fut.await?;
                add_cors(resp.headers_mut(), origin);
                Ok(resp)
            }),
        }
    }
}

/// Case-insensitive prefix test (media types are case-insensitive).
fn has_prefix(value: &[u8], prefix: &[u8]) -> bool {
    value.len() >= prefix.len() && value[..prefix.len()].eq_ignore_ascii_case(prefix)
}

fn allowed_origin(shared: &Shared, headers: &HeaderMap) -> Option<HeaderValue> {
    let origin = headers.get(header::ORIGIN)?;
    shared
        .cors_origins
        .iter()
        .any(|o| o.as_bytes().eq_ignore_ascii_case(origin.as_bytes()))
        .then(|| origin.clone())
}

fn add_cors(headers: &mut HeaderMap, origin: HeaderValue) {
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    headers.append(header::VARY, HeaderValue::from_static("origin"));
    headers.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("grpc-status, grpc-message, grpc-status-details-bin"),
    );
}

/// A CORS preflight: allowed origins learn what they may send; others get 403 and no CORS
/// headers, so the browser refuses the call.
fn preflight(origin: Option<HeaderValue>, headers: &HeaderMap) -> Response<Body> {
    let Some(origin) = origin else {
        let mut resp = Response::new(Body::default());
        *resp.status_mut() = StatusCode::FORBIDDEN;
        return resp;
    };
    let mut resp = Response::new(Body::default());
    *resp.status_mut() = StatusCode::NO_CONTENT;
    let h = resp.headers_mut();
    add_cors(h, origin);
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST, PUT, PATCH, DELETE"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        headers
            .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
            .cloned()
            .unwrap_or_else(|| {
                HeaderValue::from_static(
                    "authorization, content-type, x-grpc-web, x-user-agent, grpc-timeout",
                )
            }),
    );
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("600"),
    );
    resp
}

fn json_response(status: StatusCode, body: Bytes, content_type: &'static str) -> Response<Body> {
    let mut resp = Response::new(Body::new(http_body_util::Full::new(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

fn error_response(api: &Api, http: StatusCode, status: &Status) -> Response<Body> {
    let body = serde_json::to_vec(&transcode::error_json(api, status)).unwrap_or_default();
    json_response(http, body.into(), "application/json")
}

fn status_response(api: &Api, status: &Status) -> Response<Body> {
    error_response(api, transcode::http_status(status.code()), status)
}

/// A plain HTTP request: the OpenAPI document, the web front end, or a JSON API call.
async fn http_request<S>(shared: Arc<Shared>, inner: S, req: Request<Body>) -> Response<Body>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible> + Send,
    S::Future: Send,
{
    let api = &shared.api;
    let path = req.uri().path();
    if matches!(*req.method(), Method::GET | Method::HEAD) {
        if path == "/openapi.json" {
            return json_response(StatusCode::OK, shared.openapi.clone(), "application/json");
        }
        if let Some(resp) = web::asset(path) {
            return resp;
        }
    }
    let (binding, vars) = match api.find(req.method(), path) {
        Lookup::Found(b, vars) => (b, vars),
        Lookup::WrongMethod(allowed) => {
            let allow = allowed
                .iter()
                .map(Method::as_str)
                .collect::<Vec<_>>()
                .join(", ");
            let mut resp = error_response(
                api,
                StatusCode::METHOD_NOT_ALLOWED,
                &Status::unimplemented(format!("{} is not served for {path}", req.method())),
            );
            if let Ok(v) = HeaderValue::from_str(&allow) {
                resp.headers_mut().insert(header::ALLOW, v);
            }
            return resp;
        }
        Lookup::NotFound => {
            return error_response(
                api,
                StatusCode::NOT_FOUND,
                &Status::not_found(format!("no route for {} {path}", req.method())),
            );
        }
    };
    let query = req.uri().query().map(str::to_owned);
    let (parts, body) = req.into_parts();
    let read = tokio::time::timeout(
        shared.body_timeout,
        http_body_util::Limited::new(body, shared.max_body).collect(),
    );
    let Ok(read) = read.await else {
        return error_response(
            api,
            StatusCode::REQUEST_TIMEOUT,
            &Status::deadline_exceeded(format!(
                "the request body did not arrive within {:?}",
                shared.body_timeout
            )),
        );
    };
    let body = match read {
        Ok(collected) => collected.to_bytes(),
        Err(err) if err.is::<http_body_util::LengthLimitError>() => {
            return error_response(
                api,
                StatusCode::PAYLOAD_TOO_LARGE,
                &Status::resource_exhausted(format!(
                    "the body is larger than {} bytes",
                    shared.max_body
                )),
            );
        }
        Err(err) => {
            return status_response(
                api,
                &Status::invalid_argument(format!("reading the body: {err}")),
            );
        }
    };
    // Any content type is read as JSON (curl's `-d` says form-urlencoded): the token travels
    // in a header, never a cookie, so a cross-site form post carries no credentials.
    let message = match transcode::request_message(binding, vars, query.as_deref(), &body) {
        Ok(m) => m,
        Err(status) => return status_response(api, &status),
    };
    let grpc = grpc_request(binding, parts, message);
    let resp = match inner.oneshot(grpc).await {
        Ok(resp) => resp,
        Err(never) => match never {},
    };
    if binding.method.is_server_streaming() {
        let binding = binding.clone();
        stream_response(shared.clone(), binding, resp)
    } else {
        unary_response(api, binding, resp).await
    }
}

/// The gRPC call the JSON request stands for: same extensions (peer address for rate limits),
/// the caller's token and trace context, and a framed protobuf body.
fn grpc_request(binding: &Binding, parts: http::request::Parts, message: Bytes) -> Request<Body> {
    let mut framed = BytesMut::with_capacity(message.len() + 5);
    framed.extend_from_slice(&[0]);
    framed.extend_from_slice(
        &u32::try_from(message.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    framed.extend_from_slice(&message);
    let mut req = Request::new(Body::new(http_body_util::Full::new(framed.freeze())));
    *req.method_mut() = Method::POST;
    *req.version_mut() = http::Version::HTTP_2;
    if let Ok(uri) = http::Uri::try_from(binding.grpc_path.as_str()) {
        *req.uri_mut() = uri;
    }
    *req.extensions_mut() = parts.extensions;
    let headers = req.headers_mut();
    for name in ["authorization", "traceparent", "tracestate", "grpc-timeout"] {
        if let Some(v) = parts.headers.get(name) {
            headers.insert(header::HeaderName::from_static(name), v.clone());
        }
    }
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert(header::TE, HeaderValue::from_static("trailers"));
    req
}

/// The status of a gRPC response: from the headers (trailers-only) or the trailers.
fn grpc_status(headers: &HeaderMap, trailers: Option<&HeaderMap>) -> Status {
    Status::from_header_map(headers)
        .or_else(|| trailers.and_then(Status::from_header_map))
        .unwrap_or_else(|| Status::internal("the response carried no gRPC status"))
}

async fn unary_response(api: &Api, binding: &Binding, resp: Response<Body>) -> Response<Body> {
    let (parts, body) = resp.into_parts();
    if let Some(status) = Status::from_header_map(&parts.headers)
        && status.code() != Code::Ok
    {
        return status_response(api, &status);
    }
    let collected = match body.collect().await {
        Ok(c) => c,
        Err(status) => return status_response(api, &status),
    };
    let status = grpc_status(&parts.headers, collected.trailers());
    if status.code() != Code::Ok {
        return status_response(api, &status);
    }
    let json = transcode::single_message(collected.to_bytes())
        .and_then(|payload| transcode::response_json(binding, &payload));
    match json {
        Ok(bytes) => json_response(StatusCode::OK, bytes.into(), "application/json"),
        Err(status) => {
            tracing::error!(method = %binding.grpc_path, error = %status.message(), "cannot transcode a response");
            status_response(api, &Status::internal("internal error"))
        }
    }
}

/// A server stream as newline-delimited JSON: one line per message as it arrives; a final
/// `{"error": ...}` line when the stream ends with a status other than OK.
fn stream_response(shared: Arc<Shared>, binding: Binding, resp: Response<Body>) -> Response<Body> {
    let (parts, body) = resp.into_parts();
    if let Some(status) = Status::from_header_map(&parts.headers)
        && status.code() != Code::Ok
    {
        return status_response(&shared.api, &status);
    }
    struct State {
        body: Body,
        buf: BytesMut,
        binding: Binding,
        shared: Arc<Shared>,
        done: bool,
    }
    fn line(json: &serde_json::Value) -> Result<http_body::Frame<Bytes>, Status> {
        let mut bytes = serde_json::to_vec(json).unwrap_or_default();
        bytes.push(b'\n');
        Ok(http_body::Frame::data(Bytes::from(bytes)))
    }
    fn error_line(st: &mut State, status: &Status) -> Result<http_body::Frame<Bytes>, Status> {
        st.done = true;
        line(&serde_json::json!({"error": transcode::error_json(&st.shared.api, status)}))
    }
    let state = State {
        body,
        buf: BytesMut::new(),
        binding,
        shared,
        done: false,
    };
    let lines = futures::stream::unfold(state, |mut st| async move {
        loop {
            if st.done {
                return None;
            }
            // A whole message buffered: its line goes out now, not when the stream ends.
            if st.buf.len() >= 5 {
                let len = u32::from_be_bytes([st.buf[1], st.buf[2], st.buf[3], st.buf[4]]) as usize;
                if st.buf.len() >= 5 + len {
                    let mut frame = st.buf.split_to(5 + len).freeze();
                    frame.advance(5);
                    let out = match transcode::response_json(&st.binding, &frame) {
                        Ok(mut bytes) => {
                            bytes.push(b'\n');
                            Ok(http_body::Frame::data(Bytes::from(bytes)))
                        }
                        Err(status) => error_line(&mut st, &status),
                    };
                    return Some((out, st));
                }
            }
            match st.body.frame().await {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => st.buf.extend_from_slice(&data),
                    Err(frame) => {
                        let status = frame
                            .trailers_ref()
                            .and_then(Status::from_header_map)
                            .unwrap_or_else(|| Status::ok(""));
                        if status.code() == Code::Ok {
                            return None;
                        }
                        let out = error_line(&mut st, &status);
                        return Some((out, st));
                    }
                },
                Some(Err(status)) => {
                    let out = error_line(&mut st, &status);
                    return Some((out, st));
                }
                None => return None,
            }
        }
    });
    let mut resp = Response::new(Body::new(http_body_util::StreamBody::new(lines)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    resp
}
