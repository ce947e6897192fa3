//! Limits on what a caller sends: each incoming message's size, checked from the gRPC length
//! prefix before the message is buffered (tonic's own check answers OUT_OF_RANGE; the gRPC
//! spec wants RESOURCE_EXHAUSTED), and on the public port the time the first message may take
//! to arrive before the call holds a shedding permit.

use std::{
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Buf, Bytes};
use http::Request;
use http_body::{Body as HttpBody, Frame};
use tonic::{Status, body::Body};

/// gRPC requests carry length-prefixed messages; anything else on the port (HTTP/JSON) is
/// not read here.
pub(super) fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|ct| ct.as_bytes().starts_with(b"application/grpc"))
}

/// Waits (up to `wait`) until the request's first message is in whole, or its body ended,
/// and hands the request on with what was read put back in front of the rest. A first
/// message past `limit` is RESOURCE_EXHAUSTED without reading it.
pub(super) async fn first_message(
    req: Request<Body>,
    limit: usize,
    wait: Duration,
) -> Result<Request<Body>, Status> {
    let (parts, mut body) = req.into_parts();
    let mut frames = std::collections::VecDeque::new();
    let read = async {
        let mut header = [0u8; 5];
        let mut have = 0usize;
        let mut need: Option<usize> = None;
        loop {
            let Some(frame) = futures::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx))
                .await
                .transpose()
                .map_err(|e| Status::cancelled(format!("reading the request: {e}")))?
            else {
                return Ok(());
            };
            let Some(data) = frame.data_ref() else {
                // Trailers: the body is over.
                frames.push_back(frame);
                return Ok(());
            };
            // The 5-byte length prefix may arrive split over frames.
            if have < 5 {
                let take = (5 - have).min(data.len());
                header[have..have + take].copy_from_slice(&data[..take]);
            }
            have = have.saturating_add(data.len());
            if need.is_none() && have >= 5 {
                let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
                if len > limit {
                    return Err(Status::resource_exhausted(format!(
                        "message of {len} bytes exceeds the limit of {limit} bytes"
                    )));
                }
                need = Some(5 + len);
            }
            frames.push_back(frame);
            if need.is_some_and(|n| have >= n) {
                return Ok(());
            }
        }
    };
    match tokio::time::timeout(wait, read).await {
        Ok(Ok(())) => Ok(Request::from_parts(
            parts,
            Body::new(Prefixed { frames, rest: body }),
        )),
        Ok(Err(status)) => Err(status),
        Err(_) => Err(Status::deadline_exceeded(format!(
            "the request message did not arrive within {wait:?}"
        ))),
    }
}

/// Frames already read, then the rest of the body.
struct Prefixed {
    frames: std::collections::VecDeque<Frame<Bytes>>,
    rest: Body,
}

impl HttpBody for Prefixed {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
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

pin_project_lite::pin_project! {
    pub(super) struct Limited {
        #[pin]
        inner: Body,
        limit: usize,
        header: [u8; 5],
        header_len: usize,
        remaining: usize,
    }
}

impl Limited {
    /// `inner`, failing on the first message longer than `limit` bytes.
    pub(super) fn new(inner: Body, limit: usize) -> Self {
        Self {
            inner,
            limit,
            header: [0; 5],
            header_len: 0,
            remaining: 0,
        }
    }
}

impl HttpBody for Limited {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            let mut data = data.clone();
            while data.has_remaining() {
                if *this.remaining > 0 {
                    let n = (*this.remaining).min(data.remaining());
                    data.advance(n);
                    *this.remaining -= n;
                    continue;
                }
                this.header[*this.header_len] = data.get_u8();
                *this.header_len += 1;
                if *this.header_len == 5 {
                    *this.header_len = 0;
                    let len = u32::from_be_bytes([
                        this.header[1],
                        this.header[2],
                        this.header[3],
                        this.header[4],
                    ]) as usize;
                    if len > *this.limit {
                        return Poll::Ready(Some(Err(Status::resource_exhausted(format!(
                            "message of {len} bytes exceeds the limit of {} bytes",
                            this.limit
                        )))));
                    }
                    *this.remaining = len;
                }
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
}
