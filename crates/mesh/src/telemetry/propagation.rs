//! The W3C trace context across a hop (`traceparent`, `tracestate`), through OpenTelemetry's
//! `TraceContextPropagator`: read from a call's headers by the server's request path, written
//! into an outgoing call's headers by the client. Only the header adaptors are ours.

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::{
    Context,
    propagation::{Extractor, Injector, TextMapPropagator},
};
use opentelemetry_sdk::propagation::TraceContextPropagator;

/// The W3C header that carries a call's trace context.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        // The two names W3C propagation writes are static: no parse, no allocation.
        let name = match key {
            "traceparent" => TRACEPARENT,
            "tracestate" => TRACESTATE,
            other => match HeaderName::from_bytes(other.as_bytes()) {
                Ok(name) => name,
                Err(_) => return,
            },
        };
        if let Ok(value) = HeaderValue::try_from(value) {
            self.0.insert(name, value);
        }
    }
}

/// The trace context carried by incoming headers (`traceparent`, `tracestate`). Always W3C,
/// whatever propagator is installed: the mesh's own hops speak it.
pub fn extract_context(headers: &HeaderMap) -> Context {
    TraceContextPropagator::new().extract(&HeaderExtractor(headers))
}

/// Writes `cx` into outgoing headers with the process's propagator: W3C trace context once
/// [`crate::telemetry::init`] has installed it, nothing with OpenTelemetry's default no-op
/// propagator (a library used outside a Tessera process adds no headers of its own).
pub fn inject_context(cx: &Context, headers: &mut HeaderMap) {
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(cx, &mut HeaderInjector(headers));
    });
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId};

    use super::*;

    #[test]
    fn what_is_injected_is_extracted() {
        let remote = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::SAMPLED,
            true,
            Default::default(),
        );
        let cx = Context::new().with_remote_span_context(remote.clone());
        let mut headers = HeaderMap::new();
        TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(&mut headers));
        assert_eq!(
            headers[TRACEPARENT],
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        let back = extract_context(&headers);
        assert_eq!(back.span().span_context().trace_id(), remote.trace_id());
        assert_eq!(back.span().span_context().span_id(), remote.span_id());
        assert!(back.span().span_context().is_remote());
        // Nothing to extract: an empty context, not an error.
        assert!(
            !extract_context(&HeaderMap::new())
                .span()
                .span_context()
                .is_valid()
        );
    }
}
