//! Per-key rate limits: what a limit is, how it is stored, and the GCRA
//! arithmetic that decides a call against one, free of I/O.
//!
//! A limit of `limit` calls per `window` is a bucket of `limit` tokens that
//! refills at `limit / window`: a burst of `limit` calls is admitted at
//! once, then one more every `window / limit`. The state of a limit is one
//! number, its theoretical arrival time (GCRA's TAT), so checking a call
//! costs a comparison and an addition, with no per-call history.

use std::sync::Arc;

use chrono::{DateTime, Utc};

/// Most limits one key may carry.
pub const MAX_RATE_LIMITS: usize = 4;
/// Shortest and longest window, in milliseconds (1 s and 1 day).
pub const MIN_WINDOW_MS: u64 = 1_000;
pub const MAX_WINDOW_MS: u64 = 86_400_000;
/// Longest limit name.
pub const MAX_LIMIT_NAME: usize = 32;

/// One limit: at most `limit` calls per `window_ms`, refilled smoothly.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RateLimit {
    pub name: Arc<str>,
    pub limit: u32,
    pub window_ms: u64,
}

/// What is wrong with one of the limits given for a key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct LimitError {
    /// The field's path relative to the key, e.g. `rate_limits[1].window`.
    pub field: String,
    pub problem: String,
}

/// A key's limits (at most [`MAX_RATE_LIMITS`], names unique), shared
/// cheaply by every cached copy of the key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RateLimits(Arc<[RateLimit]>);

impl RateLimits {
    /// Validates limits as an administrator gave them, naming each bad field.
    pub fn new(limits: Vec<RateLimit>) -> Result<Self, Vec<LimitError>> {
        let mut errors = Vec::new();
        let mut bad = |field: String, problem: String| errors.push(LimitError { field, problem });
        if limits.len() > MAX_RATE_LIMITS {
            // Nothing else is looked at: the work stays bounded.
            bad("rate_limits".into(), format!("at most {MAX_RATE_LIMITS} per key (got {})", limits.len()));
            return Err(errors);
        }
        for (i, l) in limits.iter().enumerate() {
            if let Err(problem) = check_name(&l.name) {
                bad(format!("rate_limits[{i}].name"), problem);
            } else if limits[..i].iter().any(|earlier| earlier.name == l.name) {
                bad(
                    format!("rate_limits[{i}].name"),
                    format!("{:?} is used by another limit of this key", l.name),
                );
            }
            if l.limit == 0 {
                bad(format!("rate_limits[{i}].limit"), "must be at least 1".into());
            }
            if !(MIN_WINDOW_MS..=MAX_WINDOW_MS).contains(&l.window_ms) {
                bad(format!("rate_limits[{i}].window"), "must be between 1 s and 1 day".into());
            }
        }
        if errors.is_empty() { Ok(Self(limits.into())) } else { Err(errors) }
    }

    /// Reads the stored form written by [`RateLimits::to_stored`].
    pub fn from_stored(s: &str) -> Result<Self, String> {
        let limits = s
            .split_whitespace()
            .map(|entry| {
                let parsed = entry.split_once('=').and_then(|(name, rest)| {
                    let (limit, window) = rest.split_once('/')?;
                    Some(RateLimit {
                        name: name.into(),
                        limit: limit.parse().ok()?,
                        window_ms: window.parse().ok()?,
                    })
                });
                parsed.ok_or_else(|| format!("unreadable rate limit {entry:?}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Self::new(limits)
            .map_err(|errors| errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))
    }

    /// `name=limit/window_ms`, space-separated (names have no spaces, `=`
    /// or `/`).
    pub fn to_stored(&self) -> String {
        let entries: Vec<String> =
            self.0.iter().map(|l| format!("{}={}/{}", l.name, l.limit, l.window_ms)).collect();
        entries.join(" ")
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn iter(&self) -> std::slice::Iter<'_, RateLimit> {
        self.0.iter()
    }
}

/// Lowercase letters, digits, `_`, `-`, `.` and `:`; 1 to 32 of them.
fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_LIMIT_NAME
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-.:".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!("must be 1 to {MAX_LIMIT_NAME} characters of a-z, 0-9, '_', '-', '.' and ':'"))
    }
}

/// Where a limit stands after a call: the figures a caller reports back
/// (and the gateway puts in `ratelimit-*` headers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitStatus {
    pub name: Arc<str>,
    pub limit: u32,
    /// Calls that could still be made at once.
    pub remaining: u32,
    /// When the whole limit is available again.
    pub reset_at: DateTime<Utc>,
    /// The instant this status describes (the limiter's clock), so that
    /// "seconds until reset" is measured on the clock that set `reset_at`.
    pub decided_at: DateTime<Utc>,
}

/// Time on the GCRA scale: microseconds times the limit, so that one
/// token is exactly `window_us` units and no division rounds.
fn scaled(us: u128, limit: u32) -> u128 {
    us * u128::from(limit)
}

/// Microseconds since the epoch (the service's clock has that precision;
/// times before 1970 count as 1970).
pub fn micros(t: DateTime<Utc>) -> u128 {
    u128::try_from(t.timestamp_micros()).unwrap_or(0)
}

fn from_micros(us: u128) -> DateTime<Utc> {
    i64::try_from(us).ok().and_then(DateTime::from_timestamp_micros).unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// One limit's decision for a call of `cost` tokens at `now_us`, given its
/// theoretical arrival time `tat` (0 for a limit never used). `Ok` carries
/// the new TAT to keep; either way, the status to report.
pub fn take(limit: &RateLimit, tat: u128, now_us: u128, cost: u32) -> (Option<u128>, LimitStatus) {
    let window = u128::from(limit.window_ms) * 1_000;
    let now = scaled(now_us, limit.limit);
    let capacity = scaled(window, limit.limit);
    let base = tat.max(now);
    let next = base + window * u128::from(cost);
    let (kept, standing) = if next - now <= capacity { (Some(next), next) } else { (None, base) };
    let remaining = (capacity - (standing - now).min(capacity)) / window;
    let status = LimitStatus {
        name: Arc::clone(&limit.name),
        limit: limit.limit,
        remaining: u32::try_from(remaining).unwrap_or(u32::MAX),
        reset_at: from_micros(standing.div_ceil(u128::from(limit.limit))),
        decided_at: from_micros(now_us),
    };
    (kept, status)
}

/// Whether a limit whose TAT is `tat` is full again at `now_us`, so that
/// forgetting its state changes nothing.
pub fn is_full(limit: u32, tat: u128, now_us: u128) -> bool {
    tat <= scaled(now_us, limit)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn limit(n: u32, window_ms: u64) -> RateLimit {
        RateLimit { name: "per-10s".into(), limit: n, window_ms }
    }

    /// Runs calls at the given times (µs) against one limit whose TAT is
    /// `tat`, returning which were admitted.
    fn run(l: &RateLimit, mut tat: u128, times: &[u128]) -> Vec<bool> {
        times
            .iter()
            .map(|&t| match take(l, tat, t, 1) {
                (Some(next), _) => {
                    tat = next;
                    true
                }
                (None, _) => false,
            })
            .collect()
    }

    #[test]
    fn five_per_ten_seconds_admits_five_then_refuses_until_a_token_refills() {
        let l = limit(5, 10_000);
        let t0: u128 = 1_800_000_000_000_000;
        let mut tat = 0;
        for taken in 1..=5 {
            let (next, status) = take(&l, tat, t0, 1);
            tat = next.expect("within the burst");
            assert_eq!(status.remaining, 5 - taken);
            assert_eq!(micros(status.reset_at), t0 + u128::from(taken) * 2_000_000, "2 s per token taken");
        }
        let (refused, status) = take(&l, tat, t0 + 1, 1);
        assert_eq!(refused, None);
        assert_eq!((status.remaining, micros(status.reset_at)), (0, t0 + 10_000_000));
        // One token every 2 s; the whole limit after the window.
        assert_eq!(take(&l, tat, t0 + 1_999_999, 1).0, None);
        assert!(take(&l, tat, t0 + 2_000_000, 1).0.is_some());
        assert_eq!(run(&l, tat, &[t0 + 10_000_000; 6]), [true, true, true, true, true, false]);
    }

    #[test]
    fn a_cost_takes_that_many_tokens_or_none() {
        let l = limit(10, 1_000);
        let (next, status) = take(&l, 0, 5_000_000, 7);
        assert_eq!(status.remaining, 3);
        let (refused, status) = take(&l, next.unwrap(), 5_000_000, 4);
        assert_eq!((refused, status.remaining), (None, 3), "a refused call takes nothing");
    }

    #[test]
    fn stored_form_round_trips_and_bad_limits_name_their_field() {
        let limits = RateLimits::new(vec![
            limit(5, 10_000),
            RateLimit { name: "daily".into(), limit: 1, window_ms: 86_400_000 },
        ])
        .unwrap();
        assert_eq!(limits.to_stored(), "per-10s=5/10000 daily=1/86400000");
        assert_eq!(RateLimits::from_stored(&limits.to_stored()).unwrap(), limits);
        assert_eq!(RateLimits::from_stored("").unwrap(), RateLimits::default());

        let errors = RateLimits::new(vec![
            limit(0, 999),
            limit(1, 1_000),
            RateLimit { name: "Bad Name".into(), limit: 1, window_ms: 86_400_001 },
        ])
        .unwrap_err();
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "rate_limits[0].limit",
                "rate_limits[0].window",
                "rate_limits[1].name",
                "rate_limits[2].name",
                "rate_limits[2].window"
            ]
        );
        let five = vec![limit(1, 1_000); 5]
            .into_iter()
            .enumerate()
            .map(|(i, mut l)| {
                l.name = format!("l{i}").into();
                l
            })
            .collect();
        assert_eq!(RateLimits::new(five).unwrap_err()[0].field, "rate_limits");
    }

    proptest! {
        /// However calls arrive, between any two admitted calls no more
        /// were admitted than the burst plus what refilled in between:
        /// `limit + floor(elapsed × limit / window)`.
        #[test]
        fn no_span_admits_more_than_the_bucket_allows(
            n in 1u32..20,
            window_s in 1u64..5,
            gaps in proptest::collection::vec(0u128..400_000, 1..200),
        ) {
            let l = limit(n, window_s * 1_000);
            let window_us = u128::from(window_s) * 1_000_000;
            let mut t = 1_000_000_000u128;
            let times: Vec<u128> = gaps.iter().map(|g| { t += g; t }).collect();
            let admitted: Vec<u128> = times.iter().zip(run(&l, 0, &times)).filter(|(_, ok)| *ok).map(|(t, _)| *t).collect();
            for (i, first) in admitted.iter().enumerate() {
                for (j, last) in admitted.iter().enumerate().skip(i) {
                    let bound = u128::from(n) + (last - first) * u128::from(n) / window_us;
                    prop_assert!((j - i + 1) as u128 <= bound, "{} admitted in {} µs with {n} per {window_s} s", j - i + 1, last - first);
                }
            }
            // A burst at one instant never exceeds the limit.
            let burst = run(&l, 0, &vec![t + 100 * window_us; n as usize + 3]);
            prop_assert_eq!(burst.iter().filter(|ok| **ok).count(), n as usize);
        }

        #[test]
        fn any_stored_text_is_read_or_refused_without_panic(s in "\\PC{0,80}") {
            if let Ok(limits) = RateLimits::from_stored(&s) {
                prop_assert_eq!(RateLimits::from_stored(&limits.to_stored()).unwrap(), limits);
            }
        }
    }
}
