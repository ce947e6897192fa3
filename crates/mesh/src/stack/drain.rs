//! Server streams and the drain: once the workload drains, an open stream ends with
//! UNAVAILABLE trailers (reconnect to another replica) instead of holding the shutdown.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame};
use tokio::sync::watch;
use tonic::{Status, body::Body};

use super::record::GRPC_STATUS;

/// What a server stream ends with when the workload drains: the consumer should reconnect,
/// and its balancer will pick another replica (this one has sent GOAWAY).
pub(super) fn draining() -> Status {
    Status::unavailable(DRAINING_MESSAGE)
}

const DRAINING_MESSAGE: &str = "the server is shutting down; reconnect to another replica";

pin_project_lite::pin_project! {
    /// A server stream's body that ends with [`draining`] trailers once the drain starts,
    /// so an open stream does not hold the shutdown until its timeout.
    pub(super) struct Drained {
        #[pin]
        inner: Body,
        drained: Pin<Box<dyn Future<Output = ()> + Send>>,
        done: bool,
    }
}

impl Drained {
    pub(super) fn new(inner: Body, mut drain: watch::Receiver<bool>) -> Self {
        let drained = Box::pin(async move {
            // A dropped sender is a workload that is gone without draining: never fire then.
            if drain.wait_for(|d| *d).await.is_err() {
                std::future::pending::<()>().await;
            }
        });
        Self {
            inner,
            drained,
            done: false,
        }
    }
}

impl HttpBody for Drained {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.project();
        if *this.done {
            return Poll::Ready(None);
        }
        if this.drained.as_mut().poll(cx).is_ready() {
            *this.done = true;
            let mut trailers = http::HeaderMap::with_capacity(2);
            trailers.insert(&GRPC_STATUS, http::HeaderValue::from_static("14"));
            // Printable ASCII only, so no percent-encoding is needed.
            trailers.insert(
                "grpc-message",
                http::HeaderValue::from_static(DRAINING_MESSAGE),
            );
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        let polled = this.inner.poll_frame(cx);
        match &polled {
            // The stream's own end (or its own trailers): nothing to add after it.
            Poll::Ready(None) => *this.done = true,
            Poll::Ready(Some(Ok(frame))) if frame.is_trailers() => *this.done = true,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
