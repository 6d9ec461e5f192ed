//! The writer's hand-off to its local spool: a batch the database cannot
//! take in time goes to disk ([`AuditWriter::spill`]), and spooled rows go
//! back to the database oldest first, in chunks sized by how long inserts
//! take, with the outcomes reported while they waited.

use std::{
    sync::{PoisonError, atomic::Ordering},
    time::Duration,
};

use super::AuditWriter;
use crate::audit::{AuditRecord, spool::SpoolError};

/// Why a replay stopped short.
#[derive(Debug, thiserror::Error)]
pub(super) enum ReplayError {
    #[error("reading the audit spool: {0}")]
    Read(std::io::Error),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// How long one replay turn may run before new batches get their turn.
pub(super) const REPLAY_BUDGET: Duration = Duration::from_millis(200);
/// Rows per replayed insert at most. The size follows how long inserts
/// take: halved (down to [`REPLAY_MIN_ROWS`]) after one that ran past
/// [`REPLAY_BUDGET`], doubled after one that took under a quarter of it.
pub(super) const REPLAY_MAX_ROWS: usize = 2_000;
const REPLAY_MIN_ROWS: usize = 50;
/// A replayed insert still running after this many budgets is taken for
/// stuck (a half-open connection) and abandoned. Anything shorter would
/// throw away inserts that were merely slow, and a replay has nowhere else
/// to put its rows: abandoning them only makes the next try start over.
const REPLAY_STUCK_BUDGETS: u32 = 10;

impl AuditWriter {
    pub(super) fn spool_has_rows(&self) -> bool {
        self.spool.as_ref().is_some_and(|s| !s.is_empty())
    }

    /// Puts `batch` on the spool (clearing it); false if there is no spool
    /// or it refused the batch (full, or a disk error), so that the caller
    /// keeps retrying the database and the overflow mode applies.
    pub(super) fn spill(&self, batch: &mut Vec<AuditRecord>) -> bool {
        let Some(spool) = &self.spool else { return false };
        match spool.append(batch) {
            Ok(()) => {
                let late = self.release_outcomes(batch);
                self.late.lock().unwrap_or_else(PoisonError::into_inner).extend(late);
                batch.clear();
                self.hold(batch);
                true
            }
            Err(e @ SpoolError::Full(_)) => {
                tracing::warn!(error = %e, rows = batch.len(), "audit spool full; waiting for the database");
                false
            }
            Err(e) => {
                tracing::error!(error = %e, rows = batch.len(), "audit spool unwritable; waiting for the database");
                false
            }
        }
    }

    /// Replays spooled rows into the database, oldest first, for about
    /// `budget`, with the outcomes reported for them while they were spooled.
    pub(super) async fn replay(&self, budget: Duration) -> Result<(), ReplayError> {
        let Some(spool) = &self.spool else { return Ok(()) };
        let until = tokio::time::Instant::now() + budget;
        while tokio::time::Instant::now() < until {
            let rows = self.replay_rows.load(Ordering::Relaxed).min(self.batch_size);
            let chunk = match spool.read_chunk(rows) {
                Ok(Some(chunk)) => chunk,
                Ok(None) => break,
                // Backed off by the caller like a failed write: a spool that
                // cannot be read (its directory gone, a disk error) must not
                // be retried in a tight loop.
                Err(e) => return Err(ReplayError::Read(e)),
            };
            if chunk.unreadable > 0 {
                tracing::error!(lines = chunk.unreadable, "unreadable audit spool lines skipped");
            }
            let mut chunk = chunk;
            {
                let mut late = self.late.lock().unwrap_or_else(PoisonError::into_inner);
                for row in &mut chunk.rows {
                    if let Some(status) = late.remove(&row.id) {
                        row.status = Some(status);
                    }
                }
            }
            if !chunk.rows.is_empty() {
                // Sized to take about a budget, so the queue is attended
                // between chunks; only a stuck insert is abandoned.
                let started = tokio::time::Instant::now();
                let stuck = (REPLAY_BUDGET * REPLAY_STUCK_BUDGETS).max(self.spill_after);
                let attempt = tokio::time::timeout(stuck, self.store.insert_audit_batch(&chunk.rows));
                let halved = (rows / 2).max(REPLAY_MIN_ROWS);
                match attempt.await {
                    Ok(Ok(())) => {
                        let took = started.elapsed();
                        let next = if took > REPLAY_BUDGET {
                            halved
                        } else if took < REPLAY_BUDGET / 4 {
                            (rows * 2).min(REPLAY_MAX_ROWS)
                        } else {
                            rows
                        };
                        self.replay_rows.store(next, Ordering::Relaxed);
                    }
                    Ok(Err(e)) if e.is_permanent() => self.isolate(&chunk.rows, &e).await?,
                    Ok(Err(e)) => return Err(e.into()),
                    Err(_) => {
                        self.replay_rows.store(halved, Ordering::Relaxed);
                        return Err(crate::store::StoreError::Unavailable(sea_orm::DbErr::Custom(format!(
                            "a replayed insert of {} rows was still running after {} ms",
                            chunk.rows.len(),
                            stuck.as_millis()
                        )))
                        .into());
                    }
                }
            }
            if let Err(e) = spool.commit(&chunk) {
                tracing::error!(error = %e, "recording audit spool progress failed");
                break;
            }
            self.counters.written.fetch_add(chunk.rows.len() as u64, Ordering::Relaxed);
            if spool.is_empty() {
                break;
            }
        }
        Ok(())
    }
}
