//! Compiles `proto/` into the gRPC types and the descriptor set that server
//! reflection serves. Uses the vendored `protoc` unless `PROTOC` is set, so a
//! fresh machine needs no system install.

use std::{env, path::PathBuf};

/// Envoy's ext_authz and access-log services as a descriptor set, for server reflection
/// only: envoy-types provides the Rust types (third_party/envoy-protos).
fn envoy_descriptors(out_dir: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
    let protoc = match env::var_os("PROTOC") {
        Some(p) => PathBuf::from(p),
        None => protoc_bin_vendored::protoc_bin_path()?,
    };
    let status = std::process::Command::new(protoc)
        .arg("-I")
        .arg("third_party/envoy-protos")
        .arg("-I")
        .arg(protoc_bin_vendored::include_path()?)
        .arg("--include_imports")
        .arg(format!("--descriptor_set_out={}", out_dir.join("envoy_descriptor.bin").display()))
        .arg("envoy/service/auth/v3/external_auth.proto")
        .arg("envoy/service/accesslog/v3/als.proto")
        .status()?;
    if !status.success() {
        return Err(format!("protoc failed on third_party/envoy-protos: {status}").into());
    }
    println!("cargo:rerun-if-changed=third_party/envoy-protos");
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let protos = [
        "proto/keywarden/v1/types.proto",
        "proto/keywarden/v1/admin.proto",
        "proto/keywarden/v1/verify.proto",
    ];
    let mut config = tonic_prost_build::Config::new();
    // Edition 2024 makes set_var unsafe and the crate forbids unsafe code, so
    // the vendored binary is handed to prost-build directly.
    if env::var_os("PROTOC").is_none() {
        config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    }
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("keywarden_descriptor.bin"))
        // These messages carry plaintext keys: api::pb gives them redacting
        // Debug impls instead of the derived ones.
        .skip_debug([
            "keywarden.v1.VerifyRequest",
            "keywarden.v1.CreateKeyResponse",
            "keywarden.v1.RegenerateKeyResponse",
        ])
        .compile_with_config(config, &protos, &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    envoy_descriptors(&out_dir)?;
    // An empty KEYWARDEN_TEST_POSTGRES_URL opts out of the PostgreSQL test
    // runs: they are then compiled as ignored, and reported so, instead of
    // passing without running.
    println!("cargo::rustc-check-cfg=cfg(skip_postgres_tests)");
    println!("cargo:rerun-if-env-changed=KEYWARDEN_TEST_POSTGRES_URL");
    if env::var_os("KEYWARDEN_TEST_POSTGRES_URL").is_some_and(|url| url.is_empty()) {
        println!("cargo:rustc-cfg=skip_postgres_tests");
    }
    // The clock-skew test runs replicas under libfaketime (Debian's
    // `faketime` package; .ci/run installs it). Without it that test is
    // compiled as ignored, and reported so.
    println!("cargo::rustc-check-cfg=cfg(skip_faketime_tests)");
    println!("cargo:rerun-if-env-changed=KEYWARDEN_TEST_FAKETIME");
    let faketime = env::var_os("KEYWARDEN_TEST_FAKETIME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1"));
    if faketime.exists() {
        println!("cargo:rerun-if-changed={}", faketime.display());
        println!("cargo:rustc-env=KEYWARDEN_TEST_FAKETIME_LIB={}", faketime.display());
    } else {
        println!("cargo:rustc-cfg=skip_faketime_tests");
        println!("cargo:rustc-env=KEYWARDEN_TEST_FAKETIME_LIB=");
    }
    Ok(())
}
