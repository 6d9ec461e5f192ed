//! Generates the KeyVerify client from the service's own protos (`../proto`),
//! with the vendored `protoc` unless `PROTOC` is set.

use std::env;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = tonic_prost_build::Config::new();
    if env::var_os("PROTOC").is_none() {
        config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    }
    tonic_prost_build::configure()
        .build_server(false)
        // Carries the plaintext key: the crate gives it a redacting Debug.
        .skip_debug(["keywarden.v1.VerifyRequest"])
        .compile_with_config(
            config,
            &["../proto/keywarden/v1/types.proto", "../proto/keywarden/v1/verify.proto"],
            &["../proto"],
        )?;
    println!("cargo:rerun-if-changed=../proto/keywarden/v1");
    Ok(())
}
