//! Tessera's Protobuf contracts, compiled by `build.rs` into typed servers and clients.
//!
//! Nothing here is written by hand: the module tree (`tessera::posts::v1`, …) is generated
//! from the packages under `proto/`, with the messages, service traits and clients prost and
//! tonic generate, plus a `<service>_methods` module per service holding each method's gRPC
//! path (`posts::v1::post_service_methods::GET_POST`). [`FILE_DESCRIPTOR_SET`] is what server
//! reflection serves and what the mesh reads access rules from. Behaviour lives in `crates/`
//! and `services/`.
//!
//! ```
//! use tessera::posts::v1::{post_service_methods, post_service_server::PostServiceServer};
//! use tonic::server::NamedService;
//!
//! let service = <PostServiceServer<()> as NamedService>::NAME;
//! assert_eq!(service, "tessera.posts.v1.PostService");
//! assert_eq!(post_service_methods::GET_POST, format!("/{service}/GetPost"));
//! assert!(post_service_methods::ALL.contains(&post_service_methods::WATCH_EVENTS));
//! ```

/// The encoded `google.protobuf.FileDescriptorSet` of every contract, with source info.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("tessera_descriptor");

include!(concat!(env!("OUT_DIR"), "/tessera_modules.rs"));
