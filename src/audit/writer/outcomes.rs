//! The writer's outcome slots: a status RecordOutcomes reports for a row
//! still queued or being written is held next to it, put on the row if it
//! arrives before the insert, and written after the commit if it came
//! late.

use std::{
    sync::{PoisonError, atomic::Ordering},
    time::Duration,
};

use super::AuditWriter;
use crate::audit::AuditRecord;

impl AuditWriter {
    pub(super) fn hold(&self, batch: &[AuditRecord]) {
        self.counters.in_hand.store(batch.len() as u64, Ordering::Relaxed);
    }

    pub(super) fn apply_held_outcomes(&self, batch: &mut [AuditRecord]) {
        let held = self.outcomes.lock().unwrap_or_else(PoisonError::into_inner);
        for row in batch.iter_mut() {
            if let Some(Some(status)) = held.get(&row.id) {
                row.status = Some(*status);
            }
        }
    }

    /// Forgets the committed rows' outcome slots; returns outcomes that were
    /// reported after the batch was built, which the insert did not carry.
    pub(super) fn release_outcomes(&self, batch: &[AuditRecord]) -> Vec<(String, u16)> {
        let mut held = self.outcomes.lock().unwrap_or_else(PoisonError::into_inner);
        batch
            .iter()
            .filter_map(|row| match held.remove(&row.id) {
                Some(Some(status)) if row.status != Some(status) => Some((row.id.clone(), status)),
                _ => None,
            })
            .collect()
    }

    pub(super) async fn write_late_outcomes(
        &self,
        late: &[(String, u16)],
        deadline: Option<tokio::time::Instant>,
    ) {
        let mut backoff = Duration::from_millis(50);
        while let Err(e) = self.store.set_outcomes(late).await {
            tracing::warn!(error = %e, "writing late outcomes failed; retrying");
            if deadline.is_some_and(|d| tokio::time::Instant::now() + backoff > d) {
                tracing::error!(outcomes = late.len(), "late outcomes could not be written before shutdown");
                return;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }
}
