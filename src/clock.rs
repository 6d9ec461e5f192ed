//! The service's notion of now: UTC truncated to microseconds, the precision
//! both databases store, so a timestamp written and read back compares equal
//! (page cursors depend on it).
//!
//! Decisions that compare times written by one replica with times read by
//! another (revocation, expiry, operator tokens) use [`DbClock`]: the
//! database's clock as this replica estimates it, so that replicas whose
//! own clocks disagree still agree on whether a key is revoked.

use std::sync::atomic::{AtomicI64, Ordering};

use chrono::{DateTime, Duration, SubsecRound, Utc};

pub fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

/// `t` at the stored precision.
pub fn stored(t: DateTime<Utc>) -> DateTime<Utc> {
    t.trunc_subsecs(6)
}

/// The database's clock, read through this replica's: the local clock plus
/// an offset measured against the database's (see [`DbClock::observe`]).
/// Until the first reading the offset is zero.
#[derive(Debug, Default)]
pub struct DbClock {
    /// How far this replica's clock is off, in microseconds: zero except
    /// when a test injects a wrong clock.
    skew_us: i64,
    offset_us: AtomicI64,
}

impl DbClock {
    /// A replica whose own clock is off by `skew` (tests of clock skew).
    pub fn skewed(skew: Duration) -> Self {
        Self { skew_us: skew.num_microseconds().unwrap_or(0), offset_us: AtomicI64::new(0) }
    }

    /// This replica's own clock.
    pub fn local(&self) -> DateTime<Utc> {
        now() + Duration::microseconds(self.skew_us)
    }

    /// Now, on the database's clock. Skew and offset are whole
    /// microseconds, so the result stays at the stored precision.
    pub fn now(&self) -> DateTime<Utc> {
        now() + Duration::microseconds(self.skew_us + self.offset_us.load(Ordering::Relaxed))
    }

    /// For a database on this machine (SQLite): its clock is the machine's,
    /// read exactly, with no round trip to estimate across.
    pub fn same_machine(&self) {
        self.offset_us.store(-self.skew_us, Ordering::Relaxed);
    }

    /// The database's clock minus this replica's, as last measured.
    pub fn offset(&self) -> Duration {
        Duration::microseconds(self.offset_us.load(Ordering::Relaxed))
    }

    /// Records a reading `db` of the database's clock taken between
    /// `sent` and `received` on [`DbClock::local`]. The reading is placed
    /// at the round trip's midpoint, so the error is at most half of it.
    pub fn observe(&self, db: DateTime<Utc>, sent: DateTime<Utc>, received: DateTime<Utc>) {
        let midpoint = sent + (received - sent) / 2;
        let offset = (db - midpoint).num_microseconds().unwrap_or(0);
        self.offset_us.store(offset, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_skewed_replica_reads_the_database_clock_once_it_has_measured_it() {
        let clock = DbClock::skewed(Duration::hours(-1));
        let real = now();
        assert!((real - clock.now()) > Duration::minutes(59), "before a reading, the local clock");
        let sent = clock.local();
        let received = sent + Duration::milliseconds(4);
        clock.observe(real + Duration::milliseconds(2), sent, received);
        let error = (clock.now() - now()).num_milliseconds().abs();
        assert!(error < 50, "off by {error} ms after a reading");
    }
}
