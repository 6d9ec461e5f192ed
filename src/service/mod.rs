//! The use cases, composed from the pure key domain and the runtime parts:
//! [`admin::KeyManager`] for KeyAdmin (its committed changes go out through
//! [`events`]), [`verify::Verifier`] for KeyVerify and [`outcomes`] for
//! RecordOutcomes and the access-log stream; [`leaks::Leaks`] judges leak
//! reports and revokes the keys they prove.
//! Inputs are validated here (the API layer only decodes), and every failure
//! is a [`ServiceError`] that `api::status` maps to a gRPC status in one place.

pub mod access;
pub mod admin;
pub mod events;
pub mod gateway;
pub mod hash_pool;
pub mod leaks;
pub mod operators;
pub mod outcomes;
pub mod page;
pub mod peppers;
pub mod rehash;
pub mod validate;
pub mod verify;

use std::sync::Arc;

use thiserror::Error;

use crate::{
    clock::DbClock,
    keys::{KeyHasher, KeyPrefix, ScopeCatalogue},
    store::{Store, StoreError},
    usage::UsageTracker,
};

/// What both use cases are built from.
#[derive(Debug, Clone)]
pub struct Deps {
    pub store: Store,
    pub hasher: KeyHasher,
    pub pool: hash_pool::HashPool,
    pub catalogue: Arc<ScopeCatalogue>,
    pub prefix: KeyPrefix,
    pub usage: Arc<UsageTracker>,
    /// The database's clock, on which revocation and expiry are decided.
    pub clock: Arc<DbClock>,
}

/// One invalid request field and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: String,
    pub description: String,
}

impl FieldViolation {
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self { field: field.into(), description: description.into() }
    }
}

#[derive(Debug, Clone, Error)]
pub enum ServiceError {
    #[error("invalid argument: {}", describe(.0))]
    Invalid(Vec<FieldViolation>),
    #[error("{0} not found")]
    NotFound(&'static str),
    /// No valid credentials (KeyAdmin).
    #[error("{0}")]
    Unauthenticated(String),
    /// Outside the caller's role or merchants (KeyAdmin).
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    FailedPrecondition(String),
    /// A dependency (the database) is unreachable; the call may be retried.
    #[error("{0}")]
    Unavailable(String),
    /// Cold verification capacity is exhausted; retry later.
    #[error("{0}")]
    Overloaded(String),
    /// This replica's share of a dependency is in use (Verify's database
    /// lane): answered UNAVAILABLE like an outage, but it says nothing
    /// about the dependency itself, so nothing is marked down.
    #[error("{0}")]
    Busy(String),
    /// A fault of ours; the cause is logged, never sent to the caller.
    #[error("internal error: {0}")]
    Internal(String),
}

fn describe(violations: &[FieldViolation]) -> String {
    violations.iter().map(|v| format!("{}: {}", v.field, v.description)).collect::<Vec<_>>().join("; ")
}

impl ServiceError {
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self::Invalid(vec![FieldViolation::new(field, description)])
    }
}

impl From<StoreError> for ServiceError {
    fn from(e: StoreError) -> Self {
        if e.is_unavailable() {
            // The driver's text (hosts, statements) stays in the log.
            tracing::warn!(error = %e, "the key store is unavailable");
            Self::Unavailable("the key store is unavailable; retry with backoff".into())
        } else {
            Self::Internal(e.to_string())
        }
    }
}

impl From<crate::store::lane::LaneError> for ServiceError {
    fn from(e: crate::store::lane::LaneError) -> Self {
        match e {
            crate::store::lane::LaneError::Busy => Self::Busy(e.to_string()),
            crate::store::lane::LaneError::Closed => Self::Unavailable(e.to_string()),
        }
    }
}

impl From<hash_pool::PoolError> for ServiceError {
    fn from(e: hash_pool::PoolError) -> Self {
        match e {
            hash_pool::PoolError::Busy => {
                Self::Overloaded("key hashing capacity is exhausted; retry with backoff".into())
            }
            hash_pool::PoolError::Stopped => Self::Unavailable("the server is shutting down".into()),
        }
    }
}

impl From<crate::keys::format::RandomnessUnavailable> for ServiceError {
    fn from(e: crate::keys::format::RandomnessUnavailable) -> Self {
        Self::Internal(e.to_string())
    }
}
