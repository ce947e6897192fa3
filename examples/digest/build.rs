//! Compiles this service's contract, `proto/tessera/digest/v1/digest.proto`, into its typed
//! server and client, and writes its descriptor set (server reflection serves it; the mesh
//! reads its access rules from it).
//!
//! The contract imports the platform's protos (the mesh options its access rules are written
//! in, and PostService's `Post`, which a digest returns) from the repository's `proto/`; their
//! Rust types are the `tessera` crate's, not generated again.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let here = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let own = here.join("proto");
    let platform = here.join("../../proto");
    let mut config = prost_build::Config::new();
    // As the `tessera` crate does: a vendored protoc unless PROTOC is set.
    if env::var_os("PROTOC").is_none() {
        config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    }
    let out = PathBuf::from(env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("digest_descriptor.bin"))
        .extern_path(".tessera.posts.v1", "::tessera::posts::v1")
        .extern_path(".tessera.mesh.v1", "::tessera::mesh::v1")
        .compile_with_config(
            config,
            &[own.join("tessera/digest/v1/digest.proto")],
            &[own.clone(), platform, protoc_bin_vendored::include_path()?],
        )?;
    println!("cargo:rerun-if-changed={}", own.display());
    println!(
        "cargo:rerun-if-changed={}",
        here.join("../../proto").display()
    );
    Ok(())
}
