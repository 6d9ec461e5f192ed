//! The service's notion of now: UTC truncated to microseconds, the precision
//! both databases store, so a timestamp written and read back compares equal
//! (page cursors depend on it).
//!
//! Decisions that compare times written by one replica with times read by
//! another (revocation, expiry, operator tokens) use [`DbClock`]: the
//! database's clock as this replica estimates it, so that replicas whose
//! own clocks disagree still agree on whether a key is revoked.
//!
//! This is the one module that reads the wall clock: clippy's
//! `disallowed-methods` (clippy.toml) refuses `Utc::now`, `SystemTime::now`
//! and [`now`] everywhere else, so a decision or a stamp cannot bypass
//! [`DbClock`] (and the skew tests inject through it). A measurement that
//! needs the raw clock (a lag, an age) says why where it reads it.
#![allow(clippy::disallowed_methods)]

use std::{
    collections::VecDeque,
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicI64, Ordering},
    },
};

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
    /// Half the round trip of the reading the offset comes from: the most
    /// the offset can be wrong by.
    uncertainty_us: AtomicI64,
    /// The last few readings as (offset, round trip), in microseconds.
    readings: Mutex<VecDeque<(i64, i64)>>,
}

/// Readings kept to pick the quickest from (NTP's clock filter keeps 8):
/// a reading delayed by a busy pool or a loaded machine has a wide error
/// and should not displace a quick one taken seconds earlier.
const READINGS_KEPT: usize = 8;

impl DbClock {
    /// A replica whose own clock is off by `skew` (tests of clock skew).
    pub fn skewed(skew: Duration) -> Self {
        Self { skew_us: skew.num_microseconds().unwrap_or(0), ..Self::default() }
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
        self.uncertainty_us.store(0, Ordering::Relaxed);
    }

    /// The database's clock minus this replica's, as last measured.
    pub fn offset(&self) -> Duration {
        Duration::microseconds(self.offset_us.load(Ordering::Relaxed))
    }

    /// How far [`DbClock::now`] may be from the database's clock: half the
    /// round trip of the reading in use (zero on the same machine).
    pub fn uncertainty(&self) -> Duration {
        Duration::microseconds(self.uncertainty_us.load(Ordering::Relaxed))
    }

    /// Records a reading `db` of the database's clock taken between
    /// `sent` and `received` on [`DbClock::local`]. A reading is placed at
    /// its round trip's midpoint, so its error is at most half of it; the
    /// offset in use is that of the quickest of the last few readings.
    pub fn observe(&self, db: DateTime<Utc>, sent: DateTime<Utc>, received: DateTime<Utc>) {
        let round_trip = (received - sent).max(Duration::zero());
        let midpoint = sent + round_trip / 2;
        let offset = (db - midpoint).num_microseconds().unwrap_or(0);
        let round_trip = round_trip.num_microseconds().unwrap_or(i64::MAX);
        let mut readings = self.readings.lock().unwrap_or_else(PoisonError::into_inner);
        if readings.len() == READINGS_KEPT {
            readings.pop_front();
        }
        readings.push_back((offset, round_trip));
        if let Some(&(offset, round_trip)) = readings.iter().min_by_key(|(_, rtt)| *rtt) {
            self.offset_us.store(offset, Ordering::Relaxed);
            self.uncertainty_us.store(round_trip / 2, Ordering::Relaxed);
        }
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
        assert_eq!(clock.uncertainty(), Duration::milliseconds(2));
    }

    #[test]
    fn a_slow_reading_does_not_displace_a_quick_one() {
        let clock = DbClock::default();
        let sent = clock.local();
        clock.observe(sent + Duration::milliseconds(1), sent, sent + Duration::milliseconds(2));
        // Delayed on the way back: its midpoint estimate is 200 ms off.
        let sent = clock.local();
        clock.observe(sent, sent, sent + Duration::milliseconds(400));
        assert_eq!(clock.offset(), Duration::zero());
        assert_eq!(clock.uncertainty(), Duration::milliseconds(1));
        // Eight readings later the quick one has aged out.
        for _ in 0..READINGS_KEPT {
            let sent = clock.local();
            clock.observe(sent + Duration::milliseconds(10), sent, sent + Duration::milliseconds(20));
        }
        assert_eq!(clock.offset(), Duration::zero());
        assert_eq!(clock.uncertainty(), Duration::milliseconds(10));
    }
}
