//! Admission of a call the policy allows: the key's rate limits, then its
//! credits ([`crate::credits`] decides where they are paid from), then the
//! usage counts every decided call adds to.
//! Returns what it decided as a value ([`Admission`]).

use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::Grant;
use crate::{
    credits::Credits,
    keys::{DenyReason, KeyState, LimitStatus, credits},
    limiter::Limiter,
    usage::UsageTracker,
};

/// What admission decided for a call, and what the verdict reports of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Admission {
    pub outcome: Result<(), DenyReason>,
    /// The tightest limit after an admitted call, or the one that refused.
    pub rate_limit: Option<LimitStatus>,
    /// The balance after a paid call, or the one that could not pay.
    pub credits_remaining: Option<i64>,
}

impl Default for Admission {
    /// Nothing was asked of limits or credits.
    fn default() -> Self {
        Self { outcome: Ok(()), rate_limit: None, credits_remaining: None }
    }
}

impl Admission {
    /// Refused before admission (by the policy).
    pub fn refused(reason: DenyReason) -> Self {
        Self { outcome: Err(reason), ..Self::default() }
    }
}

#[derive(Debug)]
pub(super) struct Admitter {
    pub limiter: Arc<Limiter>,
    pub credits: Arc<Credits>,
    pub usage: Arc<UsageTracker>,
}

impl Admitter {
    /// The limits, then the credits, of a call the policy allows: only such
    /// a call takes a token, and a call the limits refuse spends no credit.
    pub async fn admit(&self, state: &KeyState, now: DateTime<Utc>, cost: u32) -> Admission {
        let rate_limit = match self.limiter.check(&state.key_id, &state.rate_limits, now).await {
            Ok(tightest) => tightest,
            Err(refusing) => {
                return Admission {
                    outcome: Err(DenyReason::RateLimited),
                    rate_limit: Some(refusing),
                    credits_remaining: None,
                };
            }
        };
        let Some(balance) = state.credits else {
            return Admission { outcome: Ok(()), rate_limit, credits_remaining: None };
        };
        let spent = self.credits.spend(&state.key_id, balance, credits::cost(cost)).await;
        Admission {
            outcome: spent.map(|_| ()).map_err(|_| DenyReason::QuotaExhausted),
            rate_limit,
            credits_remaining: Some(spent.unwrap_or_else(|left| left)),
        }
    }

    /// Counts a decided call on its key's usage: allowed calls with their
    /// time, denials on the key they named (a wrong secret included).
    pub fn count(&self, outcome: &Result<Grant, DenyReason>, key: Option<&KeyState>, now: DateTime<Utc>) {
        match (outcome, key) {
            (Ok(grant), _) => self.usage.record_allowed(&grant.key_id, now),
            (Err(_), Some(key)) => self.usage.record_denied(&key.key_id),
            (Err(_), None) => {}
        }
    }
}
