//! Generates the gRPC code and the reflection descriptor set from
//! `proto/kms_sidecar/v1/kms_sidecar.proto` (and the benchmarks' echo
//! service), with the `protoc` shipped by `protoc-bin-vendored` (the
//! machines that build this have no `protoc`).

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/kms_sidecar/v1/kms_sidecar.proto";
    let echo = "benches/proto/echo.proto";
    println!("cargo:rerun-if-changed={proto}");
    println!("cargo:rerun-if-changed={echo}");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);

    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);

    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("kms_sidecar_descriptor.bin"))
        // Messages that carry plaintext or data keys get a hand-written,
        // redacted Debug in src/api.rs instead of the derived one.
        .skip_debug([
            "kms_sidecar.v1.GenerateDataKeyResponse",
            "kms_sidecar.v1.WrapRequest",
            "kms_sidecar.v1.UnwrapResponse",
            "kms_sidecar.v1.WrapStreamRequest",
            "kms_sidecar.v1.UnwrapStreamResponse",
        ])
        .compile_with_config(config, &[proto], &["proto"])?;

    // The benchmarks' transport baseline (included by benches/ only).
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure().compile_with_config(config, &[echo], &["benches/proto"])?;
    Ok(())
}
