//! The pure verification decision: given a key's current policy, the clock,
//! the caller's address and the required scope, allow or say why not.

use std::net::IpAddr;

use chrono::{DateTime, Utc};

use super::{cidr::AllowList, limits::RateLimits, scope::ScopeSet};

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Decision {
    Allow,
    Deny,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "ALLOW",
            Self::Deny => "DENY",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::Allow, Self::Deny].into_iter().find(|d| d.as_str() == s)
    }
}

/// Why a verification was denied: defined with its HTTP answer in the
/// `keywarden-http` crate, which keywarden-client shares.
pub use keywarden_http::DenyReason;

/// What a key permits, as of its latest stored state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// When the key stops verifying (in the future while rotating).
    pub revoked_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
    /// Disabled by an operator: refused until enabled again.
    pub disabled: bool,
    pub allowed: AllowList,
    /// Granted scopes with implications already expanded.
    pub scopes: ScopeSet,
}

/// What verification needs to know about an identified key: who it
/// belongs to and its current policy.
#[derive(Debug, Clone)]
pub struct KeyState {
    pub key_id: std::sync::Arc<str>,
    pub merchant_id: String,
    pub name: String,
    pub policy: Policy,
    /// Checked after the policy allows a call (a denied call takes no
    /// token).
    pub rate_limits: RateLimits,
    /// Spent after the limits admit a call; `None` is unlimited.
    pub credits: Option<super::credits::Balance>,
    /// Returned with every allowed call; never part of a decision.
    pub metadata: super::Metadata,
    pub version: i64,
}

/// Revocation first (it is the strongest statement), then an operator's
/// disable, then expiry, then the caller's address, then the scope.
pub fn decide(
    policy: &Policy,
    now: DateTime<Utc>,
    ip: Option<IpAddr>,
    required: Option<ScopeSet>,
) -> Result<(), DenyReason> {
    if policy.revoked_at.is_some_and(|at| at <= now) {
        return Err(DenyReason::Revoked);
    }
    if policy.disabled {
        return Err(DenyReason::Disabled);
    }
    if policy.expires_at.is_some_and(|at| at <= now) {
        return Err(DenyReason::Expired);
    }
    if !policy.allowed.permits(ip) {
        return Err(DenyReason::IpNotAllowed);
    }
    if required.is_some_and(|scope| !policy.scopes.contains(scope)) {
        return Err(DenyReason::InsufficientScope);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    // Tests read the real clock to build their inputs.
    #![allow(clippy::disallowed_methods)]

    use super::*;
    use crate::keys::scope::ScopeCatalogue;
    use chrono::Duration;

    #[test]
    fn every_reason_sits_at_its_own_index() {
        for (i, r) in DenyReason::ALL.into_iter().enumerate() {
            assert_eq!(r as usize, i, "{r:?}");
        }
    }

    fn policy(scopes: &[&str], cidrs: &[&str]) -> Policy {
        let c = ScopeCatalogue::default();
        Policy {
            revoked_at: None,
            expires_at: None,
            disabled: false,
            allowed: AllowList::parse(cidrs).unwrap(),
            scopes: c.expand(c.parse_grant(scopes).unwrap()),
        }
    }

    fn scope(name: &str) -> Option<ScopeSet> {
        ScopeCatalogue::default().required(name)
    }

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn allows_a_granted_scope_and_its_implications() {
        let p = policy(&["invoice:write"], &[]);
        let now = Utc::now();
        assert_eq!(decide(&p, now, None, scope("invoice:write")), Ok(()));
        assert_eq!(decide(&p, now, None, scope("invoice:read")), Ok(()));
        assert_eq!(decide(&p, now, None, None), Ok(()));
        assert_eq!(decide(&p, now, None, scope("sales:read")), Err(DenyReason::InsufficientScope));
    }

    #[test]
    fn revocation_takes_effect_at_revoked_at() {
        let now = Utc::now();
        let mut p = policy(&["sales:read"], &[]);
        p.revoked_at = Some(now + Duration::seconds(1));
        assert_eq!(decide(&p, now, None, None), Ok(()), "rotating keys still verify");
        p.revoked_at = Some(now);
        assert_eq!(decide(&p, now, None, None), Err(DenyReason::Revoked));
    }

    #[test]
    fn expiry_takes_effect_at_expires_at() {
        let now = Utc::now();
        let mut p = policy(&["sales:read"], &[]);
        p.expires_at = Some(now + Duration::milliseconds(1));
        assert_eq!(decide(&p, now, None, None), Ok(()));
        assert_eq!(decide(&p, now + Duration::milliseconds(1), None, None), Err(DenyReason::Expired));
    }

    #[test]
    fn checks_are_ordered_revoked_disabled_expired_ip_scope() {
        let now = Utc::now();
        let mut p = policy(&["sales:read"], &["10.0.0.0/8"]);
        p.revoked_at = Some(now);
        p.disabled = true;
        p.expires_at = Some(now);
        assert_eq!(decide(&p, now, ip("1.1.1.1"), scope("invoice:write")), Err(DenyReason::Revoked));
        p.revoked_at = None;
        assert_eq!(decide(&p, now, ip("1.1.1.1"), scope("invoice:write")), Err(DenyReason::Disabled));
        p.disabled = false;
        assert_eq!(decide(&p, now, ip("1.1.1.1"), scope("invoice:write")), Err(DenyReason::Expired));
        p.expires_at = None;
        assert_eq!(decide(&p, now, ip("1.1.1.1"), scope("invoice:write")), Err(DenyReason::IpNotAllowed));
        assert_eq!(
            decide(&p, now, ip("10.1.1.1"), scope("invoice:write")),
            Err(DenyReason::InsufficientScope)
        );
        assert_eq!(decide(&p, now, ip("10.1.1.1"), scope("sales:read")), Ok(()));
    }

    #[test]
    fn restricted_key_without_caller_ip_is_denied() {
        let p = policy(&["sales:read"], &["10.0.0.0/8"]);
        assert_eq!(decide(&p, Utc::now(), None, None), Err(DenyReason::IpNotAllowed));
    }

    #[test]
    fn statuses_split_into_400_401_403_and_429() {
        let statuses: Vec<u16> = DenyReason::ALL.iter().map(|r| r.http_status()).collect();
        assert_eq!(statuses, [401, 401, 401, 401, 403, 403, 429, 403, 429, 429, 400, 403]);
        for r in DenyReason::ALL {
            assert_eq!(DenyReason::parse(r.as_str()), Some(r));
        }
    }
}
