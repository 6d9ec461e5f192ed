//! Credits: a balance of calls a key may make, each allowed Verify taking
//! its cost from it, optionally set back to an amount at every UTC day or
//! month boundary. Validation and the calendar, free of I/O.

use chrono::{DateTime, Datelike, NaiveDate, TimeZone, Utc};

/// How often a balance is refilled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefillInterval {
    /// At 00:00 UTC every day.
    Daily,
    /// At 00:00 UTC on the first day of every month.
    Monthly,
}

impl RefillInterval {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Daily => "daily",
            Self::Monthly => "monthly",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::Daily, Self::Monthly].into_iter().find(|i| i.as_str() == s)
    }

    /// The latest boundary at or before `now`.
    pub fn last_boundary(self, now: DateTime<Utc>) -> DateTime<Utc> {
        let day = match self {
            Self::Daily => now.date_naive(),
            Self::Monthly => NaiveDate::from_ymd_opt(now.year(), now.month(), 1).unwrap_or(now.date_naive()),
        };
        Utc.from_utc_datetime(&day.and_time(chrono::NaiveTime::MIN))
    }

    /// The first boundary after `now`.
    pub fn next_boundary(self, now: DateTime<Utc>) -> DateTime<Utc> {
        let last = self.last_boundary(now);
        match self {
            Self::Daily => last + chrono::Days::new(1),
            Self::Monthly => {
                last.checked_add_months(chrono::Months::new(1)).unwrap_or(DateTime::<Utc>::MAX_UTC)
            }
        }
    }
}

/// The balance is set back to `amount` at every boundary of `interval`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refill {
    pub amount: i64,
    pub interval: RefillInterval,
}

/// A key's credits as an administrator sets them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credits {
    pub remaining: i64,
    pub refill: Option<Refill>,
}

/// What is wrong with a field of the credits given for a key: its path
/// relative to the key (e.g. `credits.refill.amount`) and the problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct CreditsError {
    pub field: &'static str,
    pub problem: &'static str,
}

/// The largest balance or refill amount accepted: far beyond any real
/// quota, and far from overflow when costs are added up.
pub const MAX_CREDITS: i64 = 1 << 53;

impl Credits {
    /// Validates credits as given; `refill` is `(amount, interval)`, with
    /// `None` for an interval left unspecified.
    pub fn new(
        remaining: i64,
        refill: Option<(i64, Option<RefillInterval>)>,
    ) -> Result<Self, Vec<CreditsError>> {
        let mut errors = Vec::new();
        if !(0..=MAX_CREDITS).contains(&remaining) {
            errors.push(CreditsError { field: "credits.remaining", problem: "must be between 0 and 2^53" });
        }
        let refill = match refill {
            None => None,
            Some((amount, interval)) => {
                if !(1..=MAX_CREDITS).contains(&amount) {
                    errors.push(CreditsError {
                        field: "credits.refill.amount",
                        problem: "must be between 1 and 2^53",
                    });
                }
                if interval.is_none() {
                    errors.push(CreditsError {
                        field: "credits.refill.interval",
                        problem: "must be REFILL_INTERVAL_DAILY or REFILL_INTERVAL_MONTHLY",
                    });
                }
                interval.map(|interval| Refill { amount, interval })
            }
        };
        if errors.is_empty() { Ok(Self { remaining, refill }) } else { Err(errors) }
    }
}

/// A key's balance as Verify sees it: the stored balance and the sequence
/// number of the write that set it, so that of two readings the later wins;
/// and the epoch, which moves only when the balance is set outright.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Balance {
    pub remaining: i64,
    pub seq: i64,
    pub epoch: i64,
}

/// A call's cost: 0 means 1.
pub fn cost(requested: u32) -> i64 {
    i64::from(requested.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn boundaries_are_midnight_utc_and_the_first_of_the_month() {
        let now = at("2026-12-31T23:59:59.999Z");
        assert_eq!(RefillInterval::Daily.last_boundary(now), at("2026-12-31T00:00:00Z"));
        assert_eq!(RefillInterval::Daily.next_boundary(now), at("2027-01-01T00:00:00Z"));
        assert_eq!(RefillInterval::Monthly.last_boundary(now), at("2026-12-01T00:00:00Z"));
        assert_eq!(RefillInterval::Monthly.next_boundary(now), at("2027-01-01T00:00:00Z"));
        let midnight = at("2027-02-01T00:00:00Z");
        assert_eq!(RefillInterval::Monthly.last_boundary(midnight), midnight, "a boundary is its own last");
        assert_eq!(RefillInterval::Monthly.next_boundary(midnight), at("2027-03-01T00:00:00Z"));
    }

    #[test]
    fn bad_credits_name_their_fields() {
        assert_eq!(Credits::new(0, None), Ok(Credits { remaining: 0, refill: None }));
        let errors = Credits::new(-1, Some((0, None))).unwrap_err();
        let fields: Vec<&str> = errors.iter().map(|e| e.field).collect();
        assert_eq!(fields, ["credits.remaining", "credits.refill.amount", "credits.refill.interval"]);
        assert_eq!(cost(0), 1);
        assert_eq!(cost(7), 7);
    }

    proptest! {
        #[test]
        fn every_instant_lies_between_its_last_and_next_boundary(secs in 0i64..8_000_000_000) {
            let now = DateTime::from_timestamp(secs, 0).unwrap();
            for interval in [RefillInterval::Daily, RefillInterval::Monthly] {
                let (last, next) = (interval.last_boundary(now), interval.next_boundary(now));
                prop_assert!(last <= now && now < next);
                prop_assert_eq!(interval.last_boundary(next), next);
                prop_assert_eq!(interval.next_boundary(last), next);
            }
        }
    }
}
