//! Compiles every contract under `proto/` into typed servers and clients, and writes the
//! descriptor set that server reflection serves and the access rules are read from.

use std::{env, path::PathBuf};

const PROTOS: &[&str] = &[
    "proto/google/api/http.proto",
    "proto/google/api/annotations.proto",
    "proto/tessera/mesh/v1/options.proto",
    "proto/tessera/users/v1/users.proto",
    "proto/tessera/posts/v1/posts.proto",
    "proto/tessera/comments/v1/comments.proto",
    "proto/tessera/notifications/v1/notifications.proto",
    "proto/tessera/gateway/v1/feed.proto",
    "proto/tessera/digest/v1/digest.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = prost_build::Config::new();
    // A vendored protoc keeps the build working on a machine with only the Rust toolchain;
    // PROTOC still wins when set, for platforms the vendored binaries do not cover.
    if env::var_os("PROTOC").is_none() {
        config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    }
    let well_known = protoc_bin_vendored::include_path()?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let protos: Vec<PathBuf> = PROTOS.iter().map(PathBuf::from).collect();

    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("tessera_descriptor.bin"))
        .compile_with_config(config, &protos, &[PathBuf::from("proto"), well_known])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
