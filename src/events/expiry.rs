//! The expiry scan: `key.expiring` once per lead before a key expires,
//! `key.expired` when it does, and `key.grace_ended` when a rotated key's
//! grace is over. Every replica scans; each occasion's event is written
//! once (a unique occasion per event), however many find it. An occasion
//! names the expiry it is about, so changing a key's expiry re-arms its
//! reminders.

use std::{sync::Arc, time::Duration};

use chrono::{DateTime, Utc};

use super::{EventType, KeyFacts, Outbox, SCHEDULER, lead_name, rfc3339};
use crate::{
    clock::DbClock,
    event_fields,
    store::{Store, StoreError, events::NewEvent, keys::StoredKey},
    task::{Stop, Task},
};

/// How far back a scan looks for expiries and grace ends it has not
/// written yet: the longest outage of every replica after which the
/// events are still written.
pub const LOOKBACK: chrono::Duration = chrono::Duration::days(7);
/// Keys read per window per scan; the rest come in the next scan.
const SCAN_LIMIT: u64 = 1_000;

#[derive(Debug)]
pub struct ExpiryScan {
    store: Store,
    clock: Arc<DbClock>,
    outbox: Outbox,
    leads: Vec<Duration>,
    interval: Duration,
}

impl ExpiryScan {
    pub fn new(
        store: Store,
        clock: Arc<DbClock>,
        outbox: Outbox,
        leads: Vec<Duration>,
        interval: Duration,
    ) -> Self {
        Self { store, clock, outbox, leads, interval }
    }

    pub fn task(self: &Arc<Self>) -> Task {
        let scan = Arc::clone(self);
        Task::helper("expiry scan", move |stop| Arc::clone(&scan).run(stop))
    }

    async fn run(self: Arc<Self>, mut stop: Stop) {
        let mut complained = false;
        loop {
            match self.scan().await {
                Ok(written) => {
                    complained = false;
                    if written > 0 {
                        tracing::debug!(written, "expiry scan wrote events");
                    }
                }
                Err(e) if !complained => {
                    complained = true;
                    tracing::warn!(error = %e, "expiry scan failed; retrying");
                }
                Err(_) => {}
            }
            tokio::select! {
                () = &mut stop => return,
                () = tokio::time::sleep(self.interval) => {}
            }
        }
    }

    /// One scan; returns how many events it wrote.
    pub async fn scan(&self) -> Result<u64, StoreError> {
        let now = self.clock.now();
        let mut due: Vec<NewEvent> = Vec::new();
        for &lead in &self.leads {
            let Ok(lead_span) = chrono::Duration::from_std(lead) else { continue };
            for key in self.store.keys_expiring(now, now + lead_span, SCAN_LIMIT).await? {
                let Some(expires_at) = key.expires_at else { continue };
                // An expiry set already inside the lead was chosen knowingly:
                // no reminder for a lead that had begun when it was set.
                if key.updated_at >= expires_at - lead_span {
                    continue;
                }
                let name = lead_name(lead);
                let occasion = format!("expiring:{}:{name}:{}", key.id, expires_at.timestamp_micros());
                due.push(self.event(
                    EventType::Expiring,
                    &key,
                    now,
                    event_fields!(
                        "lead" => name,
                        "expires_at" => rfc3339(expires_at),
                        "last_used_at" => key.last_used_at.map(rfc3339),
                        "request_count" => key.request_count,
                    ),
                    occasion,
                ));
            }
        }
        for key in self.store.keys_expired(now - LOOKBACK, now, SCAN_LIMIT).await? {
            let Some(expires_at) = key.expires_at else { continue };
            let occasion = format!("expired:{}:{}", key.id, expires_at.timestamp_micros());
            due.push(self.event(
                EventType::Expired,
                &key,
                expires_at,
                event_fields!("expires_at" => rfc3339(expires_at)),
                occasion,
            ));
        }
        for key in self.store.keys_out_of_grace(now - LOOKBACK, now, SCAN_LIMIT).await? {
            let Some(ended) = key.revoked_at else { continue };
            let occasion = format!("grace_ended:{}", key.id);
            due.push(self.event(
                EventType::GraceEnded,
                &key,
                ended,
                event_fields!(
                    "successor_key_id" => key.replaced_by_key_id.clone(),
                    "grace_ended_at" => rfc3339(ended),
                ),
                occasion,
            ));
        }
        if due.is_empty() {
            return Ok(0);
        }
        let occasions: Vec<String> = due.iter().filter_map(|e| e.occasion.clone()).collect();
        let taken = self.store.occasions_taken(&occasions).await?;
        due.retain(|e| e.occasion.as_ref().is_some_and(|o| !taken.contains(o)));
        self.store.insert_scheduled(due).await
    }

    fn event(
        &self,
        kind: EventType,
        key: &StoredKey,
        at: DateTime<Utc>,
        extra: serde_json::Map<String, serde_json::Value>,
        occasion: String,
    ) -> NewEvent {
        self.outbox.event(kind, KeyFacts::of(key), SCHEDULER, at, extra, Some(occasion))
    }
}
