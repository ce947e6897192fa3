//! The call headers every hop reads or writes: `grpc-timeout` (the deadline) and
//! `authorization: Bearer` (the end user's token). One parser each, used by the server's
//! request path, the client and the gateway. The W3C trace context is
//! [`crate::telemetry::propagation`]'s.

use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};
use tonic::Status;

/// The header a call's deadline travels in.
pub const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// Reads a `grpc-timeout` value: up to eight digits and a unit (H, M, S, m, u, n).
pub fn parse_grpc_timeout(value: &HeaderValue) -> Option<Duration> {
    let (&unit, digits) = value.as_bytes().split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    // Eight digits cannot overflow a u64, nor an hour count of them a Duration.
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
pub fn encode_grpc_timeout(timeout: Duration) -> HeaderValue {
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

/// The token of an `authorization: Bearer <token>` header (scheme case-insensitive, the
/// token trimmed); UNAUTHENTICATED if the header is there but not of that form.
pub fn bearer_token(headers: &HeaderMap) -> Result<Option<&str>, Status> {
    let Some(value) = headers.get(http::header::AUTHORIZATION) else {
        return Ok(None);
    };
    let malformed = || Status::unauthenticated("the authorization header must be `Bearer <token>`");
    let value = value.to_str().map_err(|_| malformed())?;
    match value.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => {
            let token = token.trim();
            if token.is_empty() {
                Err(malformed())
            } else {
                Ok(Some(token))
            }
        }
        _ => Err(malformed()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn timeouts_parse_and_round_trip_in_the_finest_unit() {
        let parse = |v: &'static str| parse_grpc_timeout(&HeaderValue::from_static(v));
        assert_eq!(parse("50m"), Some(Duration::from_millis(50)));
        assert_eq!(parse("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(
            parse("99999999H"),
            Some(Duration::from_secs(99_999_999 * 3600))
        );
        for bad in ["", "m", "S", "123456789m", "5x", "-5m", "1.5S", " 1S"] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
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
            let v = encode_grpc_timeout(d);
            assert_eq!(v, text);
            let back = parse_grpc_timeout(&v).unwrap();
            assert!(back <= d && d - back <= d / 1000, "{d:?} -> {v:?}");
        }
    }

    #[test]
    fn bearer_parsing() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer_token(&h).ok(), Some(None));
        for (value, token) in [("Bearer abc", "abc"), ("bearer  abc ", "abc")] {
            h.insert("authorization", HeaderValue::from_static(value));
            assert_eq!(bearer_token(&h).ok(), Some(Some(token)), "{value:?}");
        }
        for bad in ["Basic abc", "Bearer", "Bearer ", "Bearer   ", "abc"] {
            h.insert("authorization", HeaderValue::from_static(bad));
            let err = bearer_token(&h).unwrap_err();
            assert_eq!(err.code(), tonic::Code::Unauthenticated, "{bad:?}");
        }
    }
}
