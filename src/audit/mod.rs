//! The audit trail: its row ([`AuditRecord`] with its kinds and stored
//! forms, in [`record`]), the batching writer that gets verification rows
//! into the store without putting a database write on the Verify path
//! ([`writer`]), the local spool where rows wait while the database is slow or away
//! ([`spool`]), rollups of calls that belong to no merchant ([`rollup`]),
//! and the span that carries the same fields.
//!
//! Administrative actions do not go through the writer: their rows are
//! written in the same transaction as the change they record.

pub mod record;
pub mod retention;
pub mod rollup;
pub mod spool;
pub mod writer;

use chrono::{DateTime, Utc};

use crate::keys::{Decision, DenyReason};
pub use record::{AuditKind, AuditRecord, new_event_id};

/// Copies an audit row onto its span ([`crate::telemetry::verify_span`]):
/// the span and the stored row say the same thing. Absent fields stay unset.
pub fn record_on_span(span: &tracing::Span, r: &AuditRecord) {
    if span.is_disabled() {
        return;
    }
    span.record("keywarden.audit_event_id", r.id.as_str());
    span.record("keywarden.timestamp", r.timestamp.to_rfc3339().as_str());
    let optional = [
        ("keywarden.api_key_id", r.api_key_id.as_deref()),
        ("keywarden.api_key_name", r.api_key_name.as_deref()),
        ("keywarden.merchant_id", r.merchant_id.as_deref()),
        ("keywarden.endpoint", r.endpoint.as_deref()),
        ("keywarden.method", r.method.as_deref()),
        ("keywarden.decision", r.decision.map(Decision::as_str)),
        ("keywarden.deny_reason", r.deny_reason.map(DenyReason::as_str)),
        ("keywarden.key_prefix", r.key_prefix.as_deref()),
    ];
    for (field, value) in optional {
        if let Some(value) = value {
            span.record(field, value);
        }
    }
    if let Some(ip) = r.ip {
        span.record("keywarden.ip", tracing::field::display(ip));
    }
    if let Some(status) = r.status {
        span.record("keywarden.status", i64::from(status));
    }
}

/// How long after issue an audit row may still be queued somewhere.
pub const QUEUE_HORIZON: chrono::Duration = chrono::Duration::minutes(10);

/// Whether an id issued at `issued` could still be queued somewhere.
pub fn recently_issued(issued: DateTime<Utc>, now: DateTime<Utc>) -> bool {
    issued > now - QUEUE_HORIZON && issued < now + chrono::Duration::minutes(1)
}

#[cfg(test)]
mod tests {
    // Tests read the real clock to build their inputs.
    #![allow(clippy::disallowed_methods)]

    use super::*;

    #[test]
    fn only_recent_ids_count_as_possibly_queued() {
        let now = Utc::now();
        assert!(recently_issued(now, now));
        assert!(!recently_issued(now - QUEUE_HORIZON - chrono::Duration::seconds(1), now));
        assert!(!recently_issued(now + chrono::Duration::minutes(2), now), "from the future");
    }
}
