//! The library behind the `tessera` binary: starting one service or the whole mesh from
//! settings, development certificates, and the health probe. The binary is a thin command
//! line over it, and the end-to-end tests start the mesh through it in-process.
//!
//! Not for: service logic (that is `services/*`) or the platform (`tessera-mesh`).

#![forbid(unsafe_code)]

pub mod certs;
pub mod cursor;
pub mod database;
pub mod databases;
pub mod keys;
pub mod openapi;
pub mod probe;
mod readiness;
pub mod supervise;
pub mod up;
pub mod wiring;
pub mod workloads;
