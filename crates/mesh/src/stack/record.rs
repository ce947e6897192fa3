//! What a call is recorded as: its RED metrics and the end of its server span, once its
//! status is known (in the response headers, or in the trailers at the end of the body).

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use bytes::Bytes;
use http::Response;
use http_body::{Body as HttpBody, Frame};
use opentelemetry::{KeyValue, trace::TraceContextExt};
use tonic::{Status, body::Body};

use crate::metrics::{self, MethodMetrics};

pub(super) const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");

/// Hands the recorder to the response: a trailers-only response (an error before any
/// message) has its status in the headers; otherwise it comes in the trailers at the end of
/// the body, so streaming calls are measured to their last byte.
pub(super) fn observe(resp: Response<Body>, mut recorder: Recorder) -> Response<Body> {
    if let Some(code) = grpc_code(resp.headers()) {
        recorder.code = Some(code);
        return resp;
    }
    resp.map(|body| {
        Body::new(Observed {
            inner: body,
            recorder,
        })
    })
}

/// The `grpc-status` code, read without building a `Status`: tonic's parser also decodes the
/// message and copies the metadata, which cost more per call than the rest of the metrics.
pub(super) fn grpc_code(headers: &http::HeaderMap) -> Option<tonic::Code> {
    let value = headers.get(&GRPC_STATUS)?.as_bytes();
    if value.is_empty() || value.len() > 2 || !value.iter().all(u8::is_ascii_digit) {
        // Not a code a gRPC server sends; counted as UNKNOWN like tonic would.
        return Some(tonic::Code::Unknown);
    }
    let n = value.iter().fold(0i32, |n, d| n * 10 + i32::from(d - b'0'));
    Some(tonic::Code::from_i32(n))
}

pub(super) struct Recorder {
    pub(super) metrics: Arc<MethodMetrics>,
    pub(super) method: Arc<str>,
    pub(super) caller: Arc<str>,
    pub(super) start: Instant,
    /// The context holding the server span, when the call is traced.
    pub(super) trace: Option<opentelemetry::Context>,
    pub(super) code: Option<tonic::Code>,
}

impl Drop for Recorder {
    fn drop(&mut self) {
        // A body dropped before its trailers means the client went away.
        let code = self.code.unwrap_or(tonic::Code::Cancelled);
        if let Some(trace) = &self.trace {
            let span = trace.span();
            span.set_attribute(KeyValue::new("rpc.grpc.status_code", code as i64));
            // The codes OpenTelemetry's RPC conventions count as server errors.
            use tonic::Code::*;
            if matches!(
                code,
                Unknown | DeadlineExceeded | Unimplemented | Internal | Unavailable | DataLoss
            ) {
                span.set_status(opentelemetry::trace::Status::error(metrics::code_name(
                    code,
                )));
            }
            span.end();
        }
        self.metrics
            .record(code, &self.caller, self.start.elapsed().as_secs_f64());
    }
}

pin_project_lite::pin_project! {
    struct Observed {
        #[pin]
        inner: Body,
        recorder: Recorder,
    }
}

impl HttpBody for Observed {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    this.recorder.code = Some(grpc_code(trailers).unwrap_or(tonic::Code::Ok));
                }
            }
            Poll::Ready(Some(Err(status))) => this.recorder.code = Some(status.code()),
            Poll::Ready(None) => {
                this.recorder.code.get_or_insert(tonic::Code::Unknown);
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_read_from_headers() {
        let code = |v: &'static str| {
            let mut h = http::HeaderMap::new();
            h.insert(GRPC_STATUS, http::HeaderValue::from_static(v));
            grpc_code(&h)
        };
        assert_eq!(grpc_code(&http::HeaderMap::new()), None);
        assert_eq!(code("0"), Some(tonic::Code::Ok));
        assert_eq!(code("5"), Some(tonic::Code::NotFound));
        assert_eq!(code("16"), Some(tonic::Code::Unauthenticated));
        // Agrees with tonic's own parser, including on values no server should send.
        for v in ["0", "4", "14", "16", "17", "99", "", "x", "-1", "007", " 1"] {
            let mut h = http::HeaderMap::new();
            h.insert(GRPC_STATUS, http::HeaderValue::from_static(v));
            let tonic_code = Status::from_header_map(&h).map(|s| s.code());
            assert_eq!(grpc_code(&h), tonic_code, "grpc-status {v:?}");
        }
    }
}
