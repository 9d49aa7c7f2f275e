//! Compiles `proto/cowsnap/v1/*.proto` into the crate (OUT_DIR) with the
//! vendored protoc, and writes the file descriptor set the reflection
//! service serves. Nothing generated is committed.

use std::path::PathBuf;

fn main() {
    let proto_root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../proto");
    let files = ["cowsnap/v1/checkpoint.proto", "cowsnap/v1/migration.proto"];
    for file in &files {
        println!("cargo:rerun-if-changed={}", proto_root.join(file).display());
    }
    let protoc = protoc_bin_vendored::protoc_bin_path().expect("vendored protoc for this host");
    let include = protoc_bin_vendored::include_path().expect("vendored protoc's include dir");
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("cowsnap_v1_descriptor.bin"))
        .compile_with_config(
            config,
            &files.map(|f| proto_root.join(f)),
            &[proto_root, include],
        )
        .expect("compile proto/cowsnap/v1");
}
