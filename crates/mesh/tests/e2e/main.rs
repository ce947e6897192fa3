//! End-to-end tests of the mesh platform: a real posts workload on 127.0.0.1:0 with
//! certificates from a throwaway CA, called by clients that present real SPIFFE identities.
//! One test binary; each test spawns its own workload. (Tracing is tested in `trace_context.rs`,
//! a binary of its own, because it installs the process-wide subscriber.)

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

mod lifecycle;
mod limits;
mod metrics;
mod mtls;
mod public;
mod reflection;
mod rotation;
mod tokens;
