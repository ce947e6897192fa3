//! The per-call path of a balanced channel: deadline, token and trace context onto the
//! headers, then power-of-two-choices over the replicas, with retries where the contract
//! allows them and the budget has room.

use std::{
    collections::VecDeque,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};
use http_body::Frame;
use http_body_util::{BodyExt, Full};
use tonic::body::Body;
use tower::{
    BoxError, Service, ServiceExt,
    balance::p2c::Balance,
    retry::budget::{Budget, TpsBudget},
};

use crate::{
    Error,
    discover::Discovered,
    error::into_status,
    methods::{MethodInfo, MethodTable},
    propagate::{forward_token, inject_trace},
};
use tessera_mesh::headers::{GRPC_TIMEOUT, encode_grpc_timeout, parse_grpc_timeout};

pub(crate) type Balancer = Balance<Discovered, http::Request<Body>>;

/// What a [`crate::Channel`] call resolves to.
pub(crate) type ChannelFuture =
    Pin<Box<dyn Future<Output = Result<http::Response<Body>, BoxError>> + Send + 'static>>;

/// How calls on one channel are timed and retried.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CallPolicy {
    /// The deadline of a call that sets none itself.
    pub(crate) timeout: Option<Duration>,
    /// Tries per call, the first included.
    pub(crate) max_attempts: u32,
    pub(crate) backoff_first: Duration,
    pub(crate) backoff_cap: Duration,
    /// Larger requests are streamed through and sent once.
    pub(crate) max_replay_bytes: usize,
    /// How long a call waits for some replica to be ready before failing UNAVAILABLE.
    pub(crate) fail_fast_after: Duration,
}

/// A balanced, retrying channel to one target.
#[derive(Clone)]
pub(crate) struct Balanced {
    shared: Arc<Shared>,
}

struct Shared {
    /// The balancer chooses under this lock and the chosen replica's future runs outside it.
    /// Callers queue here only while no replica is ready (instead of hopping through a
    /// `tower::buffer` worker task on every call).
    balancer: tokio::sync::Mutex<Balancer>,
    /// Set while no replica is ready and calls fail fast.
    failing_fast: AtomicBool,
    /// The target, for messages.
    target: Box<str>,
    methods: &'static MethodTable,
    budget: TpsBudget,
    policy: CallPolicy,
}

impl Balanced {
    pub(crate) fn new(
        target: &str,
        balancer: Balancer,
        methods: &'static MethodTable,
        budget: TpsBudget,
        policy: CallPolicy,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                balancer: tokio::sync::Mutex::new(balancer),
                failing_fast: AtomicBool::new(false),
                target: target.into(),
                methods,
                budget,
                policy,
            }),
        }
    }

    /// Reads the incoming call's context synchronously (it is task-local), fixes the headers,
    /// and returns the future that sends and retries.
    pub(crate) fn call(&self, mut request: http::Request<Body>) -> ChannelFuture {
        let now = Instant::now();
        let context = tessera_mesh::context::current();

        // Deadline: the call's own, else the default for unary-response methods of the
        // contracts (a stream may rightly outlive any default), never past what is left of the
        // incoming call's.
        let method = self.shared.methods.get(request.uri().path());
        let headers = request.headers_mut();
        let default = self
            .shared
            .policy
            .timeout
            .filter(|_| method.is_some_and(|m| !m.server_streaming));
        let own = headers
            .get(GRPC_TIMEOUT)
            .and_then(parse_grpc_timeout)
            .or(default);
        let inherited = context
            .as_ref()
            .and_then(|c| c.deadline)
            .map(|deadline| deadline.saturating_duration_since(now));
        let timeout = match (own, inherited) {
            (Some(own), Some(inherited)) => Some(own.min(inherited)),
            (own, inherited) => own.or(inherited),
        };
        if timeout.is_some_and(|t| t.is_zero()) {
            return Box::pin(std::future::ready(Err(into_status(
                Error::DeadlineExceeded.into(),
            ))));
        }
        if let Some(timeout) = timeout {
            headers.insert(GRPC_TIMEOUT, encode_grpc_timeout(timeout));
        }
        if let Some(token) = context.as_ref().and_then(|c| c.token.as_deref()) {
            forward_token(headers, token);
        }
        inject_trace(headers);

        let shared = self.shared.clone();
        let deadline = timeout.map(|t| now + t);
        Box::pin(async move {
            let send = shared.send(request, method, deadline);
            let result = match deadline {
                Some(deadline) => tokio::time::timeout_at(deadline.into(), send)
                    .await
                    .unwrap_or_else(|_| Err(Error::DeadlineExceeded.into())),
                None => send.await,
            };
            result.map_err(into_status)
        })
    }
}

impl Balanced {
    /// Drives discovery and the replicas' connects until one is ready or `within` passes.
    pub(crate) async fn warm_up(&self, within: Duration) -> bool {
        let mut balancer = self.shared.balancer.lock().await;
        let ready = ServiceExt::<http::Request<Body>>::ready(&mut *balancer);
        matches!(tokio::time::timeout(within, ready).await, Ok(Ok(_)))
    }
}

impl Shared {
    async fn send(
        &self,
        request: http::Request<Body>,
        method: Option<MethodInfo>,
        deadline: Option<Instant>,
    ) -> Result<http::Response<Body>, BoxError> {
        // Every call earns retry budget; only retries spend it.
        self.budget.deposit();
        // Methods outside the contracts (health, reflection) and streamed requests go once,
        // untouched.
        let Some(method) = method.filter(|m| !m.client_streaming) else {
            return self.dispatch(request).await;
        };

        // A single-message request: buffer it so it can be sent again (cheap: the encoder
        // yields the whole message as one frame). Past the limit it goes once, streamed.
        let (parts, body) = request.into_parts();
        let body = match buffer(body, self.policy.max_replay_bytes).await? {
            Buffered::Whole(body) => body,
            Buffered::TooBig(body) => {
                return self.dispatch(http::Request::from_parts(parts, body)).await;
            }
        };
        let max_attempts = self.policy.max_attempts.max(1);
        let mut parts = Some(parts);
        let mut attempt = 1;
        loop {
            let last = attempt >= max_attempts;
            let this_try = if last { parts.take() } else { parts.clone() };
            let Some(this_try) = this_try else {
                return Err(Error::DeadlineExceeded.into());
            };
            let mut result = self
                .dispatch(http::Request::from_parts(
                    this_try,
                    Body::new(Full::new(body.clone())),
                ))
                .await;
            // A unary response is read to its end here, inside the call's deadline (a replica
            // silent after its headers would otherwise hold the caller past it) and where an
            // idempotent call cut off mid-response can still go again.
            if !method.server_streaming
                && let Ok(response) = result
            {
                result = if unavailable(&response) {
                    Ok(response)
                } else {
                    read_whole(response, self.policy.max_replay_bytes).await
                };
            }

            let retryable = match &result {
                Ok(response) => method.idempotent && unavailable(response),
                // Idempotent methods may go again after any connection failure; the others
                // only when the request provably never left.
                Err(error) => error
                    .downcast_ref::<Error>()
                    .is_some_and(|e| e.retryable(method.idempotent)),
            };
            if last || !retryable {
                return result;
            }
            let backoff = jitter(
                self.policy
                    .backoff_first
                    .saturating_mul(1 << (attempt - 1).min(16))
                    .min(self.policy.backoff_cap),
            );
            if deadline.is_some_and(|d| Instant::now() + backoff >= d) {
                return result;
            }
            if !self.budget.withdraw() {
                tracing::debug!("retry budget exhausted");
                return result;
            }
            drop(result);
            tokio::time::sleep(backoff).await;
            attempt += 1;
            if let (Some(deadline), Some(parts)) = (deadline, parts.as_mut()) {
                let left = deadline.saturating_duration_since(Instant::now());
                parts
                    .headers
                    .insert(GRPC_TIMEOUT, encode_grpc_timeout(left));
            }
        }
    }

    /// One try: pick a replica, then send outside the lock. With no replica ready, wait up to
    /// `fail_fast_after`; once that has run out, fail at once until a replica is ready again
    /// (each call still polls, which drives reconnects).
    async fn dispatch(
        &self,
        request: http::Request<Body>,
    ) -> Result<http::Response<Body>, BoxError> {
        let response = {
            let mut balancer = self.balancer.lock().await;
            let now = std::future::poll_fn(|cx| Poll::Ready(balancer.poll_ready(cx))).await;
            match now {
                Poll::Ready(ready) => ready?,
                Poll::Pending if self.failing_fast.load(Ordering::Relaxed) => {
                    return Err(self.no_ready_replica());
                }
                Poll::Pending => {
                    let wait = ServiceExt::<http::Request<Body>>::ready(&mut *balancer);
                    match tokio::time::timeout(self.policy.fail_fast_after, wait).await {
                        Ok(ready) => {
                            ready?;
                        }
                        Err(_) => {
                            tracing::warn!(target = %self.target, "no ready replica; failing calls fast until one is");
                            self.failing_fast.store(true, Ordering::Relaxed);
                            return Err(self.no_ready_replica());
                        }
                    }
                }
            }
            if self.failing_fast.load(Ordering::Relaxed) {
                tracing::info!(target = %self.target, "a replica is ready again");
                self.failing_fast.store(false, Ordering::Relaxed);
            }
            balancer.call(request)
        };
        response.await
    }

    fn no_ready_replica(&self) -> BoxError {
        Error::NoReadyReplica {
            target: self.target.to_string(),
        }
        .into()
    }
}

enum Buffered {
    Whole(Bytes),
    /// The frames read so far followed by the rest of the body.
    TooBig(Body),
}

/// Reads `body` to its end if it fits in `limit` bytes.
async fn buffer(mut body: Body, limit: usize) -> Result<Buffered, BoxError> {
    // The usual case, one data frame and the end, allocates nothing here. (A client body
    // does not report its end before it is polled for it.)
    let Some(first) = body.frame().await.transpose()? else {
        return Ok(Buffered::Whole(Bytes::new()));
    };
    let mut len = first.data_ref().map_or(0, Bytes::len);
    let mut frames = VecDeque::new();
    if len <= limit {
        match body.frame().await.transpose()? {
            None => return Ok(Buffered::Whole(first.into_data().unwrap_or_default())),
            Some(second) => {
                len = len.saturating_add(second.data_ref().map_or(0, Bytes::len));
                frames.extend([first, second]);
            }
        }
    } else {
        frames.push_back(first);
    }
    loop {
        if len > limit {
            return Ok(Buffered::TooBig(Body::new(Prefixed { frames, rest: body })));
        }
        let Some(frame) = body.frame().await.transpose()? else {
            break;
        };
        len = len.saturating_add(frame.data_ref().map_or(0, Bytes::len));
        frames.push_back(frame);
    }
    let mut data = frames.into_iter().filter_map(|f| f.into_data().ok());
    Ok(Buffered::Whole(match (data.next(), data.next()) {
        (None, _) => Bytes::new(),
        (Some(only), None) => only,
        (Some(first), Some(second)) => {
            let mut all = BytesMut::with_capacity(len);
            all.extend_from_slice(&first);
            all.extend_from_slice(&second);
            data.for_each(|d| all.extend_from_slice(&d));
            all.freeze()
        }
    }))
}

/// Reads a response's body to its end (data and trailers) if it fits in `limit` bytes; past
/// that the frames read so far go first and the rest streams through.
async fn read_whole(
    response: http::Response<Body>,
    limit: usize,
) -> Result<http::Response<Body>, BoxError> {
    let (parts, mut body) = response.into_parts();
    let mut frames = VecDeque::new();
    let mut len = 0usize;
    let rest = loop {
        if len > limit {
            break body;
        }
        match body.frame().await {
            None => break Body::empty(),
            Some(Ok(frame)) => {
                len = len.saturating_add(frame.data_ref().map_or(0, Bytes::len));
                frames.push_back(frame);
            }
            Some(Err(status)) => {
                return Err(Error::ResponseCut {
                    source: Box::new(status),
                }
                .into());
            }
        }
    };
    Ok(http::Response::from_parts(
        parts,
        Body::new(Prefixed { frames, rest }),
    ))
}

/// Frames already read, then the rest of the body.
struct Prefixed {
    frames: VecDeque<Frame<Bytes>>,
    rest: Body,
}

impl http_body::Body for Prefixed {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let this = self.get_mut();
        match this.frames.pop_front() {
            Some(frame) => Poll::Ready(Some(Ok(frame))),
            None => Pin::new(&mut this.rest).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty() && self.rest.is_end_stream()
    }
}

/// UNAVAILABLE as a trailers-only response, or the HTTP statuses gRPC reads as UNAVAILABLE
/// (a proxy in between).
fn unavailable(response: &http::Response<Body>) -> bool {
    match response.headers().get("grpc-status") {
        Some(code) => code.as_bytes() == b"14",
        None => matches!(response.status().as_u16(), 502..=504),
    }
}

/// A random duration between half of `d` and `d`, so retries and reconnects spread out.
pub(crate) fn jitter(d: Duration) -> Duration {
    d.mul_f64(rand::random_range(0.5..=1.0))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::convert::Infallible;

    use http_body_util::StreamBody;

    use super::*;

    fn body(chunks: &[&'static str]) -> Body {
        let frames: Vec<Result<Frame<Bytes>, Infallible>> = chunks
            .iter()
            .map(|c| Ok(Frame::data(Bytes::from_static(c.as_bytes()))))
            .collect();
        Body::new(StreamBody::new(futures::stream::iter(frames)))
    }

    #[tokio::test]
    async fn buffers_what_fits_and_streams_the_rest() {
        let Buffered::Whole(whole) = buffer(body(&["ab", "cd", "e"]), 5).await.unwrap() else {
            panic!("5 bytes fit in 5");
        };
        assert_eq!(whole, "abcde");
        let Buffered::Whole(one) = buffer(body(&["abc"]), 5).await.unwrap() else {
            panic!("3 bytes fit in 5");
        };
        assert_eq!(one, "abc");
        let Buffered::TooBig(rest) = buffer(body(&["ab", "cd", "ef", "g"]), 3).await.unwrap()
        else {
            panic!("7 bytes do not fit in 3");
        };
        assert_eq!(rest.collect().await.unwrap().to_bytes(), "abcdefg");
    }

    #[test]
    fn jitter_stays_between_half_and_all() {
        for _ in 0..100 {
            let d = jitter(Duration::from_millis(100));
            assert!(d >= Duration::from_millis(50) && d <= Duration::from_millis(100));
        }
    }
}
