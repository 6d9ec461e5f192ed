//! The audit row as the domain sees it ([`AuditRecord`]: what happened,
//! to which key, from where, with what outcome), its kinds, and its two
//! serialized forms: the `audit_events` columns (through the store's
//! [`AuditRow`] mapping) and one line of JSON for the spool and dead
//! letters.
//!
//! The store writes and reads rows through [`AuditRow`] without knowing
//! this type, so it stays below the audit layer.

use std::net::IpAddr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{
    keys::{Decision, DenyReason},
    store::{
        StoreError,
        audit::{AuditRow, Cell, Cells, Column},
        entity::audit_event,
    },
};

/// What an audit row records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuditKind {
    Verify,
    KeyCreated,
    KeyUpdated,
    KeyRevoked,
    KeyRegenerated,
    /// A KeyAdmin call outside the caller's role or merchants.
    AccessDenied,
    /// A KeyAdmin call without valid credentials.
    AuthenticationFailed,
    OperatorTokenCreated,
    OperatorTokenRevoked,
    /// Verify calls that belong to no merchant (malformed keys, unknown
    /// prefixes, throttled checks), one row per minute and distinct request.
    VerifyRollup,
    KeyDisabled,
    KeyEnabled,
    /// A leak report proved the key and revoked it.
    KeyLeaked,
}

impl AuditKind {
    const ALL: [Self; 13] = [
        Self::Verify,
        Self::KeyCreated,
        Self::KeyUpdated,
        Self::KeyRevoked,
        Self::KeyRegenerated,
        Self::AccessDenied,
        Self::AuthenticationFailed,
        Self::OperatorTokenCreated,
        Self::OperatorTokenRevoked,
        Self::VerifyRollup,
        Self::KeyDisabled,
        Self::KeyEnabled,
        Self::KeyLeaked,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            // The store's outcome queries name this kind themselves (a unit
            // test holds the two together).
            Self::Verify => crate::store::audit::VERIFY_KIND,
            Self::KeyCreated => "KEY_CREATED",
            Self::KeyUpdated => "KEY_UPDATED",
            Self::KeyRevoked => "KEY_REVOKED",
            Self::KeyRegenerated => "KEY_REGENERATED",
            Self::AccessDenied => "ACCESS_DENIED",
            Self::AuthenticationFailed => "AUTHENTICATION_FAILED",
            Self::OperatorTokenCreated => "OPERATOR_TOKEN_CREATED",
            Self::OperatorTokenRevoked => "OPERATOR_TOKEN_REVOKED",
            Self::VerifyRollup => "VERIFY_ROLLUP",
            Self::KeyDisabled => "KEY_DISABLED",
            Self::KeyEnabled => "KEY_ENABLED",
            Self::KeyLeaked => "KEY_LEAKED",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
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
    /// The caller's address: the one Verify was asked about, or the
    /// KeyAdmin peer's.
    pub ip: Option<IpAddr>,
    /// 401/403 for denials; the reported status for allowed calls, once known.
    pub status: Option<u16>,
    pub decision: Option<Decision>,
    pub deny_reason: Option<DenyReason>,
    /// Who acted, for administrative actions and refusals: the operator
    /// token's or bootstrap token's name, or the client identity.
    pub actor: Option<String>,
    pub trace_id: Option<String>,
    pub detail: Option<String>,
    /// How many calls a rollup row stands for.
    pub count: Option<u32>,
}

impl AuditRecord {
    /// An empty row of `kind` with a fresh id, in the trace `trace_id`.
    pub fn new(kind: AuditKind, at: DateTime<Utc>, trace_id: Option<String>) -> Self {
        Self::with_id(new_event_id(), kind, at, trace_id)
    }

    /// An empty row of `kind` with the id `id`.
    pub fn with_id(id: String, kind: AuditKind, at: DateTime<Utc>, trace_id: Option<String>) -> Self {
        Self {
            id,
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
            trace_id,
            detail: None,
            count: None,
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
        trace_id: Option<String>,
    ) -> Self {
        Self {
            merchant_id: Some(merchant_id.to_owned()),
            api_key_id: Some(key_id.to_owned()),
            api_key_name: key_name.map(str::to_owned),
            actor: Some(actor.to_owned()),
            ..Self::new(kind, at, trace_id)
        }
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }
}

/// Time-ordered ids (UUIDv7), so ids sort roughly like their timestamps.
pub fn new_event_id() -> String {
    Uuid::now_v7().to_string()
}

impl AuditRow for AuditRecord {
    fn cells(&self) -> Cells<'_> {
        use Cell::{Int, Ip, Text, Time};
        [
            (Column::Id, Text(Some(&self.id))),
            (Column::Timestamp, Time(self.timestamp)),
            (Column::Kind, Text(Some(self.kind.as_str()))),
            (Column::MerchantId, Text(self.merchant_id.as_deref())),
            (Column::ApiKeyId, Text(self.api_key_id.as_deref())),
            (Column::ApiKeyName, Text(self.api_key_name.as_deref())),
            (Column::KeyPrefix, Text(self.key_prefix.as_deref())),
            (Column::Endpoint, Text(self.endpoint.as_deref())),
            (Column::Method, Text(self.method.as_deref())),
            (Column::Ip, Ip(self.ip)),
            (Column::Status, Int(self.status.map(i32::from))),
            (Column::Decision, Text(self.decision.map(Decision::as_str))),
            (Column::DenyReason, Text(self.deny_reason.map(DenyReason::as_str))),
            (Column::Actor, Text(self.actor.as_deref())),
            (Column::TraceId, Text(self.trace_id.as_deref())),
            (Column::Detail, Text(self.detail.as_deref())),
            (Column::Count, Int(self.count.map(|c| i32::try_from(c).unwrap_or(i32::MAX)))),
        ]
    }

    fn name_key(&mut self, name: &str) {
        if self.api_key_name.is_none() {
            self.api_key_name = Some(name.to_owned());
        }
    }

    fn from_model(m: audit_event::Model) -> Result<Self, StoreError> {
        let corrupt = |what: &'static str, value: &str| StoreError::Corrupt {
            id: m.id.clone(),
            what,
            detail: format!("{value:?}"),
        };
        let kind = AuditKind::parse(&m.kind).ok_or_else(|| corrupt("audit kind", &m.kind))?;
        let decision = match &m.decision {
            Some(d) => Some(Decision::parse(d).ok_or_else(|| corrupt("decision", d))?),
            None => None,
        };
        let deny_reason = match &m.deny_reason {
            Some(r) => Some(DenyReason::parse(r).ok_or_else(|| corrupt("deny reason", r))?),
            None => None,
        };
        let ip = match &m.ip {
            Some(ip) => Some(ip.parse().map_err(|_| corrupt("ip address", ip))?),
            None => None,
        };
        Ok(Self {
            kind,
            decision,
            deny_reason,
            ip,
            status: m.status.and_then(|s| u16::try_from(s).ok()),
            id: m.id,
            timestamp: m.timestamp,
            merchant_id: m.merchant_id,
            api_key_id: m.api_key_id,
            api_key_name: m.api_key_name,
            key_prefix: m.key_prefix,
            endpoint: m.endpoint,
            method: m.method,
            actor: m.actor,
            trace_id: m.trace_id,
            detail: m.detail,
            count: m.count.and_then(|c| u32::try_from(c).ok()),
        })
    }
}

/// A row as JSON, for the spool and dead letters: its fields by name,
/// enums by their stored names, absent fields left out. serde_json escapes
/// what a database might refuse in text (NUL among them).
#[derive(Debug, Serialize, Deserialize)]
struct JsonRow {
    id: String,
    /// Microseconds since the epoch (the stored precision).
    ts: i64,
    kind: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    merchant_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    api_key_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    api_key_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    key_prefix: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    endpoint: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    method: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    ip: Option<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    decision: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    deny_reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    actor: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    trace_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    detail: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    count: Option<u32>,
}

impl JsonRow {
    fn of(r: &AuditRecord) -> Self {
        Self {
            id: r.id.clone(),
            ts: r.timestamp.timestamp_micros(),
            kind: r.kind.as_str().to_owned(),
            merchant_id: r.merchant_id.clone(),
            api_key_id: r.api_key_id.clone(),
            api_key_name: r.api_key_name.clone(),
            key_prefix: r.key_prefix.clone(),
            endpoint: r.endpoint.clone(),
            method: r.method.clone(),
            ip: r.ip,
            status: r.status,
            decision: r.decision.map(|d| d.as_str().to_owned()),
            deny_reason: r.deny_reason.map(|d| d.as_str().to_owned()),
            actor: r.actor.clone(),
            trace_id: r.trace_id.clone(),
            detail: r.detail.clone(),
            count: r.count,
        }
    }

    fn into_record(self) -> Option<AuditRecord> {
        Some(AuditRecord {
            id: self.id,
            timestamp: DateTime::from_timestamp_micros(self.ts)?,
            kind: AuditKind::parse(&self.kind)?,
            merchant_id: self.merchant_id,
            api_key_id: self.api_key_id,
            api_key_name: self.api_key_name,
            key_prefix: self.key_prefix,
            endpoint: self.endpoint,
            method: self.method,
            ip: self.ip,
            status: self.status,
            decision: match self.decision {
                Some(d) => Some(Decision::parse(&d)?),
                None => None,
            },
            deny_reason: match self.deny_reason {
                Some(r) => Some(DenyReason::parse(&r)?),
                None => None,
            },
            actor: self.actor,
            trace_id: self.trace_id,
            detail: self.detail,
            count: self.count,
        })
    }
}

impl AuditRecord {
    /// The row as one line of JSON: its fields by name, enums by their
    /// stored names, absent fields left out.
    pub fn to_json(&self) -> String {
        // A row always serializes: strings, numbers and enum names.
        serde_json::to_string(&JsonRow::of(self)).unwrap_or_default()
    }

    /// A row from [`AuditRecord::to_json`]'s form; `None` if it is not one.
    pub fn from_json(json: &[u8]) -> Option<Self> {
        serde_json::from_slice::<JsonRow>(json).ok().and_then(JsonRow::into_record)
    }
}

#[cfg(test)]
mod tests {
    // Tests read the real clock to build their inputs.
    #![allow(clippy::disallowed_methods)]

    use chrono::TimeZone;
    use sea_orm::Iterable;

    use super::*;
    use crate::store::{Cursor, audit::AuditQuery};

    #[test]
    fn cells_are_the_entity_columns_in_the_entity_order() {
        let r = AuditRecord::new(AuditKind::Verify, Utc::now(), None);
        let columns: Vec<String> = r.cells().iter().map(|(c, _)| format!("{c:?}")).collect();
        let entity: Vec<String> = Column::iter().map(|c| format!("{c:?}")).collect();
        assert_eq!(columns, entity);
    }

    #[test]
    fn every_kind_reads_back_from_its_stored_name() {
        for kind in AuditKind::ALL {
            assert_eq!(AuditKind::parse(kind.as_str()), Some(kind));
        }
        assert_eq!(AuditKind::Verify.as_str(), "VERIFY");
    }

    #[test]
    fn a_row_survives_its_json_form_with_its_address_typed() {
        let row = AuditRecord {
            ip: Some("2001:db8::7".parse().unwrap()),
            decision: Some(Decision::Deny),
            deny_reason: Some(DenyReason::IpNotAllowed),
            detail: Some("nul \0 and \"quotes\"".into()),
            ..AuditRecord::new(AuditKind::Verify, Utc::now(), Some("t".into()))
        };
        let json = row.to_json();
        assert!(json.contains(r#""ip":"2001:db8::7""#), "{json}");
        let back = AuditRecord::from_json(json.as_bytes()).unwrap();
        assert_eq!(back.ip, row.ip);
        assert_eq!(back.timestamp.timestamp_micros(), row.timestamp.timestamp_micros());
        assert_eq!(
            AuditRecord::from_json(br#"{"id":"x","ts":0,"kind":"VERIFY","ip":"not an address"}"#),
            None
        );
    }

    fn row(id: &str, at: DateTime<Utc>) -> AuditRecord {
        AuditRecord {
            id: id.into(),
            merchant_id: Some("m".into()),
            decision: Some(Decision::Allow),
            ip: Some("192.0.2.9".parse().unwrap()),
            ..AuditRecord::new(AuditKind::Verify, at, None)
        }
    }

    fn key_row(id: &str, merchant: Option<&str>, key: Option<&str>, at: DateTime<Utc>) -> AuditRecord {
        AuditRecord { merchant_id: merchant.map(Into::into), api_key_id: key.map(Into::into), ..row(id, at) }
    }

    /// The write order is the indexes', not time's: listing must not care.
    #[tokio::test]
    async fn rows_of_interleaved_keys_list_newest_first_after_a_batch() {
        let (store, _dir) = crate::store::temp_sqlite_store().await;
        let t =
            |ms| Utc.with_ymd_and_hms(2026, 11, 28, 12, 0, 0).unwrap() + chrono::Duration::milliseconds(ms);
        let rows: Vec<AuditRecord> = (0..40)
            .map(|i| key_row(&format!("01-{i:02}"), Some("m"), Some(["kb", "ka", "kc"][i % 3]), t(i as i64)))
            .collect();
        store.insert_audit_batch(&rows).await.unwrap();

        let all = AuditQuery { merchant_id: Some("m"), api_key_id: None, start: None, end: None };
        let listed: Vec<AuditRecord> = store.list_audit(&all, None, 100).await.unwrap();
        let newest_first: Vec<&AuditRecord> = rows.iter().rev().collect();
        assert_eq!(listed.iter().collect::<Vec<_>>(), newest_first);
        let ka = AuditQuery { api_key_id: Some("ka"), ..all };
        let listed: Vec<AuditRecord> = store.list_audit(&ka, None, 100).await.unwrap();
        let expected: Vec<&AuditRecord> =
            rows.iter().rev().filter(|r| r.api_key_id.as_deref() == Some("ka")).collect();
        assert_eq!(listed.iter().collect::<Vec<_>>(), expected);
    }

    /// SQLite compares timestamps as text: a batched row must be written in
    /// the exact form sea-orm binds for the same instant, or time filters and
    /// page cursors at a row's own timestamp would miss it. Whole
    /// milliseconds are the case where the shortest form differs from a
    /// fixed six-digit fraction.
    #[tokio::test]
    async fn batched_rows_match_bound_timestamps_exactly_on_sqlite() {
        let (store, _dir) = crate::store::temp_sqlite_store().await;
        let whole_ms =
            Utc.with_ymd_and_hms(2026, 11, 27, 10, 0, 0).unwrap() + chrono::Duration::milliseconds(500);
        let with_us = whole_ms + chrono::Duration::microseconds(7);
        let rows = [row("01-a", whole_ms), row("01-b", whole_ms), row("01-c", with_us)];
        store.insert_audit_batch(&rows).await.unwrap();

        for r in &rows {
            assert_eq!(store.get_audit::<AuditRecord>(&r.id).await.unwrap().as_ref(), Some(r), "round trip");
        }
        let at = |start, end| AuditQuery {
            merchant_id: Some("m"),
            api_key_id: None,
            start: Some(start),
            end: Some(end),
        };
        let found: Vec<AuditRecord> = store
            .list_audit(&at(whole_ms, whole_ms + chrono::Duration::microseconds(1)), None, 10)
            .await
            .unwrap();
        assert_eq!(found.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["01-b", "01-a"]);
        let cursor = Cursor { at: whole_ms, id: "01-b".into() };
        let next: Vec<AuditRecord> =
            store.list_audit(&at(whole_ms, with_us), Some(cursor), 10).await.unwrap();
        assert_eq!(next.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["01-a"], "tie broken by id");
    }

    /// The address column is text; a value that is not an address is a
    /// damaged row, reported as one rather than shown as no address.
    #[test]
    fn a_stored_address_that_does_not_parse_is_reported_as_corrupt() {
        let r = row("01-z", Utc::now());
        let mut damaged = audit_event::Model {
            id: r.id.clone(),
            timestamp: r.timestamp,
            kind: "VERIFY".into(),
            merchant_id: None,
            api_key_id: None,
            api_key_name: None,
            key_prefix: None,
            endpoint: None,
            method: None,
            ip: Some("192.0.2.9".into()),
            status: None,
            decision: None,
            deny_reason: None,
            actor: None,
            trace_id: None,
            detail: None,
            count: None,
        };
        assert_eq!(AuditRecord::from_model(damaged.clone()).unwrap().ip, r.ip);
        damaged.ip = Some("192.0.2.999".into());
        let err = AuditRecord::from_model(damaged).unwrap_err();
        assert!(err.to_string().contains("ip address"), "{err}");
    }
}
