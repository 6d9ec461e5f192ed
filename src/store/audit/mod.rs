//! `audit_events`: the row type ([`AuditRecord`]), its one column mapping
//! (`AuditRecord::cells`, in the entity's column order), and the queries
//! on it: batched inserts, outcome updates, newest-first listing, retention.
//!
//! Each backend has one bulk path for the audit writer's batches
//! (`sqlite`, `postgres`); the few rows written inside an admin
//! transaction go through one portable multi-row INSERT built from the same
//! cells. docs/decisions.md says why each bulk path looks the way it does.

mod outcomes;
mod pg_copy;
mod postgres;
mod sqlite;

use chrono::{DateTime, Utc};
use sea_orm::{
    ColumnTrait, ConnectionTrait, EntityTrait, ExprTrait, Iterable, QueryFilter, QueryOrder, QuerySelect,
    QueryTrait, Statement, TransactionTrait, Value,
    sea_query::{Expr, OnConflict, Order, Query},
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{Backend, Store, StoreError, entity::audit_event};
use crate::keys::{Decision, DenyReason};

pub use outcomes::OutcomeWrite;

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
}

impl AuditKind {
    const ALL: [Self; 10] = [
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
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Verify => "VERIFY",
            Self::KeyCreated => "KEY_CREATED",
            Self::KeyUpdated => "KEY_UPDATED",
            Self::KeyRevoked => "KEY_REVOKED",
            Self::KeyRegenerated => "KEY_REGENERATED",
            Self::AccessDenied => "ACCESS_DENIED",
            Self::AuthenticationFailed => "AUTHENTICATION_FAILED",
            Self::OperatorTokenCreated => "OPERATOR_TOKEN_CREATED",
            Self::OperatorTokenRevoked => "OPERATOR_TOKEN_REVOKED",
            Self::VerifyRollup => "VERIFY_ROLLUP",
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
    pub ip: Option<String>,
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

/// The columns of `audit_events`, in the entity's order.
type Column = audit_event::Column;

/// Columns of `audit_events`.
const COLUMN_COUNT: usize = 17;

/// One value of an audit row, as each writer binds it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Cell<'a> {
    Text(Option<&'a str>),
    Time(DateTime<Utc>),
    Int(Option<i32>),
}

impl AuditRecord {
    /// The row's values, one per column of the entity, in its order: the
    /// single mapping from record to row that every writer uses (a unit test
    /// holds it to the entity).
    pub(super) fn cells(&self) -> [(Column, Cell<'_>); COLUMN_COUNT] {
        use Cell::{Int, Text, Time};
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
            (Column::Ip, Text(self.ip.as_deref())),
            (Column::Status, Int(self.status.map(i32::from))),
            (Column::Decision, Text(self.decision.map(Decision::as_str))),
            (Column::DenyReason, Text(self.deny_reason.map(DenyReason::as_str))),
            (Column::Actor, Text(self.actor.as_deref())),
            (Column::TraceId, Text(self.trace_id.as_deref())),
            (Column::Detail, Text(self.detail.as_deref())),
            (Column::Count, Int(self.count.map(|c| i32::try_from(c).unwrap_or(i32::MAX)))),
        ]
    }
}

/// `(id, "timestamp", …)`: the column list of every bulk statement.
fn column_list() -> String {
    use sea_orm::IdenStatic;
    let names: Vec<String> = Column::iter().map(|c| format!("\"{}\"", c.as_str())).collect();
    format!("({})", names.join(", "))
}

/// Makes inserting a batch again harmless. A batch whose commit was not
/// acknowledged (the connection dropped at the wrong moment) is retried, and
/// its rows may already be there: each id is unique, so a conflict is the
/// same row, and only a status reported since can differ.
fn on_conflict() -> OnConflict {
    OnConflict::column(Column::Id)
        .value(Column::Status, Expr::cust("COALESCE(excluded.status, audit_events.status)"))
        // A rollup row is written again with its count so far.
        .value(Column::Count, Expr::cust("COALESCE(excluded.count, audit_events.count)"))
        .to_owned()
}

/// Rows per portable INSERT: 17 parameters each, under PostgreSQL's 65535
/// and SQLite's 32766 bound parameters.
const PORTABLE_CHUNK: usize = 1500;

/// Inserts `rows` on `db` (a connection or a transaction) as multi-row
/// upserts on the event id: the admin rows of a key change, in its
/// transaction, and the retry of a bulk batch that may be partly stored.
pub(super) async fn insert_audit_rows<C: ConnectionTrait>(
    db: &C,
    rows: &[AuditRecord],
) -> Result<(), StoreError> {
    for chunk in rows.chunks(PORTABLE_CHUNK) {
        let mut insert = Query::insert();
        insert.into_table(audit_event::Entity).columns(Column::iter()).on_conflict(on_conflict());
        for row in chunk {
            let values = row.cells().map(|(_, cell)| match cell {
                Cell::Text(v) => Expr::val(Value::String(v.map(str::to_owned))),
                Cell::Time(t) => Expr::val(Value::ChronoDateTimeUtc(Some(t))),
                Cell::Int(v) => Expr::val(Value::Int(v)),
            });
            insert.values(values).map_err(|e| StoreError::Db(sea_orm::DbErr::Custom(e.to_string())))?;
        }
        db.execute(&insert).await?;
    }
    Ok(())
}

impl TryFrom<audit_event::Model> for AuditRecord {
    type Error = StoreError;

    fn try_from(m: audit_event::Model) -> Result<Self, StoreError> {
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
        Ok(Self {
            kind,
            decision,
            deny_reason,
            status: m.status.and_then(|s| u16::try_from(s).ok()),
            id: m.id,
            timestamp: m.timestamp,
            merchant_id: m.merchant_id,
            api_key_id: m.api_key_id,
            api_key_name: m.api_key_name,
            key_prefix: m.key_prefix,
            endpoint: m.endpoint,
            method: m.method,
            ip: m.ip,
            actor: m.actor,
            trace_id: m.trace_id,
            detail: m.detail,
            count: m.count.and_then(|c| u32::try_from(c).ok()),
        })
    }
}

/// Filters of ListAuditEvents.
#[derive(Debug, Clone)]
pub struct AuditQuery<'a> {
    /// `None`: the rows that belong to no merchant (rollups, failed
    /// authentications, operator tokens).
    pub merchant_id: Option<&'a str>,
    pub api_key_id: Option<&'a str>,
    /// Inclusive.
    pub start: Option<DateTime<Utc>>,
    /// Exclusive.
    pub end: Option<DateTime<Utc>>,
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
    ip: Option<String>,
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
            ip: r.ip.clone(),
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

/// Most characters of a database error kept as a dead letter's reason.
const MAX_DEAD_LETTER_REASON: usize = 500;

impl Store {
    /// Keeps a row the database refused for what it holds, with why. A row
    /// dead-lettered twice (a retried batch) is kept once.
    pub async fn insert_dead_letter(
        &self,
        row: &AuditRecord,
        reason: &str,
        failed_at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let reason: String = reason.chars().filter(|c| *c != '\0').take(MAX_DEAD_LETTER_REASON).collect();
        let mut insert = Query::insert();
        insert
            .into_table(sea_orm::sea_query::Alias::new("audit_dead_letters"))
            .columns(["id", "failed_at", "reason", "row"].map(sea_orm::sea_query::Alias::new))
            .values_panic([
                Expr::val(row.id.clone()),
                Expr::val(crate::clock::stored(failed_at)),
                Expr::val(reason),
                Expr::val(row.to_json()),
            ])
            .on_conflict(OnConflict::column(sea_orm::sea_query::Alias::new("id")).do_nothing().to_owned());
        self.count(1);
        self.db().execute(&insert).await?;
        Ok(())
    }

    /// Writes a batch of rows atomically through the backend's bulk path.
    /// Writing a batch again (a retry whose first commit was not
    /// acknowledged) stores each row once.
    pub async fn insert_audit_batch(&self, rows: &[AuditRecord]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        match self.backend() {
            Backend::Sqlite => self.insert_audit_sqlite(rows).await,
            Backend::Postgres => self.insert_audit_postgres(rows).await,
        }
    }

    /// Writes rows again and again as they change (rollup rows, with their
    /// count so far): an upsert on the id, so a retried write is harmless.
    pub async fn upsert_audit_rows(&self, rows: &[AuditRecord]) -> Result<(), StoreError> {
        self.count(rows.len().div_ceil(PORTABLE_CHUNK) as u64);
        insert_audit_rows(self.db(), rows).await
    }

    /// Newest first, `limit` rows after `after`.
    pub async fn list_audit(
        &self,
        query: &AuditQuery<'_>,
        after: Option<super::Cursor>,
        limit: u64,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        self.count_read();
        list_select(query, after, limit)
            .all(self.db())
            .await?
            .into_iter()
            .map(AuditRecord::try_from)
            .collect()
    }

    /// The database's plan for the ListAuditEvents query, one line per row of
    /// EXPLAIN output: shows which index serves it.
    pub async fn explain_list_audit(
        &self,
        query: &AuditQuery<'_>,
        limit: u64,
    ) -> Result<Vec<String>, StoreError> {
        let statement = self.db_backend().build(&list_select(query, None, limit).into_query());
        let explain = match self.backend() {
            Backend::Postgres => format!("EXPLAIN {}", statement.sql),
            Backend::Sqlite => format!("EXPLAIN QUERY PLAN {}", statement.sql),
        };
        let rows = self
            .db()
            .query_all_raw(Statement::from_sql_and_values(
                self.db_backend(),
                explain,
                statement.values.map(|v| v.0).unwrap_or_default(),
            ))
            .await?;
        Ok(rows
            .iter()
            .map(|row| {
                (0..4)
                    .filter_map(|i| {
                        row.try_get_by_index::<String>(i)
                            .ok()
                            .or_else(|| row.try_get_by_index::<i64>(i).ok().map(|n| n.to_string()))
                    })
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect())
    }

    /// Deletes up to `limit` rows older than `cutoff`, oldest first. On
    /// PostgreSQL only one replica prunes at a time (a transaction-scoped
    /// advisory lock); the others get `None` and skip this round.
    pub async fn delete_audit_before(
        &self,
        cutoff: DateTime<Utc>,
        limit: u64,
    ) -> Result<Option<u64>, StoreError> {
        use audit_event::Column as C;
        let txn = self.db().begin().await?;
        self.count(3);
        if !self.try_transaction_lock(&txn, RETENTION_LOCK).await? {
            txn.rollback().await?;
            return Ok(None);
        }
        let oldest = Query::select()
            .column(C::Id)
            .from(audit_event::Entity)
            .and_where(Expr::col(C::Timestamp).lt(cutoff))
            .order_by(C::Timestamp, Order::Asc)
            .limit(limit)
            .to_owned();
        let deleted = audit_event::Entity::delete_many()
            .filter(C::Id.in_subquery(oldest))
            .exec(&txn)
            .await?
            .rows_affected;
        txn.commit().await?;
        Ok(Some(deleted))
    }
}

/// Arbitrary constant naming keywarden's retention lock.
const RETENTION_LOCK: i64 = 0x6b77_7265_7465_6e74;

impl Store {
    /// One audit row by id.
    pub async fn get_audit(&self, id: &str) -> Result<Option<AuditRecord>, StoreError> {
        self.count_read();
        audit_event::Entity::find_by_id(id.to_owned())
            .one(self.db())
            .await?
            .map(AuditRecord::try_from)
            .transpose()
    }
}

/// The one ListAuditEvents query: by merchant (and key), newest first.
fn list_select(
    query: &AuditQuery<'_>,
    after: Option<super::Cursor>,
    limit: u64,
) -> sea_orm::Select<audit_event::Entity> {
    use audit_event::Column as C;
    {
        let mut select = audit_event::Entity::find().filter(match query.merchant_id {
            Some(merchant) => C::MerchantId.eq(merchant),
            None => C::MerchantId.is_null(),
        });
        if let Some(key_id) = query.api_key_id {
            select = select.filter(C::ApiKeyId.eq(key_id));
        }
        if let Some(start) = query.start {
            select = select.filter(C::Timestamp.gte(start));
        }
        if let Some(end) = query.end {
            select = select.filter(C::Timestamp.lt(end));
        }
        if let Some(cursor) = after {
            select = select.filter(cursor.after(C::Timestamp, C::Id));
        }
        select.order_by_desc(C::Timestamp).order_by_desc(C::Id).limit(limit)
    }
}

#[cfg(test)]
mod tests {
    // Tests read the real clock to build their inputs.
    #![allow(clippy::disallowed_methods)]

    use chrono::TimeZone;

    use super::*;

    #[test]
    fn cells_are_the_entity_columns_in_the_entity_order() {
        let r = AuditRecord::new(AuditKind::Verify, Utc::now(), None);
        let columns: Vec<String> = r.cells().iter().map(|(c, _)| format!("{c:?}")).collect();
        let entity: Vec<String> = Column::iter().map(|c| format!("{c:?}")).collect();
        assert_eq!(columns, entity);
        assert_eq!(COLUMN_COUNT, entity.len());
        assert!(column_list().starts_with("(\"id\", \"timestamp\", \"kind\""), "{}", column_list());
    }

    fn row(id: &str, at: DateTime<Utc>) -> AuditRecord {
        AuditRecord {
            id: id.into(),
            merchant_id: Some("m".into()),
            decision: Some(Decision::Allow),
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
        let listed = store.list_audit(&all, None, 100).await.unwrap();
        let newest_first: Vec<&AuditRecord> = rows.iter().rev().collect();
        assert_eq!(listed.iter().collect::<Vec<_>>(), newest_first);
        let ka = AuditQuery { api_key_id: Some("ka"), ..all };
        let listed = store.list_audit(&ka, None, 100).await.unwrap();
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
            assert_eq!(store.get_audit(&r.id).await.unwrap().as_ref(), Some(r), "round trip");
        }
        let at = |start, end| AuditQuery {
            merchant_id: Some("m"),
            api_key_id: None,
            start: Some(start),
            end: Some(end),
        };
        let found = store
            .list_audit(&at(whole_ms, whole_ms + chrono::Duration::microseconds(1)), None, 10)
            .await
            .unwrap();
        assert_eq!(found.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["01-b", "01-a"]);
        let cursor = crate::store::Cursor { at: whole_ms, id: "01-b".into() };
        let next = store.list_audit(&at(whole_ms, with_us), Some(cursor), 10).await.unwrap();
        assert_eq!(next.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["01-a"], "tie broken by id");
    }
}
