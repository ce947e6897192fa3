//! What an outgoing call carries from the incoming one: the end user's bearer token and the
//! W3C trace context (the deadline's `grpc-timeout` is written with
//! [`tessera_mesh::headers`]).

use http::{HeaderMap, HeaderValue, header::AUTHORIZATION};
use tessera_mesh::telemetry::{TRACEPARENT, inject_context};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Adds `authorization: Bearer <token>` unless the request already has credentials.
pub(crate) fn forward_token(headers: &mut HeaderMap, token: &str) {
    if headers.contains_key(AUTHORIZATION) {
        return;
    }
    let mut value = Vec::with_capacity(7 + token.len());
    value.extend_from_slice(b"Bearer ");
    value.extend_from_slice(token.as_bytes());
    // The token was read from a header on the way in, so it is a valid value.
    if let Ok(mut value) = HeaderValue::from_maybe_shared(bytes::Bytes::from(value)) {
        value.set_sensitive(true);
        headers.insert(AUTHORIZATION, value);
    }
}

/// Injects the current span's trace context with the global propagator (W3C `traceparent`
/// once telemetry has installed one; nothing with the default no-op propagator). A request
/// that already carries a `traceparent` keeps it.
pub(crate) fn inject_trace(headers: &mut HeaderMap) {
    if headers.contains_key(TRACEPARENT) {
        return;
    }
    let span = tracing::Span::current();
    let cx = if span.is_none() {
        opentelemetry::Context::current()
    } else {
        span.context()
    };
    inject_context(&cx, headers);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn forwards_the_token_only_without_credentials() {
        let mut h = HeaderMap::new();
        forward_token(&mut h, "abc");
        assert_eq!(h[AUTHORIZATION], "Bearer abc");
        assert!(h[AUTHORIZATION].is_sensitive());
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_static("Bearer mine"));
        forward_token(&mut h, "abc");
        assert_eq!(h[AUTHORIZATION], "Bearer mine");
    }
}
