//! Credits on the Verify path, in one place: [`Credits::spend`] decides
//! where a call's cost is paid from. In Redis mode the fleet shares each
//! key's balance through leases ([`leased`], ADR 40); in local mode, and
//! whenever Redis cannot say, this replica decides on its own view of the
//! balance, kept with the usage counts so that spending is flushed in the
//! same batches ([`crate::usage`]). The daily and monthly refills are a
//! background job of their own ([`refill`]). The balance arithmetic is the
//! pure [`crate::keys::credits`]; the queries are `store::credits`.

pub mod leased;
pub mod refill;

use std::sync::Arc;

pub use leased::{LeasedCredits, Spend};

use crate::{keys::credits::Balance, usage::UsageTracker};

/// Where credits are paid from.
#[derive(Debug)]
pub struct Credits {
    /// The fleet's shared balances (Redis mode).
    leased: Option<Arc<LeasedCredits>>,
    /// This replica's view of each balance, flushed with the usage counts.
    usage: Arc<UsageTracker>,
}

impl Credits {
    /// Balances seen by this replica alone.
    pub fn local(usage: Arc<UsageTracker>) -> Self {
        Self { leased: None, usage }
    }

    /// Balances shared by the fleet through `leased`, decided locally when
    /// Redis cannot answer.
    pub fn shared(leased: Arc<LeasedCredits>, usage: Arc<UsageTracker>) -> Self {
        Self { leased: Some(leased), usage }
    }

    /// Spends `cost` of `key_id`'s `balance`: `Ok` with about what is left
    /// when paid, `Err` with what is left when it cannot pay. Every credit
    /// spent is also recorded for the usage flush, the durable record.
    pub async fn spend(&self, key_id: &Arc<str>, balance: Balance, cost: i64) -> Result<i64, i64> {
        let shared = match &self.leased {
            Some(fleet) => fleet.spend(key_id, balance.epoch, cost).await,
            None => Spend::Unavailable,
        };
        match shared {
            Spend::Paid(left) => {
                self.usage.record_spent(key_id, balance, cost);
                Ok(left)
            }
            Spend::Refused(left) => Err(left),
            Spend::Unavailable => self.usage.spend(key_id, balance, cost),
        }
    }
}
