//! The end-to-end test crate: tests of Tessera as deployed, across services and processes, and
//! of its deployment artefacts (`tests/k8s.rs`: the shape of the Kubernetes manifests). The
//! tests live under `tests/`; this library holds only what they share, and nothing here is
//! for use outside the tests.
#![forbid(unsafe_code)]
