//! Fleet-wide rate limits (`rate_limit_mode = "redis"`): one bucket per
//! limit in Redis, from which each replica leases a few tokens at a time.
//!
//! A call spends a token this replica already holds, so it does not wait
//! on Redis; when the lease falls below half it is topped up in the
//! background. Only a replica holding no token for a limit (a key's first
//! call, or a burst faster than the top-up) waits for one lease, and calls
//! on the same key wait for that same lease rather than each asking.
//!
//! Tokens leave the shared bucket only through leases, and a replica holds
//! at most [`lease_size`] of each limit, so over any span the fleet admits
//! at most what one exact bucket admits plus the tokens held when the span
//! began: N × ⌈limit / 16⌉ for N replicas (ADR 38). Leased tokens unused
//! for a window lapse, so the error is an overshoot only by that bound and
//! otherwise an undershoot.
//!
//! When Redis cannot grant a lease, calls that need one follow
//! `rate_limit_on_redis_failure`; Redis is tried again a second later, by
//! one call.

use std::{
    collections::HashMap,
    hash::{BuildHasher, RandomState},
    sync::{Arc, LazyLock, Mutex, PoisonError},
};

use chrono::{DateTime, Utc};

use super::{
    backoff::{Backoff, RETRY_US},
    local::{LocalLimiter, tighter},
};
use crate::{
    config::OnRedisFailure,
    fleet::{FleetError, Redis, Script},
    keys::{
        LimitStatus, RateLimit, RateLimits,
        limits::{MAX_RATE_LIMITS, micros},
    },
    metrics::Metrics,
};

/// A lease is at most this fraction of a limit (rounded up).
pub const LEASE_FRACTION: u32 = 16;
const SHARDS: usize = 16;
const SWEEP_FLOOR: usize = 1_024;

static LEASE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lease.lua")));

/// Most tokens of a limit one replica holds at once.
pub fn lease_size(limit: u32) -> u32 {
    limit.div_ceil(LEASE_FRACTION)
}

pub struct LeasedLimiter {
    redis: Arc<Redis>,
    /// Counts on this replica when Redis cannot (`OnRedisFailure::Local`).
    fallback: Arc<LocalLimiter>,
    on_failure: OnRedisFailure,
    hasher: RandomState,
    shards: [Mutex<Shard>; SHARDS],
    backoff: Backoff,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for LeasedLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeasedLimiter")
            .field("on_failure", &self.on_failure)
            .field("degraded", &self.degraded())
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Shard {
    keys: HashMap<Arc<str>, Arc<KeyLease>>,
    sweep_at: usize,
}

/// One key's leases.
struct KeyLease {
    state: Mutex<LeaseState>,
    /// Held while a lease is asked for: one request per key in flight,
    /// which the key's other calls wait for instead of asking too.
    asking: tokio::sync::Mutex<()>,
}

struct LeaseState {
    limits: RateLimits,
    slots: [Slot; MAX_RATE_LIMITS],
    topping_up: bool,
}

/// What this replica holds of one limit, and what Redis last said of it.
#[derive(Debug, Default, Clone, Copy)]
struct Slot {
    held: u32,
    /// Whole tokens the shared bucket had left after the last lease.
    left: u32,
    /// Held tokens lapse at this time (µs): one window after the lease.
    expires_at: u128,
    /// The shared bucket had no token before this time (µs).
    empty_until: u128,
    /// The shared bucket was due full again at this time (µs).
    full_at: u128,
}

enum Take {
    Admitted { tightest: Option<LimitStatus>, top_up: bool },
    Empty(LimitStatus),
    NeedLease,
}

impl LeaseState {
    fn new(limits: &RateLimits) -> Self {
        Self { limits: limits.clone(), slots: [Slot::default(); MAX_RATE_LIMITS], topping_up: false }
    }

    /// Spends one held token of every limit, or none.
    fn take(&mut self, limits: &RateLimits, now: u128) -> Take {
        if self.limits != *limits {
            // Changed limits start over, as in local mode.
            *self = Self::new(limits);
        }
        let mut need = false;
        for (limit, slot) in limits.iter().zip(&mut self.slots) {
            if slot.expires_at <= now {
                slot.held = 0;
            }
            if slot.held == 0 {
                if slot.empty_until > now {
                    return Take::Empty(status(limit, 0, slot.full_at.max(now), now));
                }
                need = true;
            }
        }
        if need {
            return Take::NeedLease;
        }
        let mut tightest: Option<LimitStatus> = None;
        let mut top_up = false;
        for (limit, slot) in limits.iter().zip(&mut self.slots) {
            slot.held -= 1;
            top_up |= slot.held * 2 < lease_size(limit.limit);
            let remaining = slot.held.saturating_add(slot.left).min(limit.limit);
            let reset =
                now + u128::from(limit.limit - remaining) * window_us(limit) / u128::from(limit.limit);
            let s = status(limit, remaining, reset, now);
            if tightest.as_ref().is_none_or(|t| tighter(&s, t)) {
                tightest = Some(s);
            }
        }
        Take::Admitted { tightest, top_up }
    }
}

fn window_us(limit: &RateLimit) -> u128 {
    u128::from(limit.window_ms) * 1_000
}

fn status(limit: &RateLimit, remaining: u32, reset_us: u128, now: u128) -> LimitStatus {
    let at = |us: u128| {
        i64::try_from(us).ok().and_then(DateTime::from_timestamp_micros).unwrap_or(DateTime::<Utc>::MAX_UTC)
    };
    LimitStatus {
        name: Arc::clone(&limit.name),
        limit: limit.limit,
        remaining,
        reset_at: at(reset_us.max(now)),
        decided_at: at(now),
    }
}

/// The Redis key of one limit's shared bucket; the hash tag keeps a key's
/// limits in one cluster slot, so one script leases them all.
fn bucket(key_id: &str, limit: &RateLimit) -> String {
    format!("keywarden:rl:{{{key_id}}}:{}", limit.name)
}

impl LeasedLimiter {
    pub fn new(
        redis: Arc<Redis>,
        fallback: Arc<LocalLimiter>,
        on_failure: OnRedisFailure,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            redis,
            fallback,
            on_failure,
            hasher: RandomState::new(),
            shards: std::array::from_fn(|_| {
                Mutex::new(Shard { keys: HashMap::new(), sweep_at: SWEEP_FLOOR })
            }),
            backoff: Backoff::new(
                format!(
                    "rate limits cannot lease from Redis; following rate_limit_on_redis_failure = {}",
                    format!("{on_failure:?}").to_lowercase()
                ),
                "rate limits lease from Redis again: fleet-wide",
            ),
            metrics,
        }
    }

    /// Takes one token from every limit of `key_id` (which has some), or
    /// none if any is empty fleet-wide.
    pub async fn check(
        self: &Arc<Self>,
        key_id: &Arc<str>,
        limits: &RateLimits,
        now: DateTime<Utc>,
    ) -> Result<Option<LimitStatus>, LimitStatus> {
        let now_us = micros(now);
        let entry = self.entry(key_id, now_us);
        if let Some(decided) = self.settle(&entry, key_id, limits, now_us) {
            return decided;
        }
        if !self.backoff.skipping(now_us) {
            let _asking = entry.asking.lock().await;
            // Another call's lease may have arrived while this one waited.
            if let Some(decided) = self.settle(&entry, key_id, limits, now_us) {
                return decided;
            }
            match self.lease(&entry, key_id, limits, now_us).await {
                Ok(()) => {
                    if let Some(decided) = self.settle(&entry, key_id, limits, now_us) {
                        return decided;
                    }
                }
                Err(e) => self.backoff.failed(now_us, &e),
            }
        }
        self.without_redis(key_id, limits, now)
    }

    /// The decision held tokens allow, if they allow one; starts a top-up
    /// when a lease runs below half.
    fn settle(
        self: &Arc<Self>,
        entry: &Arc<KeyLease>,
        key_id: &Arc<str>,
        limits: &RateLimits,
        now: u128,
    ) -> Option<Result<Option<LimitStatus>, LimitStatus>> {
        let mut state = entry.state.lock().unwrap_or_else(PoisonError::into_inner);
        match state.take(limits, now) {
            Take::NeedLease => None,
            Take::Empty(status) => Some(Err(status)),
            Take::Admitted { tightest, top_up } => {
                if top_up && !state.topping_up && !self.backoff.skipping(now) {
                    state.topping_up = true;
                    let (me, entry, key_id, limits) =
                        (Arc::clone(self), Arc::clone(entry), Arc::clone(key_id), limits.clone());
                    tokio::spawn(async move {
                        {
                            let _asking = entry.asking.lock().await;
                            match me.lease(&entry, &key_id, &limits, now).await {
                                Ok(()) => {}
                                Err(e) => me.backoff.failed(now, &e),
                            }
                        }
                        entry.state.lock().unwrap_or_else(PoisonError::into_inner).topping_up = false;
                    });
                }
                Some(Ok(tightest))
            }
        }
    }

    /// Asks Redis to bring every lease of the key back to its size.
    async fn lease(
        &self,
        entry: &KeyLease,
        key_id: &str,
        limits: &RateLimits,
        now: u128,
    ) -> Result<(), FleetError> {
        let wants: Vec<u32> = {
            let state = entry.state.lock().unwrap_or_else(PoisonError::into_inner);
            if state.limits != *limits {
                return Ok(());
            }
            limits
                .iter()
                .zip(&state.slots)
                .map(|(l, s)| {
                    lease_size(l.limit).saturating_sub(if s.expires_at <= now { 0 } else { s.held })
                })
                .collect()
        };
        if wants.iter().all(|w| *w == 0) {
            return Ok(());
        }
        let keys: Vec<String> = limits.iter().map(|l| bucket(key_id, l)).collect();
        let args: Vec<u64> = limits
            .iter()
            .zip(&wants)
            .flat_map(|(l, want)| [u64::from(l.limit), l.window_ms * 1_000, u64::from(*want)])
            .collect();
        let answer: Vec<u64> = self.redis.eval(&LEASE, &keys, &args).await?;
        if answer.len() != 4 * limits.len() {
            return Err(FleetError::Command(format!(
                "the lease script answered {} numbers for {} limits",
                answer.len(),
                limits.len()
            )));
        }
        let mut state = entry.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.limits != *limits {
            // Changed while asking: these tokens lapse unused.
            return Ok(());
        }
        let mut granted_total = 0;
        for (((limit, slot), want), got) in
            limits.iter().zip(&mut state.slots).zip(&wants).zip(answer.chunks_exact(4))
        {
            let granted = u32::try_from(got[0]).unwrap_or(0).min(*want);
            let clamp = |us: u64| now + u128::from(us).min(window_us(limit));
            if slot.expires_at <= now {
                slot.held = 0;
            }
            slot.held += granted;
            slot.left = u32::try_from(got[1]).unwrap_or(u32::MAX);
            slot.expires_at = now + window_us(limit);
            slot.full_at = clamp(got[2]);
            slot.empty_until = if *want > 0 && granted == 0 { clamp(got[3]) } else { 0 };
            granted_total += u64::from(granted);
        }
        self.metrics.rate_limit_lease_refills.inc();
        self.metrics.rate_limit_leased_tokens.inc_by(granted_total);
        self.backoff.recovered();
        Ok(())
    }

    /// The decision when Redis cannot grant a lease.
    fn without_redis(
        &self,
        key_id: &Arc<str>,
        limits: &RateLimits,
        now: DateTime<Utc>,
    ) -> Result<Option<LimitStatus>, LimitStatus> {
        self.metrics.rate_limit_fallback_decisions.inc();
        match self.on_failure {
            OnRedisFailure::Local => self.fallback.check(key_id, limits, now),
            OnRedisFailure::Open => Ok(None),
            OnRedisFailure::Closed => {
                // Closed: refused as the first limit, to be retried after
                // Redis is tried again.
                let first = limits.iter().next().map(|l| status(l, 0, micros(now) + RETRY_US, micros(now)));
                first.map_or(Ok(None), Err)
            }
        }
    }

    /// Whether calls that need a lease follow the failure mode now.
    pub fn degraded(&self) -> bool {
        self.backoff.degraded()
    }

    /// Keys whose leases this replica holds.
    pub fn tracked(&self) -> usize {
        self.shards.iter().map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).keys.len()).sum()
    }

    fn entry(&self, key_id: &Arc<str>, now: u128) -> Arc<KeyLease> {
        let shard = &self.shards[self.hasher.hash_one(key_id) as usize % SHARDS];
        let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
        if shard.keys.len() >= shard.sweep_at {
            shard.sweep(now);
        }
        let entry = shard.keys.entry(Arc::clone(key_id)).or_insert_with(|| {
            Arc::new(KeyLease {
                state: Mutex::new(LeaseState::new(&RateLimits::default())),
                asking: tokio::sync::Mutex::new(()),
            })
        });
        Arc::clone(entry)
    }
}

impl Shard {
    /// Forgets keys that hold nothing and that no call is using.
    fn sweep(&mut self, now: u128) {
        self.keys.retain(|_, entry| {
            if Arc::strong_count(entry) > 1 {
                return true;
            }
            let state = entry.state.lock().unwrap_or_else(PoisonError::into_inner);
            state.topping_up || state.slots.iter().any(|s| s.expires_at > now || s.empty_until > now)
        });
        self.sweep_at = (self.keys.len() * 2).max(SWEEP_FLOOR);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(limit: u32, window_ms: u64) -> RateLimits {
        RateLimits::new(vec![RateLimit { name: "l".into(), limit, window_ms }]).unwrap()
    }

    #[test]
    fn a_lease_is_a_sixteenth_of_the_limit_rounded_up() {
        assert_eq!([1, 16, 17, 100, 1_000_000].map(lease_size), [1, 1, 2, 7, 62_500]);
    }

    #[test]
    fn held_tokens_are_spent_then_lapse_after_a_window() {
        let l = limits(100, 60_000);
        let mut state = LeaseState::new(&l);
        assert!(matches!(state.take(&l, 1_000), Take::NeedLease));
        state.slots[0] = Slot { held: 7, left: 93, expires_at: 60_001_000, ..Slot::default() };
        for held in (0..7).rev() {
            let Take::Admitted { tightest, top_up } = state.take(&l, 2_000) else { panic!("held") };
            assert_eq!(tightest.unwrap().remaining, held + 93);
            assert_eq!(top_up, held * 2 < 7, "topped up below half");
        }
        assert!(matches!(state.take(&l, 2_000), Take::NeedLease));
        state.slots[0] = Slot { held: 3, expires_at: 60_001_000, ..Slot::default() };
        assert!(matches!(state.take(&l, 60_001_000), Take::NeedLease), "lapsed");
        // An empty shared bucket refuses without asking until its next token.
        state.slots[0] = Slot { empty_until: 70_000_000, full_at: 90_000_000, ..Slot::default() };
        let Take::Empty(refused) = state.take(&l, 65_000_000) else { panic!("empty") };
        assert_eq!((refused.remaining, micros(refused.reset_at)), (0, 90_000_000));
        assert!(matches!(state.take(&l, 70_000_000), Take::NeedLease));
    }
}
