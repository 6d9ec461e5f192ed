//! keywarden: verification of merchants' scoped API keys over gRPC.
pub mod api;
pub mod audit;
pub mod cache;
pub mod cli;
pub mod clock;
pub mod config;
pub mod keys;
pub mod metrics;
pub mod service;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod usage;
