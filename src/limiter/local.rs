//! Per-key rate limits on this replica (`rate_limit_mode = "local"`, and
//! the fallback of Redis mode): the state of each limit of each key in
//! use, decided in memory with GCRA ([`crate::keys::limits`]).
//!
//! A key's state is kept only while one of its limits is below full: a
//! full bucket is the same as no state, so idle keys cost nothing and the
//! map holds at most the keys used within their longest window.

use std::{
    collections::HashMap,
    hash::{BuildHasher, RandomState},
    sync::{Arc, Mutex, PoisonError},
};

use chrono::{DateTime, Utc};

use crate::keys::{
    LimitStatus, RateLimits,
    limits::{self, micros},
};

/// Independent locks, so that calls on different keys rarely meet.
const SHARDS: usize = 16;
/// A shard is swept of full buckets when it grows past this many keys (or
/// twice what the last sweep kept).
const SWEEP_FLOOR: usize = 1_024;

#[derive(Debug)]
pub struct LocalLimiter {
    hasher: RandomState,
    shards: [Mutex<Shard>; SHARDS],
}

#[derive(Debug, Default)]
struct Shard {
    keys: HashMap<Arc<str>, Buckets>,
    sweep_at: usize,
}

/// One key's limits as last checked, each with its TAT. Limits changed by
/// an update start full.
#[derive(Debug)]
struct Buckets {
    limits: RateLimits,
    tats: [u128; limits::MAX_RATE_LIMITS],
}

impl Default for LocalLimiter {
    fn default() -> Self {
        Self {
            hasher: RandomState::new(),
            shards: std::array::from_fn(|_| {
                Mutex::new(Shard { keys: HashMap::new(), sweep_at: SWEEP_FLOOR })
            }),
        }
    }
}

impl LocalLimiter {
    /// [`super::Limiter::check`] on this replica's buckets alone, under
    /// one shard lock.
    pub fn check(
        &self,
        key_id: &Arc<str>,
        rate_limits: &RateLimits,
        now: DateTime<Utc>,
    ) -> Result<Option<LimitStatus>, LimitStatus> {
        if rate_limits.is_empty() {
            return Ok(None);
        }
        let now_us = micros(now);
        let shard = &self.shards[self.hasher.hash_one(key_id) as usize % SHARDS];
        let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
        if shard.keys.len() >= shard.sweep_at {
            shard.sweep(now_us);
        }
        let buckets = shard
            .keys
            .entry(Arc::clone(key_id))
            .or_insert_with(|| Buckets { limits: rate_limits.clone(), tats: [0; limits::MAX_RATE_LIMITS] });
        if buckets.limits != *rate_limits {
            *buckets = Buckets { limits: rate_limits.clone(), tats: [0; limits::MAX_RATE_LIMITS] };
        }
        let mut next = [0u128; limits::MAX_RATE_LIMITS];
        let mut tightest: Option<LimitStatus> = None;
        for (i, limit) in rate_limits.iter().enumerate() {
            match limits::take(limit, buckets.tats[i], now_us, 1) {
                (Some(tat), status) => {
                    next[i] = tat;
                    if tightest.as_ref().is_none_or(|t| tighter(&status, t)) {
                        tightest = Some(status);
                    }
                }
                (None, status) => return Err(status),
            }
        }
        buckets.tats = next;
        Ok(tightest)
    }

    /// Keys whose limits hold state now.
    pub fn tracked(&self) -> usize {
        self.shards.iter().map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).keys.len()).sum()
    }
}

/// Fewer calls left is tighter; on a tie, the later reset.
pub(super) fn tighter(a: &LimitStatus, b: &LimitStatus) -> bool {
    (a.remaining, std::cmp::Reverse(a.reset_at)) < (b.remaining, std::cmp::Reverse(b.reset_at))
}

impl Shard {
    /// Forgets keys whose every bucket is full again.
    fn sweep(&mut self, now_us: u128) {
        self.keys.retain(|_, b| {
            b.limits.iter().zip(b.tats).any(|(l, tat)| !limits::is_full(l.limit, tat, now_us))
        });
        self.sweep_at = (self.keys.len() * 2).max(SWEEP_FLOOR);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::RateLimit;
    use chrono::Duration;

    fn limits(spec: &[(&str, u32, u64)]) -> RateLimits {
        RateLimits::new(
            spec.iter()
                .map(|&(name, limit, window_ms)| RateLimit { name: name.into(), limit, window_ms })
                .collect(),
        )
        .unwrap()
    }

    #[test]
    fn every_limit_must_pass_and_a_refused_call_takes_no_token() {
        let limiter = LocalLimiter::default();
        let key: Arc<str> = "k1".into();
        let both = limits(&[("burst", 3, 1_000), ("minute", 4, 60_000)]);
        let t0 = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let first = limiter.check(&key, &both, t0).unwrap().unwrap();
        assert_eq!((&*first.name, first.remaining), ("burst", 2), "the tightest of the two");
        limiter.check(&key, &both, t0).unwrap();
        limiter.check(&key, &both, t0).unwrap();
        let refused = limiter.check(&key, &both, t0).unwrap_err();
        assert_eq!((&*refused.name, refused.remaining), ("burst", 0));
        // A second later the burst limit has refilled; the minute has one
        // token left, because the refused call took none.
        let later = t0 + Duration::seconds(1);
        let status = limiter.check(&key, &both, later).unwrap().unwrap();
        assert_eq!((&*status.name, status.remaining), ("minute", 0));
        assert_eq!(limiter.check(&key, &both, later).unwrap_err().name.as_ref(), "minute");
    }

    #[test]
    fn changed_limits_start_full_and_keys_without_limits_hold_no_state() {
        let limiter = LocalLimiter::default();
        let key: Arc<str> = "k1".into();
        let t0 = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let one = limits(&[("l", 1, 10_000)]);
        limiter.check(&key, &one, t0).unwrap();
        assert!(limiter.check(&key, &one, t0).is_err());
        assert!(limiter.check(&key, &limits(&[("l", 2, 10_000)]), t0).is_ok());
        assert_eq!(limiter.check(&"k2".into(), &RateLimits::default(), t0), Ok(None));
        assert_eq!(limiter.tracked(), 1);
    }

    #[test]
    fn full_buckets_are_swept_away() {
        let limiter = LocalLimiter::default();
        let t0 = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let l = limits(&[("l", 5, 1_000)]);
        for i in 0..8_000 {
            limiter.check(&format!("old{i}").into(), &l, t0).unwrap();
        }
        assert_eq!(limiter.tracked(), 8_000);
        // Two seconds later every old bucket is full again: the shards'
        // next sweeps drop them and keep every new key, which is not.
        let later = t0 + Duration::seconds(2);
        for i in 0..40_000 {
            limiter.check(&format!("new{i}").into(), &l, later).unwrap();
        }
        assert_eq!(limiter.tracked(), 40_000);
    }
}
