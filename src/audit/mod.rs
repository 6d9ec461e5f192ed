//! The audit trail: what one audit row says ([`AuditRecord`]) and the
//! batching writer that gets verification rows into the store without
//! putting a database write on the Verify path ([`writer`]).
//!
//! Administrative actions do not go through the writer: their rows are
//! written in the same transaction as the change they record.

pub mod writer;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::keys::{Decision, DenyReason};

/// What an audit row records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditKind {
    Verify,
    KeyCreated,
    KeyUpdated,
    KeyRevoked,
    KeyRegenerated,
}

impl AuditKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Verify => "VERIFY",
            Self::KeyCreated => "KEY_CREATED",
            Self::KeyUpdated => "KEY_UPDATED",
            Self::KeyRevoked => "KEY_REVOKED",
            Self::KeyRegenerated => "KEY_REGENERATED",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::Verify, Self::KeyCreated, Self::KeyUpdated, Self::KeyRevoked, Self::KeyRegenerated]
            .into_iter()
            .find(|k| k.as_str() == s)
    }
}

/// One audit row. Verification rows carry the documented eight fields
/// (timestamp, key id and name, merchant, endpoint, method, status, ip).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    pub id: String,
    pub timestamp: DateTime<Utc>,
    pub kind: AuditKind,
    pub merchant_id: Option<String>,
    pub api_key_id: Option<String>,
    pub api_key_name: Option<String>,
    /// Lookup prefix of a well-formed presented key.
    pub key_prefix: Option<String>,
    pub endpoint: Option<String>,
    pub method: Option<String>,
    pub ip: Option<String>,
    /// 401/403 for denials; the reported status for allowed calls, once known.
    pub status: Option<u16>,
    pub decision: Option<Decision>,
    pub deny_reason: Option<DenyReason>,
    /// Admin token name for administrative actions.
    pub actor: Option<String>,
    pub trace_id: Option<String>,
    pub detail: Option<String>,
}

impl AuditRecord {
    /// An empty row of `kind` with a fresh id.
    pub fn new(kind: AuditKind, at: DateTime<Utc>) -> Self {
        Self {
            id: new_event_id(),
            timestamp: at,
            kind,
            merchant_id: None,
            api_key_id: None,
            api_key_name: None,
            key_prefix: None,
            endpoint: None,
            method: None,
            ip: None,
            status: None,
            decision: None,
            deny_reason: None,
            actor: None,
            trace_id: crate::telemetry::current_trace_id(),
            detail: None,
        }
    }

    /// A row for an administrative action on a key, by `actor`. Without a
    /// name, the store fills in the key's name as of the change.
    pub fn admin(
        kind: AuditKind,
        at: DateTime<Utc>,
        actor: &str,
        merchant_id: &str,
        key_id: &str,
        key_name: Option<&str>,
    ) -> Self {
        Self {
            merchant_id: Some(merchant_id.to_owned()),
            api_key_id: Some(key_id.to_owned()),
            api_key_name: key_name.map(str::to_owned),
            actor: Some(actor.to_owned()),
            ..Self::new(kind, at)
        }
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }
}

/// The `keywarden.verify` span, with a slot for every audit field so that
/// [`record_on_span`] can fill them once the decision is made.
pub fn verify_span() -> tracing::Span {
    use tracing::field::Empty;
    tracing::trace_span!(
        "keywarden.verify",
        otel.kind = "server",
        keywarden.audit_event_id = Empty,
        keywarden.timestamp = Empty,
        keywarden.api_key_id = Empty,
        keywarden.api_key_name = Empty,
        keywarden.merchant_id = Empty,
        keywarden.endpoint = Empty,
        keywarden.method = Empty,
        keywarden.status = Empty,
        keywarden.ip = Empty,
        keywarden.decision = Empty,
        keywarden.deny_reason = Empty,
        keywarden.key_prefix = Empty,
    )
}

/// Copies an audit row onto its span: the span and the stored row say the
/// same thing. Absent fields stay unset.
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
        ("keywarden.ip", r.ip.as_deref()),
        ("keywarden.decision", r.decision.map(Decision::as_str)),
        ("keywarden.deny_reason", r.deny_reason.map(DenyReason::as_str)),
        ("keywarden.key_prefix", r.key_prefix.as_deref()),
    ];
    for (field, value) in optional {
        if let Some(value) = value {
            span.record(field, value);
        }
    }
    if let Some(status) = r.status {
        span.record("keywarden.status", i64::from(status));
    }
}

/// How long after issue an audit row may still be queued somewhere.
pub const QUEUE_HORIZON: chrono::Duration = chrono::Duration::minutes(10);

/// Whether `id` is a UUIDv7 minted within [`QUEUE_HORIZON`] of `now`: an id
/// some replica could have issued and not yet written.
pub fn recently_issued(id: &str, now: DateTime<Utc>) -> bool {
    let Ok(uuid) = Uuid::parse_str(id) else { return false };
    if uuid.get_version_num() != 7 {
        return false;
    }
    let Some((secs, nanos)) = uuid.get_timestamp().map(|t| t.to_unix()) else { return false };
    let Some(issued) = i64::try_from(secs).ok().and_then(|s| DateTime::from_timestamp(s, nanos)) else {
        return false;
    };
    issued > now - QUEUE_HORIZON && issued < now + chrono::Duration::minutes(1)
}

/// Time-ordered ids (UUIDv7), so ids sort roughly like their timestamps.
pub fn new_event_id() -> String {
    Uuid::now_v7().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_recent_v7_ids_count_as_possibly_queued() {
        let now = Utc::now();
        assert!(recently_issued(&new_event_id(), now));
        assert!(!recently_issued(&new_event_id(), now + QUEUE_HORIZON + chrono::Duration::seconds(1)));
        assert!(!recently_issued(&Uuid::nil().to_string(), now));
        assert!(!recently_issued("not-a-uuid", now));
        assert!(!recently_issued("0190aaaa-0000-7000-8000-000000000000", now), "a v7 id from 2024");
    }
}
