//! What Tessera's tests share, so that each test suite does not write it again:
//!
//! - [`fakes`]: in-memory upstream services (posts, comments, users) and their event logs, for
//!   testing a service without the services it calls;
//! - [`eventually()`] and [`eventually!`]: wait for a condition under a bound instead of
//!   sleeping for a guessed time;
//! - [`as_user`]: a request as the server stack hands it to a handler after checking an end
//!   user's token;
//! - [`tls`]: workload certificates from a test CA, and TLS clients of a test server;
//! - `mesh` (feature `mesh`): the whole mesh started in-process on free loopback ports, with
//!   clients for its public and internal ports.
//!
//! Test databases are the store's business: `tessera_store::testing`.
#![forbid(unsafe_code)]

mod eventually;
pub mod fakes;
#[cfg(feature = "mesh")]
pub mod mesh;
pub mod tls;

#[doc(hidden)]
pub use anyhow;
pub use eventually::{BOUND, eventually, eventually_blocking};

/// `msg` as a request from the verified end user `sub` with `role` ("USER", "MODERATOR",
/// "ADMIN"), as the server stack leaves it for a handler after checking the token.
pub fn as_user<T>(sub: &str, role: &str, msg: T) -> tonic::Request<T> {
    use tessera_mesh::auth::{EndUser, UserClaims};
    let mut req = tonic::Request::new(msg);
    req.extensions_mut().insert(EndUser {
        claims: UserClaims {
            sub: sub.to_owned(),
            role: role.to_owned(),
            exp: u64::MAX / 2,
            iat: 0,
        },
        token: "test-token".into(),
    });
    req
}

/// `message` with `authorization: Bearer <token>`, as an end user's client sends it.
pub fn bearer<T>(token: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    let value = format!("Bearer {token}")
        .parse()
        .unwrap_or_else(|e| panic!("{token:?} cannot be a header value: {e}"));
    request.metadata_mut().insert("authorization", value);
    request
}
