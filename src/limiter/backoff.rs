//! What a lease-holding part does while Redis cannot grant leases: calls
//! that need one go without asking for a second, then one call (claimed by
//! a compare-and-swap) asks again; entering and leaving that state is
//! logged once each way.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::fleet::FleetError;

/// After Redis failed to grant a lease, how long calls that need one go
/// without asking before one of them tries again (µs).
pub const RETRY_US: u128 = 1_000_000;

#[derive(Debug)]
pub(crate) struct Backoff {
    /// µs since the epoch until which calls skip Redis; 0 while it answers.
    retry_at: AtomicU64,
    degraded: AtomicBool,
    /// What is logged on failing and on recovering.
    failing: String,
    recovering: &'static str,
}

impl Backoff {
    pub(crate) fn new(failing: String, recovering: &'static str) -> Self {
        Self { retry_at: AtomicU64::new(0), degraded: AtomicBool::new(false), failing, recovering }
    }

    /// Whether calls should not ask Redis now; past the retry time, the
    /// one call that claims it asks.
    pub(crate) fn skipping(&self, now: u128) -> bool {
        let at = self.retry_at.load(Ordering::Relaxed);
        if at == 0 {
            return false;
        }
        if now < u128::from(at) {
            return true;
        }
        let next = u64::try_from(now + RETRY_US).unwrap_or(u64::MAX);
        self.retry_at.compare_exchange(at, next, Ordering::Relaxed, Ordering::Relaxed).is_err()
    }

    pub(crate) fn failed(&self, now: u128, error: &FleetError) {
        let next = u64::try_from(now + RETRY_US).unwrap_or(u64::MAX);
        self.retry_at.store(next, Ordering::Relaxed);
        if !self.degraded.swap(true, Ordering::Relaxed) {
            tracing::warn!(%error, "{}", self.failing);
        }
    }

    pub(crate) fn recovered(&self) {
        self.retry_at.store(0, Ordering::Relaxed);
        if self.degraded.swap(false, Ordering::Relaxed) {
            tracing::info!("{}", self.recovering);
        }
    }

    pub(crate) fn degraded(&self) -> bool {
        self.degraded.load(Ordering::Relaxed)
    }
}
