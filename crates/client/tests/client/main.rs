//! The client over real sockets: replicas are small UserService servers on 127.0.0.1:0 that
//! count calls, sleep, fail, and record what they were sent.

#![allow(clippy::unwrap_used)]

mod balancing;
mod discovery;
mod mtls;
mod propagation;
mod retries;
mod support;
