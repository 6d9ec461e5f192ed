//! The key domain, free of I/O: the key format and checksum ([`format`](mod@format)),
//! hashing at rest ([`hash`]), scopes and presets ([`scope`]), IP allow-lists
//! ([`cidr`]), the verification decision ([`decision`]), audit event ids
//! that say who issued them ([`event_id`]), rate limits and their GCRA
//! arithmetic ([`limits`]), and operator tokens and roles
//! ([`operator`]).

pub mod cidr;
pub mod credits;
pub mod decision;
pub mod event_id;
pub mod format;
pub mod hash;
pub mod limits;
pub mod operator;
pub mod scope;

use chrono::{DateTime, Utc};

pub use cidr::AllowList;
pub use credits::{Credits, Refill, RefillInterval};
pub use decision::{Decision, DenyReason, KeyState, Policy, decide};
pub use event_id::EventIds;
pub use format::{KeyPrefix, LookupPrefix, Malformed, PlainKey};
pub use hash::{KeyHash, KeyHasher, KeyedMac, PepperId};
pub use limits::{LimitStatus, RateLimit, RateLimits};
pub use scope::{ScopeCatalogue, ScopeSet};

/// A key's lifecycle state, derived from its timestamps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyStatus {
    Active,
    Expired,
    Revoked,
    /// Replaced, but verifying until its grace period ends.
    Rotating,
}

impl KeyStatus {
    pub fn at(
        revoked_at: Option<DateTime<Utc>>,
        expires_at: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Self {
        match (revoked_at, expires_at) {
            (Some(r), _) if r <= now => Self::Revoked,
            (_, Some(e)) if e <= now => Self::Expired,
            (Some(_), _) => Self::Rotating,
            _ => Self::Active,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;

    #[test]
    fn status_follows_the_timestamps() {
        let now = Utc::now();
        let past = Some(now - Duration::seconds(1));
        let future = Some(now + Duration::seconds(1));
        assert_eq!(KeyStatus::at(None, None, now), KeyStatus::Active);
        assert_eq!(KeyStatus::at(None, future, now), KeyStatus::Active);
        assert_eq!(KeyStatus::at(None, past, now), KeyStatus::Expired);
        assert_eq!(KeyStatus::at(past, None, now), KeyStatus::Revoked);
        assert_eq!(KeyStatus::at(past, past, now), KeyStatus::Revoked);
        assert_eq!(KeyStatus::at(future, None, now), KeyStatus::Rotating);
        assert_eq!(KeyStatus::at(future, past, now), KeyStatus::Expired);
    }
}
