//! keywarden: verification of merchants' scoped API keys over gRPC.
pub mod keys;
