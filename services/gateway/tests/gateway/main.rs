//! The gateway's tests over in-process channels: no sockets, fake downstream services that
//! count their calls.

#![allow(clippy::unwrap_used)]

mod cache;
mod edge;
mod fakes;
mod feed;
mod http_json;
mod proxy;
