//! Verify keywarden API keys in a Rust service.
//!
//! - [`Client`] (in `client`) calls `keywarden.v1.KeyVerify/Verify` over one
//!   shared channel with timeouts, and reports the statuses a service
//!   answered through batched `RecordOutcomes` calls in the background,
//!   from a bounded buffer (outcomes that do not fit are counted, never
//!   waited for).
//! - [`VerifyLayer`] (in `layer`) is a tower layer for axum and tonic
//!   services: it takes the key from `authorization: Bearer` or
//!   `x-api-key`, asks the service's route function which scope the request
//!   needs, calls Verify, and either puts a [`Grant`] into the request's
//!   extensions or answers 401, 403, 429 or 503 the way keywarden's Envoy
//!   gateway does. It keeps no decision cache: a revocation is the server's
//!   to enforce, at once.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use keywarden_client::{Client, Requirement, VerifyLayer};
//! let client = Client::builder(tonic::transport::Endpoint::from_static("http://keywarden:50051")).connect_lazy();
//! let layer = VerifyLayer::new(client.clone(), |method: &http::Method, path: &str| match (method.as_str(), path) {
//!     ("POST", "/invoices") => Requirement::scope("invoice:write"),
//!     ("GET", "/invoices") => Requirement::scope("invoice:read"),
//!     _ => Requirement::NoRoute,
//! });
//! // router.layer(layer) …, and at shutdown:
//! client.flush().await;
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]

mod client;
mod layer;

pub use client::{Builder, Client, Decision, Error, Grant, Refusal};
pub use layer::{Denial, Requirement, VerifyLayer, VerifyService};

/// The generated KeyVerify messages and client.
pub mod pb {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("keywarden.v1");

    impl std::fmt::Debug for VerifyRequest {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("VerifyRequest")
                .field("key", &"[redacted]")
                .field("ip", &self.ip)
                .field("required_scope", &self.required_scope)
                .field("endpoint", &self.endpoint)
                .field("method", &self.method)
                .finish()
        }
    }
}
