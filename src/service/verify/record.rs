//! What a decided call leaves behind: one audit row, built once from the
//! call and its outcome ([`Row`]), queued for the writer or counted in a
//! rollup when it belongs to no merchant, and copied onto the call's span.
//! For the pipeline and for requests refused before a key is looked at
//! alike.

use std::{net::IpAddr, sync::Arc};

use chrono::{DateTime, Utc};

use super::Grant;
use crate::{
    audit::{
        self, AuditKind, AuditRecord,
        rollup::Rollups,
        writer::{AuditQueue, QueueError},
    },
    keys::{Decision, DenyReason, EventIds, KeyState, LookupPrefix},
    service::ServiceError,
    telemetry,
};

/// A decided call, as its audit row needs it.
pub(super) struct Row<'a> {
    pub now: DateTime<Utc>,
    pub endpoint: String,
    pub method: String,
    pub ip: Option<IpAddr>,
    /// The lookup prefix of a well-formed key.
    pub prefix: Option<LookupPrefix>,
    /// The key the call named: the one allowed or denied, or the owner of
    /// a prefix presented with a wrong secret.
    pub key: Option<&'a KeyState>,
    pub outcome: &'a Result<Grant, DenyReason>,
}

impl Row<'_> {
    /// The stored row, its id still to be given.
    fn into_record(self) -> AuditRecord {
        let mut record =
            AuditRecord::with_id(String::new(), AuditKind::Verify, self.now, telemetry::current_trace_id());
        record.endpoint = Some(self.endpoint).filter(|s| !s.is_empty());
        record.method = Some(self.method).filter(|s| !s.is_empty());
        record.ip = self.ip;
        record.key_prefix = self.prefix.map(|p| p.as_str().to_owned());
        if let Some(key) = self.key {
            record.merchant_id = Some(key.merchant_id.clone());
            record.api_key_id = Some(key.key_id.to_string());
            record.api_key_name = Some(key.name.clone());
        }
        match self.outcome {
            Ok(_) => record.decision = Some(Decision::Allow),
            Err(reason) => {
                record.decision = Some(Decision::Deny);
                record.deny_reason = Some(*reason);
                record.status = Some(reason.http_status());
            }
        }
        record
    }
}

#[derive(Debug)]
pub(super) struct Recorder {
    pub audit: AuditQueue,
    /// Mints the ids of queued rows.
    pub ids: EventIds,
    pub rollups: Arc<Rollups>,
}

impl Recorder {
    /// Records a decided call; returns its audit id. A denial that belongs
    /// to no merchant is counted in a rollup row, not queued: garbage
    /// cannot take the queue's room from real keys.
    pub async fn record(&self, row: Row<'_>, span: &tracing::Span) -> Result<String, ServiceError> {
        if row.key.is_none()
            && let Err(reason) = row.outcome
        {
            return Ok(self.roll_up(row, *reason, span));
        }
        let mut record = row.into_record();
        record.id = self.ids.mint();
        audit::record_on_span(span, &record);
        let id = record.id.clone();
        self.audit.push(record).await.map_err(|e| match e {
            QueueError::Closed => ServiceError::Unavailable("the server is shutting down".into()),
            QueueError::Full => {
                ServiceError::Unavailable("the audit trail is not keeping up; retry with backoff".into())
            }
        })?;
        Ok(id)
    }

    /// Counts a denial that belongs to no merchant in its rollup row;
    /// returns the rollup's id.
    pub fn roll_up(&self, row: Row<'_>, reason: DenyReason, span: &tracing::Span) -> String {
        let mut record = row.into_record();
        record.id = self.rollups.add(&record, reason);
        audit::record_on_span(span, &record);
        record.id
    }
}
