//! The platform every Tessera service stands on.
//!
//! A service written against this crate only writes handlers: workload identity from mTLS
//! certificates, access rules read from the contracts, end-user token checks, health on the
//! service and admin ports, server reflection, tracing and metrics, deadlines, load shedding
//! and graceful shutdown come from here, the same way for every service.
//!
//! Not for: typed downstream clients (`tessera-client`), storage (`tessera-store`), or
//! anything a single service decides.

#![forbid(unsafe_code)]

mod admin;
pub mod auth;
pub mod certs;
pub mod coalesce;
pub mod config;
pub mod context;
pub mod contracts;
pub mod edge;
pub mod errors;
pub mod events;
pub mod headers;
pub mod identity;
pub mod metrics;
pub mod netpol;
pub mod policy;
pub mod private;
pub mod public_tls;
pub mod reflection;
pub mod server;
pub mod service_limits;
pub mod shutdown;
pub mod stack;
pub mod telemetry;
pub mod tls;
pub mod token;
pub mod token_cache;
