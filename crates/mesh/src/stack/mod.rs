//! The server-side request path, one tower layer ([`RequestPath`]) doing, outermost first:
//! telemetry (trace span + RED metrics) → panic guard → caller identity and access rule (and
//! the end-user token) → deadline → load shedding → message size limit → handler.
//!
//! Every step answers failures itself as a gRPC status, so the handler's router never sees
//! a request that should not reach it and the caller always gets a proper code.
//!
//! On the gateway's public port ([`RequestPath::message_deadline`]) a call's first request
//! message must arrive, under its own deadline, before the call takes a shedding permit:
//! clients that open streams and send nothing cannot crowd out the others.

mod authz;
mod drain;
mod limits;
mod record;

use std::{
    borrow::Cow,
    collections::HashMap,
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    panic::AssertUnwindSafe,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use futures::{FutureExt, future::Either};
use http::{Request, Response};
use opentelemetry::{
    KeyValue, StringValue,
    context::{FutureExt as _, WithContext},
    trace::{SpanKind, TraceContextExt, Tracer as _},
};
use opentelemetry_sdk::trace::Tracer;
use tokio::sync::{Semaphore, watch};
use tonic::{Status, body::Body};
use tower::{Layer, Service};

pub use self::authz::Authorizer;
use self::{
    drain::{Drained, draining},
    limits::{Limited, first_message, is_grpc},
    record::{Recorder, grpc_code, observe},
};
use crate::{
    context::{self, CallContext},
    headers::{GRPC_TIMEOUT, bearer_token, parse_grpc_timeout},
    identity::SpiffeId,
    metrics::{MethodMetrics, Metrics},
    policy::{MethodRule, Policy},
    telemetry::{TRACEPARENT, extract_context},
    token::EndUser,
};

/// Who is on the other end of a connection; put in every request's extensions by the
/// connection handler. `identity` is set only from a verified client certificate.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    /// The client's socket address, as the TCP connection reports it.
    pub remote_addr: SocketAddr,
    /// The workload that presented the certificate; `None` for a connection without one
    /// (the public port).
    pub identity: Option<Arc<SpiffeId>>,
}

type BoxFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

fn status_response(status: Status) -> Response<Body> {
    status.into_http::<Body>()
}

/// Everything the request path needs, shared by all calls on one port.
pub struct RequestPath {
    /// RED metrics of this port.
    pub metrics: Metrics,
    /// The contracts: method names for labels, and the access rules.
    pub policy: Arc<Policy>,
    /// Caller identity and the contract's rules (internal ports). `None` on the public port,
    /// where there is no client certificate and the service checks tokens itself.
    pub authorizer: Option<Authorizer>,
    /// Bounds every call, also those that carry no deadline or a longer one.
    pub deadline_cap: Duration,
    /// Calls in the handler at once; past it, RESOURCE_EXHAUSTED at once.
    pub max_in_flight: usize,
    /// Largest incoming message, checked from its length prefix.
    pub max_message_size: usize,
    /// Where server spans go; without one, calls are not traced here but the caller's
    /// trace context still flows on to downstream calls.
    pub tracer: Option<Tracer>,
    /// Turns true when the workload drains: open server streams then end with UNAVAILABLE
    /// (reconnect elsewhere) and new ones are refused the same way.
    pub drain: Option<watch::Receiver<bool>>,
    /// The public port: wait up to this long for a call's first request message before it
    /// takes a shedding permit, so clients that send headers and nothing more cannot hold
    /// permits (DEADLINE_EXCEEDED when it does not come). `None` on internal ports, whose
    /// callers are other workloads and whose per-call cost stays as it is.
    pub message_deadline: Option<Duration>,
}

/// Paths outside the contracts that every port serves; any other unknown path is labelled
/// `unknown`, so callers cannot grow the metrics without bound by inventing method names.
const SERVED_PATHS: &[&str] = &[
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// A path the port knows: its metrics label and its contract rule, looked up once per call.
struct Known {
    label: Arc<str>,
    metrics: Arc<MethodMetrics>,
    /// `rpc.service` and `rpc.method` of the span.
    service: Arc<str>,
    method: Arc<str>,
    /// The span's name: the path, shared for the process's life.
    span_name: &'static str,
    rule: Option<MethodRule>,
    /// A server stream: ended by the drain rather than waited for.
    streaming: bool,
}

/// Span names are `Cow<'static, str>`: interning the known paths (a fixed set, from the
/// contracts) saves an allocation per call.
fn intern(path: &str) -> &'static str {
    static NAMES: std::sync::Mutex<std::collections::BTreeSet<&'static str>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let mut names = NAMES
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    match names.get(path) {
        Some(name) => name,
        None => {
            let name: &'static str = Box::leak(path.into());
            names.insert(name);
            name
        }
    }
}

impl Known {
    fn new(path: &str, rule: Option<MethodRule>, metrics: &Metrics) -> Self {
        let (service, method) = path
            .trim_start_matches('/')
            .split_once('/')
            .unwrap_or((path, ""));
        let label: Arc<str> = path.into();
        Self {
            metrics: Arc::new(metrics.method(label.clone())),
            label,
            service: service.into(),
            method: method.into(),
            span_name: intern(path),
            streaming: rule.as_ref().is_some_and(|r| r.server_streaming)
                || path == "/grpc.health.v1.Health/Watch",
            rule,
        }
    }
}

/// A fast hash for the fixed table of known paths: they are hashed on every call, and the
/// table never grows from requests, so SipHash's flooding resistance buys nothing here.
#[derive(Default)]
struct Fnv(u64);

impl std::hash::Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut h = if self.0 == 0 {
            0xcbf2_9ce4_8422_2325
        } else {
            self.0
        };
        for b in bytes {
            h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
        self.0 = h;
    }
}

type PathTable = HashMap<Box<str>, Known, std::hash::BuildHasherDefault<Fnv>>;

struct Shared {
    tracer: Option<Tracer>,
    methods: PathTable,
    /// Every path not in `methods`.
    unknown: Known,
    anonymous: Arc<str>,
    authorizer: Option<Arc<Authorizer>>,
    deadline_cap: Duration,
    permits: Arc<Semaphore>,
    max_message_size: usize,
    drain: Option<watch::Receiver<bool>>,
    message_deadline: Option<Duration>,
}

impl RequestPath {
    /// The layer that puts this request path around a port's routes; the per-method labels
    /// and rules are looked up once here, not per call.
    pub fn layer(self) -> RequestPathLayer {
        let mut methods = PathTable::default();
        for rule in self.policy.methods() {
            methods.insert(
                rule.path.as_str().into(),
                Known::new(&rule.path, Some(rule.clone()), &self.metrics),
            );
        }
        for path in SERVED_PATHS {
            methods.insert((*path).into(), Known::new(path, None, &self.metrics));
        }
        let unknown = Known::new("unknown", None, &self.metrics);
        RequestPathLayer(Arc::new(Shared {
            tracer: self.tracer,
            methods,
            unknown,
            anonymous: "anonymous".into(),
            authorizer: self.authorizer.map(Arc::new),
            deadline_cap: self.deadline_cap,
            permits: Arc::new(Semaphore::new(self.max_in_flight.max(1))),
            max_message_size: self.max_message_size,
            drain: self.drain,
            message_deadline: self.message_deadline,
        }))
    }
}

/// The tower layer of a [`RequestPath`].
#[derive(Clone)]
pub struct RequestPathLayer(Arc<Shared>);

impl<S> Layer<S> for RequestPathLayer {
    type Service = RequestPathService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RequestPathService {
            inner,
            shared: self.0.clone(),
        }
    }
}

/// The whole request path around `S`, written as one future per call: the steps used to be
/// a tower layer each, and their five boxed futures (allocated, and moved into each other)
/// were a measurable part of a call's CPU time.
#[derive(Clone)]
pub struct RequestPathService<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> Service<Request<Body>> for RequestPathService<S>
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

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        // Clone-and-swap so the clone that was polled ready is the one called (tower's
        // contract).
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let shared = self.shared.clone();
        let start = Instant::now();

        let path = req.uri().path();
        let known = shared.methods.get(path);
        let labels = known.unwrap_or(&shared.unknown);
        let method = labels.label.clone();
        let method_metrics = labels.metrics.clone();
        let identity = req
            .extensions()
            .get::<PeerInfo>()
            .and_then(|p| p.identity.clone());
        let caller = match &identity {
            Some(id) => id.service_shared().clone(),
            None => shared.anonymous.clone(),
        };
        // The server span, a child of the caller's (W3C traceparent), created with the
        // OpenTelemetry SDK directly: a `tracing` span per call cost more than all the
        // other steps together (registry, every layer's callbacks, span field formatting).
        // Log lines written during the call get its trace id from the call context.
        let parent = if req.headers().contains_key(&TRACEPARENT) {
            extract_context(req.headers())
        } else {
            opentelemetry::Context::new()
        };
        let (trace, traced) = match &shared.tracer {
            Some(tracer) => {
                // Room for the status code set at the end, so the SDK's vector never grows.
                let mut attributes = Vec::with_capacity(5);
                attributes.push(KeyValue::new("rpc.system", "grpc"));
                if let Some(k) = known {
                    attributes.push(KeyValue::new(
                        "rpc.service",
                        StringValue::from(k.service.clone()),
                    ));
                    attributes.push(KeyValue::new(
                        "rpc.method",
                        StringValue::from(k.method.clone()),
                    ));
                }
                attributes.push(KeyValue::new("caller", StringValue::from(caller.clone())));
                let span = tracer
                    .span_builder(Cow::Borrowed(labels.span_name))
                    .with_kind(SpanKind::Server)
                    .with_attributes(attributes)
                    .start_with_context(tracer, &parent);
                (parent.with_span(span), true)
            }
            None => (parent, false),
        };
        let ctx = CallContext {
            deadline: None,
            token: None,
            method: Some(method.clone()),
            caller: Some(caller.clone()),
            trace: trace.clone(),
        };
        let recorder = Recorder {
            metrics: method_metrics,
            method,
            caller,
            start,
            trace: traced.then_some(trace),
            code: None,
        };
        let rule = known.and_then(|k| k.rule.as_ref());
        // Only server streams watch the drain; unary calls pay one branch here.
        let drain = match (&shared.drain, known.is_some_and(|k| k.streaming)) {
            (Some(drain), true) => {
                if *drain.borrow() {
                    return Box::pin(std::future::ready(Ok(observe(
                        status_response(draining()),
                        recorder,
                    ))));
                }
                Some(drain.clone())
            }
            _ => None,
        };
        let req = match admit(&shared, req, identity, rule, &ctx) {
            Admitted::Go(req) => req,
            Admitted::Refused(resp) => {
                return Box::pin(std::future::ready(Ok(observe(resp, recorder))));
            }
            Admitted::Verify(req, authorizer) => {
                // A separate, rarer path: verifying may fetch keys, a large future that
                // service-to-service calls (no end user) would otherwise carry in theirs.
                return Box::pin(async move {
                    let mut req = req;
                    let verified = match bearer_token(req.headers()) {
                        Ok(Some(token)) => authorizer.verify_token(token).await,
                        Ok(None) => Err(Status::unauthenticated("an access token is required")),
                        Err(status) => Err(status),
                    };
                    match verified {
                        Ok(user) => {
                            req.extensions_mut().insert(user);
                            call_handler(&shared, inner, req, ctx, recorder, drain).await
                        }
                        Err(status) => Ok(observe(status_response(status), recorder)),
                    }
                });
            }
        };
        if let Some(wait) = shared.message_deadline
            && is_grpc(req.headers())
        {
            return Box::pin(async move {
                match first_message(req, shared.max_message_size, wait).await {
                    Ok(req) => call_handler(&shared, inner, req, ctx, recorder, drain).await,
                    Err(status) => Ok(observe(status_response(status), recorder)),
                }
            });
        }
        Box::pin(call_handler(&shared, inner, req, ctx, recorder, drain))
    }
}

/// A call answered without running the handler.
type Answered = std::future::Ready<Result<Response<Body>, Infallible>>;

/// What the checks before the handler decided.
enum Admitted {
    Go(Request<Body>),
    Refused(Response<Body>),
    /// Allowed in, once the end user's token checks out.
    Verify(Request<Body>, Arc<Authorizer>),
}

/// Identity and the contract's rule, before anything is spent on the call.
fn admit(
    shared: &Shared,
    req: Request<Body>,
    identity: Option<Arc<SpiffeId>>,
    rule: Option<&MethodRule>,
    ctx: &CallContext,
) -> Admitted {
    let Some(authorizer) = &shared.authorizer else {
        return Admitted::Go(req);
    };
    let Some(caller) = identity else {
        return Admitted::Refused(status_response(Status::unauthenticated(
            "a client certificate with a SPIFFE id is required",
        )));
    };
    if let Err(status) = authorizer.decide(&caller, req.uri().path(), rule) {
        // Logged as part of the call (its trace id), like everything the handler logs.
        context::sync_scope(ctx.clone(), || {
            tracing::warn!(caller = %caller, method = req.uri().path(), "access denied");
        });
        return Admitted::Refused(status_response(status));
    }
    let verify = match authorizer.user_token(req.headers(), rule) {
        Ok(token) => token.is_some(),
        Err(status) => return Admitted::Refused(status_response(status)),
    };
    if verify {
        Admitted::Verify(req, authorizer.clone())
    } else {
        Admitted::Go(req)
    }
}

/// Deadline, shedding permit and message limit, then the handler is called under the panic
/// guard and the call context.
fn call_handler<S>(
    shared: &Shared,
    mut inner: S,
    req: Request<Body>,
    mut ctx: CallContext,
    recorder: Recorder,
    drain: Option<watch::Receiver<bool>>,
) -> Either<Handler<S::Future>, Answered>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
{
    // The incoming `grpc-timeout`, capped; the remaining time and the end-user token become
    // the call context downstream clients inherit.
    let requested = req
        .headers()
        .get(&GRPC_TIMEOUT)
        .and_then(parse_grpc_timeout);
    let timeout = requested.map_or(shared.deadline_cap, |t| t.min(shared.deadline_cap));
    ctx.deadline = Some(Instant::now() + timeout);
    ctx.token = req.extensions().get::<EndUser>().map(|u| u.token.clone());

    // Shedding: refuse at once past the limit instead of queueing, so latency stays bounded
    // under overload and the caller can go elsewhere. Only calls allowed in count, so
    // refused callers cannot crowd out others.
    let Ok(permit) = shared.permits.clone().try_acquire_owned() else {
        return Either::Right(std::future::ready(Ok(observe(
            status_response(Status::resource_exhausted(
                "server overloaded: too many calls in flight",
            )),
            recorder,
        ))));
    };

    let limit = shared.max_message_size;
    let req = req.map(|body| Body::new(Limited::new(body, limit)));
    // The handler's future runs with the call context and its trace as the current
    // OpenTelemetry context, so spans it opens with `tracing` are children of the server
    // span. (tonic's `call` only builds that future; no service code runs in it.)
    let trace = ctx.trace.clone();
    let called = std::panic::catch_unwind(AssertUnwindSafe(|| inner.call(req)));
    match called {
        Ok(fut) => Either::Left(Handler {
            fut: tokio::time::timeout(
                timeout,
                AssertUnwindSafe(context::scope(ctx, fut).with_context(trace)).catch_unwind(),
            ),
            timeout,
            permit: Some(permit),
            drain,
            recorder: Some(recorder),
        }),
        Err(panic) => Either::Right(std::future::ready(Ok(observe(
            panic_response(panic, &recorder.method),
            recorder,
        )))),
    }
}

pin_project_lite::pin_project! {
    /// The handler's future under the deadline and the panic guard, holding the shedding
    /// permit until the response headers. Hand-written so a call's state is this and the
    /// handler's own future, nothing copied twice.
    struct Handler<F> {
        #[pin]
        fut: tokio::time::Timeout<
            futures::future::CatchUnwind<AssertUnwindSafe<WithContext<context::Scoped<F>>>>,
        >,
        timeout: Duration,
        permit: Option<tokio::sync::OwnedSemaphorePermit>,
        recorder: Option<Recorder>,
        drain: Option<watch::Receiver<bool>>,
    }
}

impl<F> Future for Handler<F>
where
    F: Future<Output = Result<Response<Body>, Infallible>>,
{
    type Output = Result<Response<Body>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let resp = match std::task::ready!(this.fut.poll(cx)) {
            Ok(Ok(Ok(resp))) => resp,
            Ok(Err(panic)) => panic_response(
                panic,
                this.recorder.as_ref().map_or("", |r| r.method.as_ref()),
            ),
            Err(_) => status_response(Status::deadline_exceeded(format!(
                "deadline of {:?} exceeded",
                this.timeout
            ))),
        };
        this.permit.take();
        match this.recorder.take() {
            Some(recorder) => {
                let resp = match this.drain.take() {
                    Some(drain) if grpc_code(resp.headers()).is_none() => {
                        resp.map(|body| Body::new(Drained::new(body, drain)))
                    }
                    _ => resp,
                };
                Poll::Ready(Ok(observe(resp, recorder)))
            }
            // Polled again after completion: a caller bug; answer rather than panic.
            None => Poll::Ready(Ok(status_response(Status::internal("internal error")))),
        }
    }
}

/// A panicking handler becomes an opaque INTERNAL; the process keeps serving.
fn panic_response(panic: Box<dyn std::any::Any + Send>, method: &str) -> Response<Body> {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    tracing::error!(panic = %what, method, "handler panicked");
    status_response(Status::internal("internal error"))
}
