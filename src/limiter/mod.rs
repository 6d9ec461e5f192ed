//! Per-key rate limits decided on the Verify path (credits, shared the same
//! way in Redis mode, are [`crate::credits`]).
//!
//! - [`local`]: every replica counts by itself (`rate_limit_mode =
//!   "local"`), exact on one replica, in memory, with GCRA.
//! - [`leased`]: the fleet shares one bucket per limit in Redis
//!   (`rate_limit_mode = "redis"`); each replica holds a small lease of its
//!   tokens and tops it up in the background, so a call does not wait on
//!   Redis in the steady state. The overshoot this allows is bounded by
//!   the leases the replicas hold (docs/decisions.md, ADR 38).
//!
//! [`Limiter`] is what the Verifier holds: one of the two, counting the
//! decisions either way. The Redis backoff both fleet tiers follow is
//! `backoff`.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use chrono::{DateTime, Utc};

use crate::keys::{LimitStatus, RateLimits};

pub(crate) mod backoff;
pub mod leased;
pub mod local;

pub use leased::LeasedLimiter;
pub use local::LocalLimiter;

/// This replica's rate limiter.
#[derive(Debug)]
pub struct Limiter {
    local: Arc<LocalLimiter>,
    leased: Option<Arc<LeasedLimiter>>,
    allowed: AtomicU64,
    limited: AtomicU64,
}

impl Limiter {
    /// Limits counted on this replica alone.
    pub fn local() -> Self {
        Self::with(Arc::new(LocalLimiter::default()), None)
    }

    /// Limits shared by the fleet through `leased`, whose per-replica
    /// fallback is `local`.
    pub fn leased(local: Arc<LocalLimiter>, leased: Arc<LeasedLimiter>) -> Self {
        Self::with(local, Some(leased))
    }

    fn with(local: Arc<LocalLimiter>, leased: Option<Arc<LeasedLimiter>>) -> Self {
        Self { local, leased, allowed: AtomicU64::new(0), limited: AtomicU64::new(0) }
    }

    /// Takes one token from every limit of `key_id`, or none if any is
    /// empty. `Ok` carries the tightest limit (fewest calls left), `Err`
    /// the limit that refused. A key without limits is `Ok(None)` at once.
    pub async fn check(
        &self,
        key_id: &Arc<str>,
        rate_limits: &RateLimits,
        now: DateTime<Utc>,
    ) -> Result<Option<LimitStatus>, LimitStatus> {
        if rate_limits.is_empty() {
            return Ok(None);
        }
        let decided = match &self.leased {
            None => self.local.check(key_id, rate_limits, now),
            Some(leased) => leased.check(key_id, rate_limits, now).await,
        };
        let counter = if decided.is_ok() { &self.allowed } else { &self.limited };
        counter.fetch_add(1, Ordering::Relaxed);
        decided
    }

    /// Checks of limited keys that were admitted.
    pub fn allowed(&self) -> u64 {
        self.allowed.load(Ordering::Relaxed)
    }

    /// Checks refused for an empty limit.
    pub fn limited(&self) -> u64 {
        self.limited.load(Ordering::Relaxed)
    }

    /// Keys whose limits hold state on this replica now.
    pub fn tracked(&self) -> usize {
        self.local.tracked() + self.leased.as_ref().map_or(0, |l| l.tracked())
    }

    /// Whether fleet-wide limits are following the failure mode because
    /// Redis cannot grant leases.
    pub fn degraded(&self) -> bool {
        self.leased.as_ref().is_some_and(|l| l.degraded())
    }
}
