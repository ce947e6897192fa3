//! The end-to-end test crate: tests of Tessera as deployed, across services and processes, and
//! of its deployment artefacts (`tests/k8s.rs`: the shape of the Kubernetes manifests). The
//! tests live under `tests/`; what they share comes from `tessera-testing` (the whole mesh
//! started in-process, TLS clients, `eventually`), re-exported here so each suite imports it
//! from one place. Nothing here is for use outside the tests.
#![forbid(unsafe_code)]

pub use tessera_testing::{
    BOUND, bearer, eventually,
    mesh::{PASSWORD, TestMesh, TestUser, spawn_mesh},
    tls::{connect_tls, server_only_tls, tls_connect},
};
