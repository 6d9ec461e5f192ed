//! Audit and usage settings: the queue and its writer, the spool, rollups,
//! retention, and the flushes that shutdown waits for.

use std::{path::PathBuf, time::Duration};

use serde::Deserialize;

use super::{DEAD_LETTER_FILE, Settings};

/// What Verify does when the audit queue is full.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Overflow {
    /// Wait for room: Verify slows down rather than lose a row.
    #[default]
    Block,
    /// Drop the row, count it and log it: Verify never waits on auditing.
    Drop,
}

#[derive(Debug, Clone)]
pub struct AuditSettings {
    pub capacity: usize,
    pub batch_size: usize,
    /// How long a batch may wait to fill before it is written: fewer, larger
    /// inserts under load, at most this much delay when idle.
    pub linger: Duration,
    pub overflow: Overflow,
    /// How long Verify may wait for room in a full queue before the
    /// overflow mode applies (UNAVAILABLE under `block`, a counted loss
    /// under `drop`).
    pub wait: Duration,
    /// Where audit rows go that the database refuses, also as dead letters.
    pub dead_letter_file: PathBuf,
    /// How long an audit write may take before its batch goes to the spool.
    pub spill_after: Duration,
}

impl Settings {
    pub fn audit(&self) -> AuditSettings {
        AuditSettings {
            capacity: self.audit_queue_capacity,
            batch_size: self.audit_batch_size,
            linger: Duration::from_millis(self.audit_linger_ms),
            overflow: self.audit_overflow,
            wait: Duration::from_millis(self.audit_queue_wait_ms),
            dead_letter_file: self.data_dir.join(DEAD_LETTER_FILE),
            spill_after: Duration::from_millis(self.audit_spill_after_ms.max(1)),
        }
    }

    pub fn audit_rollup_interval(&self) -> Duration {
        Duration::from_millis(self.audit_rollup_interval_ms.max(10))
    }

    pub fn audit_retention(&self) -> Option<chrono::Duration> {
        (self.audit_retention_days > 0).then(|| chrono::Duration::days(i64::from(self.audit_retention_days)))
    }

    pub fn audit_retention_interval(&self) -> Duration {
        Duration::from_millis(self.audit_retention_interval_ms.max(10))
    }

    /// The spool's directory, if there is a spool.
    pub fn audit_spool_dir(&self) -> Option<PathBuf> {
        (self.audit_spool_max_bytes > 0)
            .then(|| self.audit_spool_dir.clone().unwrap_or_else(|| self.data_dir.join("spool")))
    }

    pub fn usage_flush_interval(&self) -> Duration {
        Duration::from_millis(self.usage_flush_interval_ms.max(10))
    }

    pub fn flush_timeout(&self) -> Duration {
        Duration::from_millis(self.flush_timeout_ms)
    }
}
