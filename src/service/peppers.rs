//! Which pepper generations the stored keys and operator tokens still need,
//! so that an operator can tell when an old pepper may be retired. ADMIN
//! only: it describes the deployment's secrets (by id, never by value).

use std::sync::Arc;

use super::{
    ServiceError,
    access::{Access, Principal},
};
use crate::{
    keys::{KeyHasher, PepperId, operator::AdminAction},
    store::{Store, peppers::GenerationCount},
};

/// One pepper generation: configured here, stored there, or both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation {
    pub id: String,
    /// Whether this replica holds the pepper.
    pub configured: bool,
    /// Whether new hashes are made under it.
    pub current: bool,
    pub counts: GenerationCount,
}

impl Generation {
    /// Whether nothing that can still verify or authenticate needs it.
    pub fn retirable(&self) -> bool {
        !self.current
            && self.counts.live_keys == 0
            && self.counts.live_operator_tokens == 0
            && self.counts.webhook_endpoints == 0
    }
}

#[derive(Debug)]
pub struct Peppers {
    store: Store,
    hasher: KeyHasher,
    access: Arc<Access>,
}

impl Peppers {
    pub fn new(store: Store, hasher: KeyHasher, access: Arc<Access>) -> Self {
        Self { store, hasher, access }
    }

    /// Every generation configured or still stored: the current one first,
    /// then the others by id.
    pub async fn status(&self, who: &Principal) -> Result<Vec<Generation>, ServiceError> {
        self.access.authorize(who, AdminAction::GetPepperStatus, None)?;
        let mut counts = self.store.count_by_pepper(self.access.now()).await?;
        let mut generations: Vec<Generation> = self
            .hasher
            .ids()
            .map(|id| Generation {
                id: id.to_string(),
                configured: true,
                current: id == self.hasher.current(),
                counts: counts.remove(id.as_str()).unwrap_or_default(),
            })
            .collect();
        generations[1..].sort_by(|a, b| a.id.cmp(&b.id));
        generations.extend(counts.into_iter().map(|(id, counts)| Generation {
            id,
            configured: false,
            current: false,
            counts,
        }));
        Ok(generations)
    }

    /// Live keys stored under peppers this replica was not given: they
    /// cannot verify here. Checked at start, so a pepper retired too early
    /// is said out loud.
    pub async fn missing(
        &self,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<Vec<(String, u64)>, ServiceError> {
        let counts = self.store.count_by_pepper(now).await?;
        Ok(counts
            .into_iter()
            .filter(|(id, c)| {
                let configured = PepperId::parse(id).is_ok_and(|id| self.hasher.ids().any(|k| *k == id));
                !configured && (c.live_keys > 0 || c.live_operator_tokens > 0 || c.webhook_endpoints > 0)
            })
            .map(|(id, c)| (id, c.live_keys + c.live_operator_tokens + c.webhook_endpoints))
            .collect())
    }
}
