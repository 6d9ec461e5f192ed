//! The service's notion of now: UTC truncated to microseconds, the precision
//! both databases store, so a timestamp written and read back compares equal
//! (page cursors depend on it).

use chrono::{DateTime, SubsecRound, Utc};

pub fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

/// `t` at the stored precision.
pub fn stored(t: DateTime<Utc>) -> DateTime<Utc> {
    t.trunc_subsecs(6)
}
