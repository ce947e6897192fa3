//! What an outgoing call carries from the incoming one: `grpc-timeout`, the end user's bearer
//! token and the W3C trace context.

use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, header::AUTHORIZATION};
use opentelemetry::propagation::Injector;
use tracing_opentelemetry::OpenTelemetrySpanExt;

pub(crate) const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// Reads a `grpc-timeout` value: up to eight digits and a unit (H, M, S, m, u, n).
pub(crate) fn parse_timeout(value: &HeaderValue) -> Option<Duration> {
    let value = value.as_bytes();
    let (&unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = digits
        .iter()
        .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Writes a `grpc-timeout` value in the finest unit that fits eight digits, rounding down (the
/// server sees at most the time that is really left).
pub(crate) fn encode_timeout(timeout: Duration) -> HeaderValue {
    const MAX: u128 = 99_999_999;
    let secs = u128::from(timeout.as_secs());
    let (n, unit) = [
        (timeout.as_nanos(), b'n'),
        (timeout.as_micros(), b'u'),
        (timeout.as_millis(), b'm'),
        (secs, b'S'),
        (secs / 60, b'M'),
    ]
    .into_iter()
    .find(|(n, _)| *n <= MAX)
    .unwrap_or(((secs / 3600).min(MAX), b'H'));
    let mut buf = [0u8; 9];
    let mut start = 8;
    buf[8] = unit;
    let mut n = n;
    loop {
        start -= 1;
        buf[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 || start == 0 {
            break;
        }
    }
    // Digits and a unit letter are always a valid header value.
    HeaderValue::from_bytes(&buf[start..]).unwrap_or(HeaderValue::from_static("99999999H"))
}

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
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&cx, &mut HeaderInjector(headers));
    });
}

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn timeouts_round_trip_in_the_finest_unit() {
        for (d, text) in [
            (Duration::from_nanos(50), "50n"),
            (Duration::from_millis(200), "200000u"),
            (Duration::from_millis(199), "199000u"),
            (Duration::from_secs(30), "30000000u"),
            (Duration::from_secs(100), "100000m"),
            (Duration::from_secs(200_000), "200000S"),
            (Duration::from_secs(10_000_000_000), "2777777H"),
            (Duration::ZERO, "0n"),
        ] {
            let v = encode_timeout(d);
            assert_eq!(v, text);
            let back = parse_timeout(&v).unwrap();
            assert!(back <= d && d - back <= d / 1000, "{d:?} -> {v:?}");
        }
        for bad in ["", "S", "123456789S", "10x", "-1S", "1.5S"] {
            assert!(
                parse_timeout(&HeaderValue::from_static(bad)).is_none(),
                "{bad}"
            );
        }
        assert_eq!(
            parse_timeout(&HeaderValue::from_static("2M")),
            Some(Duration::from_secs(120))
        );
    }

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
