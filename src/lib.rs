//! Tessera's Protobuf contracts, compiled by `build.rs` into typed servers and clients.
//!
//! Nothing here is written by hand beyond the module tree: the messages, the service traits
//! and clients come from `proto/`, and [`FILE_DESCRIPTOR_SET`] is what server reflection
//! serves and what the mesh reads access rules from. Behaviour lives in `crates/` and
//! `services/`.

/// The encoded `google.protobuf.FileDescriptorSet` of every contract, with source info.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("tessera_descriptor");

/// `google.api`: the `google.api.http` method option (vendored under `proto/google/api/`)
/// that maps public methods onto HTTP/JSON paths.
pub mod google {
    pub mod api {
        tonic::include_proto!("google.api");
    }
}

/// `tessera.mesh.v1`: the access-rule method option.
pub mod mesh {
    pub mod v1 {
        tonic::include_proto!("tessera.mesh.v1");
    }
}

/// `tessera.users.v1`: accounts, credentials and token keys.
pub mod users {
    pub mod v1 {
        tonic::include_proto!("tessera.users.v1");
    }
}

/// `tessera.posts.v1`: posts.
pub mod posts {
    pub mod v1 {
        tonic::include_proto!("tessera.posts.v1");
    }
}

/// `tessera.comments.v1`: comments on posts.
pub mod comments {
    pub mod v1 {
        tonic::include_proto!("tessera.comments.v1");
    }
}

/// `tessera.notifications.v1`: per-user notifications.
pub mod notifications {
    pub mod v1 {
        tonic::include_proto!("tessera.notifications.v1");
    }
}

/// `tessera.gateway.v1`: views composed by the public gateway.
pub mod gateway {
    pub mod v1 {
        tonic::include_proto!("tessera.gateway.v1");
    }
}

/// `tessera.digest.v1`: the example service another team adds (`examples/digest`).
pub mod digest {
    pub mod v1 {
        tonic::include_proto!("tessera.digest.v1");
    }
}
