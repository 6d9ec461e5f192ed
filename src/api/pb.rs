//! Generated protobuf types and gRPC stubs for `keywarden.v1`, and the
//! descriptor set that server reflection serves.
//!
//! Messages that carry plaintext keys have hand-written Debug impls that
//! redact them (build.rs turns the derived ones off), so a stray `{:?}` in a
//! log line cannot leak a key.

#![allow(clippy::all, clippy::pedantic, missing_docs)]

use std::fmt;

tonic::include_proto!("keywarden.v1");

/// Encoded `FileDescriptorSet` of every keywarden proto file and its imports.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/keywarden_descriptor.bin"));

/// Encoded `FileDescriptorSet` of Envoy's ext_authz and access-log
/// services and their imports (the Rust types come from envoy-types).
pub const ENVOY_FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/envoy_descriptor.bin"));

const REDACTED: &str = "[redacted]";

impl fmt::Debug for VerifyRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifyRequest")
            .field("key", &REDACTED)
            .field("ip", &self.ip)
            .field("required_scope", &self.required_scope)
            .field("endpoint", &self.endpoint)
            .field("method", &self.method)
            .finish()
    }
}

impl fmt::Debug for CreateKeyResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreateKeyResponse")
            .field("api_key", &self.api_key)
            .field("plaintext_key", &REDACTED)
            .finish()
    }
}

impl fmt::Debug for RegenerateKeyResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegenerateKeyResponse")
            .field("api_key", &self.api_key)
            .field("plaintext_key", &REDACTED)
            .field("previous_key", &self.previous_key)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_with_plaintext_keys_redact_them() {
        let key = "sntr_0123456789abcdefghijklmnopqrstuvwxyzABCDEFG000000";
        let shown = [
            format!("{:?}", VerifyRequest { key: key.into(), ..Default::default() }),
            format!("{:?}", CreateKeyResponse { plaintext_key: key.into(), ..Default::default() }),
            format!("{:?}", RegenerateKeyResponse { plaintext_key: key.into(), ..Default::default() }),
        ];
        for s in shown {
            assert!(!s.contains(key) && s.contains(REDACTED), "{s}");
        }
    }
}
