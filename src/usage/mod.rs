//! Usage counters: request_count, denied_count and last_used_at per key.
//!
//! Verify only touches an in-memory map; a flusher adds the accumulated
//! deltas to the key rows at least once per interval (`n = n + delta`, so
//! replicas never overwrite each other). A failed flush puts the deltas back,
//! so an outage delays counts but loses none.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use chrono::{DateTime, Utc};
use tokio::sync::Mutex as AsyncMutex;

use crate::store::{Store, StoreError, keys::UsageDelta};

#[derive(Debug)]
pub struct UsageTracker {
    store: Store,
    pending: Mutex<HashMap<String, UsageDelta>>,
    /// Held while a flush is in flight, so readers never see a delta both in
    /// memory and in the database, or in neither.
    flushing: AsyncMutex<()>,
    last_flushed: Mutex<std::time::Instant>,
}

impl UsageTracker {
    pub fn new(store: Store) -> Arc<Self> {
        Arc::new(Self {
            store,
            pending: Mutex::new(HashMap::new()),
            flushing: AsyncMutex::new(()),
            last_flushed: Mutex::new(std::time::Instant::now()),
        })
    }

    fn with_delta(&self, key_id: &str, f: impl FnOnce(&mut UsageDelta)) {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        match pending.get_mut(key_id) {
            Some(delta) => f(delta),
            None => f(pending.entry(key_id.to_owned()).or_default()),
        }
    }

    pub fn record_allowed(&self, key_id: &str, at: DateTime<Utc>) {
        self.with_delta(key_id, |d| {
            d.allowed += 1;
            d.last_used_at = d.last_used_at.max(Some(at));
        });
    }

    pub fn record_denied(&self, key_id: &str) {
        self.with_delta(key_id, |d| d.denied += 1);
    }

    /// Time since everything in memory was last written.
    pub fn since_last_flush(&self) -> Duration {
        self.last_flushed.lock().unwrap_or_else(PoisonError::into_inner).elapsed()
    }

    /// Keys with unflushed usage.
    pub fn pending_keys(&self) -> usize {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// Holds off flushes while the guard lives, so a database read plus
    /// [`Self::pending`] counts every use exactly once.
    pub async fn pause_flush(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.flushing.lock().await
    }

    /// Usage of `key_id` not yet written to the database.
    pub fn pending(&self, key_id: &str) -> UsageDelta {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner).get(key_id).copied().unwrap_or_default()
    }

    /// Writes everything accumulated so far. On failure the deltas go back.
    pub async fn flush(&self) -> Result<usize, StoreError> {
        let _flush = self.flushing.lock().await;
        let batch: Vec<(String, UsageDelta)> =
            std::mem::take(&mut *self.pending.lock().unwrap_or_else(PoisonError::into_inner))
                .into_iter()
                .collect();
        if batch.is_empty() {
            *self.last_flushed.lock().unwrap_or_else(PoisonError::into_inner) = std::time::Instant::now();
            return Ok(0);
        }
        match self.store.apply_usage(&batch).await {
            Ok(()) => {
                *self.last_flushed.lock().unwrap_or_else(PoisonError::into_inner) = std::time::Instant::now();
                Ok(batch.len())
            }
            Err(e) => {
                let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
                for (key_id, delta) in batch {
                    let merged = pending.entry(key_id).or_default();
                    merged.allowed += delta.allowed;
                    merged.denied += delta.denied;
                    merged.last_used_at = merged.last_used_at.max(delta.last_used_at);
                }
                Err(e)
            }
        }
    }

    /// Flushes every `interval` until `stop` resolves, then flushes what is
    /// left, retrying until `final_deadline` passes. Returns how many keys'
    /// counts could not be written (0 is the only good answer).
    pub async fn run(
        self: Arc<Self>,
        interval: Duration,
        stop: impl Future<Output = ()>,
        final_deadline: Duration,
    ) -> usize {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    if let Err(e) = self.flush().await {
                        tracing::warn!(error = %e, pending_keys = self.pending_keys(), "usage flush failed; will retry");
                    }
                }
                () = &mut stop => break,
            }
        }
        let give_up = tokio::time::Instant::now() + final_deadline;
        loop {
            match self.flush().await {
                Ok(_) => return 0,
                Err(e) if tokio::time::Instant::now() < give_up => {
                    tracing::warn!(error = %e, "final usage flush failed; retrying");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => {
                    let lost = self.pending_keys();
                    tracing::error!(error = %e, pending_keys = lost, "usage counts could not be written before shutdown");
                    return lost;
                }
            }
        }
    }
}
