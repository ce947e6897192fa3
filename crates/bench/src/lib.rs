//! Tessera's benchmark: what the in-process mesh costs per hop next to bare tonic and next to
//! an Envoy sidecar (scenario A), and how the whole mesh does end to end through the gateway
//! on a seeded dataset (scenario B). `scripts/bench.sh` runs both with one command.
//!
//! The load generator speaks gRPC over its own thin HTTP/2 connections (plaintext, TLS or
//! mTLS), drives closed loops (N calls in flight) and open loops (a fixed rate, latency
//! charged from each request's due time, so stalls are not hidden by coordinated omission),
//! records HdrHistogram percentiles, checks every answer's gRPC status and content, and reads
//! servers' CPU time and resident memory from `/proc` — so servers run as separate processes,
//! pinned to a core of their own when `taskset` is there.
//!
//! Not for: timed assertions in tests (numbers depend on the machine; the unit tests here
//! check the load generator's logic), or load against anything but loopback.

#![forbid(unsafe_code)]

pub mod cgroup;
pub mod client;
pub mod compare;
pub mod envoy;
pub mod load;
pub mod monolith;
pub mod procfs;
pub mod procs;
pub mod report;
pub mod scenario_a;
pub mod scenario_b;
pub mod scenario_c;
pub mod schedule;
pub mod server;
pub mod stats;

/// Everything that can stop a benchmark run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A file, socket or child process failed.
    #[error("{what}: {source}")]
    Io {
        /// What the benchmark was doing, e.g. the path it wrote.
        what: String,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// A server's `/proc` entry was missing or not in the expected form.
    #[error("/proc/{pid}: cannot read {what}")]
    Proc {
        /// The server process (or 0 for a machine-wide file).
        pid: u32,
        /// The file or field that could not be read.
        what: String,
    },
    /// A gRPC call outside the measured load (seeding, logging in) failed.
    #[error("{what}: {status}")]
    Call {
        /// The call, as the run names it.
        what: String,
        /// The status it failed with.
        status: tonic::Status,
    },
    /// The run could not be set up: certificates, a server's start, cgroups, a bad option.
    #[error("{0}")]
    Setup(String),
}

impl BenchError {
    /// A `map_err` adapter: a failed call's status as [`BenchError::Call`] naming `what`.
    pub fn call(what: impl Into<String>) -> impl FnOnce(tonic::Status) -> BenchError {
        let what = what.into();
        move |status| BenchError::Call { what, status }
    }
}
