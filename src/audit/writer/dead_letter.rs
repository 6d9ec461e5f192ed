//! Rows the database refuses for what they hold: a refused batch is
//! written apart, in halves, down to the rows it refuses, which are kept as
//! dead letters (in the database, or in a file when it refuses those too).

use std::sync::atomic::Ordering;

use super::AuditWriter;
use crate::audit::AuditRecord;

impl AuditWriter {
    /// Writes a batch the database refused in halves, down to the rows it
    /// refuses, which become dead letters. A transient failure on the way
    /// is returned and the whole batch retried: its rows are upserts.
    pub(super) async fn isolate(
        &self,
        rows: &[AuditRecord],
        first: &crate::store::StoreError,
    ) -> Result<(), crate::store::StoreError> {
        tracing::warn!(error = %first, rows = rows.len(), "the database refused an audit batch; writing it apart");
        let mut parts = vec![rows];
        while let Some(part) = parts.pop() {
            match self.store.insert_audit_batch(part).await {
                Ok(()) => {}
                Err(e) if e.is_permanent() && part.len() > 1 => {
                    let (front, back) = part.split_at(part.len() / 2);
                    parts.push(back);
                    parts.push(front);
                }
                Err(e) if e.is_permanent() => self.dead_letter(&part[0], &e.to_string()).await?,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Keeps a refused row with why: in the database, or in a file when the
    /// database refuses the dead letter too.
    async fn dead_letter(&self, row: &AuditRecord, reason: &str) -> Result<(), crate::store::StoreError> {
        match self.store.insert_dead_letter(&row.id, &row.to_json(), reason, self.clock.now()).await {
            Ok(()) => {}
            Err(e) if e.is_permanent() => self.dead_letter_to_file(row, reason, &e.to_string()),
            Err(e) => return Err(e),
        }
        self.counters.dead_letters.fetch_add(1, Ordering::Relaxed);
        tracing::error!(audit_event_id = %row.id.escape_default(), reason, "audit row refused by the database; kept as a dead letter");
        Ok(())
    }

    fn dead_letter_to_file(&self, row: &AuditRecord, reason: &str, refused: &str) {
        use std::io::Write as _;
        let text = |s: &str| serde_json::Value::from(s).to_string();
        let line = format!(
            r#"{{"reason":{},"dead_letter_refused":{},"row":{}}}"#,
            text(reason),
            text(refused),
            row.to_json()
        );
        let mut options = std::fs::OpenOptions::new();
        options.create(true).append(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let written = options.open(&self.dead_letter_file).and_then(|mut f| writeln!(f, "{line}"));
        if let Err(e) = written {
            tracing::error!(
                audit_event_id = %row.id.escape_default(),
                file = %self.dead_letter_file.display(),
                error = %e,
                "audit row refused by the database and by the dead-letter file: lost"
            );
        }
    }
}
