//! The key domain, free of I/O: the key format and checksum ([`format`](mod@format)),
//! hashing at rest ([`hash`]), scopes and presets ([`scope`]), IP allow-lists
//! ([`cidr`]), the verification decision ([`decision`]), audit event ids
//! that say who issued them ([`event_id`]), what happened to a key and
//! what hears of it ([`events`]), mTLS client identities
//! ([`identity`]), rate limits and their GCRA
//! arithmetic ([`limits`]), the labels a key carries ([`metadata`]), and
//! operator tokens and roles
//! ([`operator`]).

pub mod cidr;
pub mod credits;
pub mod decision;
pub mod event_id;
pub mod events;
pub mod format;
pub mod hash;
pub mod identity;
pub mod limits;
pub mod metadata;
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
pub use metadata::Metadata;
pub use scope::{ScopeCatalogue, ScopeSet};

/// A key's lifecycle state, derived from its timestamps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyStatus {
    Active,
    Expired,
    Revoked,
    /// Replaced, but verifying until its grace period ends.
    Rotating,
    /// Disabled by an operator, and neither revoked nor expired.
    Disabled,
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

    /// As [`at`](Self::at), with a disable shown over active and rotating:
    /// revocation and expiry are the stronger statements.
    pub fn of(
        revoked_at: Option<DateTime<Utc>>,
        expires_at: Option<DateTime<Utc>>,
        disabled: bool,
        now: DateTime<Utc>,
    ) -> Self {
        match Self::at(revoked_at, expires_at, now) {
            Self::Active | Self::Rotating if disabled => Self::Disabled,
            status => status,
        }
    }
}

/// Most characters of caller input an error message quotes.
pub const MAX_EXCERPT: usize = 64;

/// At most `max` characters of caller input, quoted, for an error message:
/// longer input is cut and marked, so that no error echoes input unbounded.
/// Every error that quotes what a caller sent goes through here.
pub fn excerpt(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        None => format!("{s:?}"),
        Some((end, _)) => format!("{:?}…", &s[..end]),
    }
}

/// Up to `max` quoted excerpts of `items`, joined, with how many more there
/// were: a list in an error stays bounded however long the request's.
pub fn excerpts<S: AsRef<str>>(items: &[S], max: usize) -> String {
    let mut shown: Vec<String> = items.iter().take(max).map(|s| excerpt(s.as_ref(), MAX_EXCERPT)).collect();
    if items.len() > max {
        shown.push(format!("and {} more", items.len() - max));
    }
    shown.join(", ")
}

#[cfg(test)]
mod tests {
    // Tests read the real clock to build their inputs.
    #![allow(clippy::disallowed_methods)]

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
