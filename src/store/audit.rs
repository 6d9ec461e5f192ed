//! Queries on `audit_events`: batched inserts from the audit writer, outcome
//! updates, newest-first listing, and retention.

use chrono::{DateTime, Utc};
use sea_orm::{
    ActiveValue::Set,
    ColumnTrait, ConnectionTrait, DbBackend, EntityTrait, ExprTrait, QueryFilter, QueryOrder, QuerySelect,
    QueryTrait, Statement, TransactionTrait, Value,
    sea_query::{Expr, Order, Query},
};

use sea_orm::sqlx::{
    query::Query as SqlxQuery,
    sqlite::{Sqlite, SqliteArguments},
};

use super::{
    Store, StoreError,
    entity::{audit_event, audit_outcome},
    pg_copy::{CopyWriter, EncodeError},
};
use crate::{
    audit::{AuditKind, AuditRecord},
    keys::{Decision, DenyReason},
};

/// Column order of [`InsertRow`], shared by both backends' statements.
const AUDIT_COLUMNS: &str = "id, \"timestamp\", kind, merchant_id, api_key_id, api_key_name, key_prefix, \
    endpoint, method, ip, status, decision, deny_reason, actor, trace_id, detail";
/// Columns in [`AUDIT_COLUMNS`].
const AUDIT_COLUMN_COUNT: usize = 16;

/// Makes inserting a batch again harmless. A batch whose commit was not
/// acknowledged (the connection dropped at the wrong moment) is retried, and
/// its rows may already be there: each id is unique, so a conflict is the
/// same row, and only a status reported since can differ. (SQLite needs the
/// `WHERE true` before it to parse `INSERT … SELECT … ON CONFLICT`.)
const AUDIT_RETRY: &str =
    "ON CONFLICT (id) DO UPDATE SET status = COALESCE(excluded.status, audit_events.status)";

/// Rows per INSERT of SQLite's audit batches: 512 rows × 16 columns = 8192
/// parameters, well under SQLite's 32766. Full chunks reuse one prepared
/// statement; a batch's last, shorter chunk is prepared for that batch only.
const SQLITE_CHUNK: usize = 512;

/// The INSERT of `rows.len()` rows with `rows` bound. On SQLite this runs
/// on the service's cores for every audit row, so it avoids two costs of
/// binding with `.bind(&str)`: each text value goes in as one `Arc<str>`
/// (sqlx copies a `&str` into a `String` and wraps that in an `Arc`: two
/// allocations), and the argument list is sized once instead of doubling
/// its way to 8192 values.
fn sqlite_insert(
    rows: &[&AuditRecord],
) -> Result<SqlxQuery<'static, Sqlite, SqliteArguments>, sea_orm::sqlx::Error> {
    use sea_orm::sqlx;
    static FULL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| sqlite_insert_sql(SQLITE_CHUNK));
    let args = sqlite_arguments(rows).map_err(sqlx::Error::Encode)?;
    Ok(if rows.len() == SQLITE_CHUNK {
        sqlx::query_with(FULL.as_str(), args)
    } else {
        sqlx::query_with(sqlx::AssertSqlSafe(sqlite_insert_sql(rows.len())), args).persistent(false)
    })
}

fn sqlite_arguments(rows: &[&AuditRecord]) -> Result<SqliteArguments, sea_orm::sqlx::error::BoxDynError> {
    use std::sync::Arc;

    use sea_orm::sqlx::Arguments;
    fn text(s: Option<&str>) -> Option<Arc<str>> {
        s.map(Arc::from)
    }
    let mut args = SqliteArguments::default();
    args.reserve(rows.len() * AUDIT_COLUMN_COUNT, 0);
    for r in rows {
        args.add(Arc::<str>::from(r.id.as_str()))?;
        args.add(rfc3339_auto_si(r.timestamp))?;
        args.add(Arc::<str>::from(r.kind.as_str()))?;
        args.add(text(r.merchant_id.as_deref()))?;
        args.add(text(r.api_key_id.as_deref()))?;
        args.add(text(r.api_key_name.as_deref()))?;
        args.add(text(r.key_prefix.as_deref()))?;
        args.add(text(r.endpoint.as_deref()))?;
        args.add(text(r.method.as_deref()))?;
        args.add(text(r.ip.as_deref()))?;
        args.add(r.status.map(i32::from))?;
        args.add(text(r.decision.map(Decision::as_str)))?;
        args.add(text(r.deny_reason.map(DenyReason::as_str)))?;
        args.add(text(r.actor.as_deref()))?;
        args.add(text(r.trace_id.as_deref()))?;
        args.add(text(r.detail.as_deref()))?;
    }
    Ok(args)
}

/// `t.to_rfc3339_opts(SecondsFormat::AutoSi, false)`: the text sqlx binds
/// for a timestamp on SQLite, which compares timestamps as text, so the
/// form must be exactly the same (see the test
/// `batched_rows_match_bound_timestamps_exactly_on_sqlite`). Written out
/// digit by digit because chrono's general formatter costs about as much
/// as the rest of binding a row; instants it would print differently
/// (leap seconds, years outside 0–9999) go to chrono.
fn rfc3339_auto_si(t: DateTime<Utc>) -> String {
    use chrono::{Datelike, Timelike};
    let nanos = t.nanosecond();
    if !(0..=9999).contains(&t.year()) || nanos >= 1_000_000_000 {
        return t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, false);
    }
    fn push(s: &mut String, n: u32, width: u32) {
        for place in (0..width).rev() {
            s.push(char::from(b'0' + (n / 10u32.pow(place) % 10) as u8));
        }
    }
    let mut s = String::with_capacity(35);
    push(&mut s, t.year().unsigned_abs(), 4);
    s.push('-');
    push(&mut s, t.month(), 2);
    s.push('-');
    push(&mut s, t.day(), 2);
    s.push('T');
    push(&mut s, t.hour(), 2);
    s.push(':');
    push(&mut s, t.minute(), 2);
    s.push(':');
    push(&mut s, t.second(), 2);
    let (fraction, digits) = match nanos {
        0 => (0, 0),
        n if n % 1_000_000 == 0 => (n / 1_000_000, 3),
        n if n % 1_000 == 0 => (n / 1_000, 6),
        n => (n, 9),
    };
    if digits > 0 {
        s.push('.');
        push(&mut s, fraction, digits);
    }
    s.push_str("+00:00");
    s
}

fn sqlite_insert_sql(rows: usize) -> String {
    let row = format!("({})", ["?"; AUDIT_COLUMN_COUNT].join(", "));
    let values = vec![row.as_str(); rows].join(", ");
    format!("INSERT INTO audit_events ({AUDIT_COLUMNS}) VALUES {values} {AUDIT_RETRY}")
}

/// One audit row as a JSON array, in [`AUDIT_COLUMNS`] order.
///
/// Rows travel as one JSON parameter so that every batch, whatever its size,
/// is the same statement text: prepared once per connection and reused,
/// instead of a fresh 16-parameters-per-row VALUES list that the database
/// must parse and plan on every batch. Used for admin rows (inside their
/// transactions) on both backends; the audit writer's batches are bound
/// directly instead ([`Store::insert_audit_values`] on SQLite,
/// [`Store::copy_audit_rows`] on PostgreSQL).
#[derive(serde::Serialize)]
struct InsertRow<'a>(
    &'a str,
    /// The text sqlx writes for a `DateTime<Utc>` (RFC 3339, shortest exact
    /// fraction): on SQLite, timestamps are compared as text, so rows from
    /// this path must match values bound elsewhere character for character.
    String,
    &'static str,
    Option<&'a str>,
    Option<&'a str>,
    Option<&'a str>,
    Option<&'a str>,
    Option<&'a str>,
    Option<&'a str>,
    Option<&'a str>,
    Option<u16>,
    Option<&'static str>,
    Option<&'static str>,
    Option<&'a str>,
    Option<&'a str>,
    Option<&'a str>,
);

impl<'a> From<&'a AuditRecord> for InsertRow<'a> {
    fn from(r: &'a AuditRecord) -> Self {
        Self(
            &r.id,
            rfc3339_auto_si(r.timestamp),
            r.kind.as_str(),
            r.merchant_id.as_deref(),
            r.api_key_id.as_deref(),
            r.api_key_name.as_deref(),
            r.key_prefix.as_deref(),
            r.endpoint.as_deref(),
            r.method.as_deref(),
            r.ip.as_deref(),
            r.status,
            r.decision.map(Decision::as_str),
            r.deny_reason.map(DenyReason::as_str),
            r.actor.as_deref(),
            r.trace_id.as_deref(),
            r.detail.as_deref(),
        )
    }
}

/// Inserts `rows` with one statement on `db` (a connection or a transaction).
pub(super) async fn insert_audit_rows<C: ConnectionTrait>(
    db: &C,
    rows: &[AuditRecord],
) -> Result<(), StoreError> {
    let backend = db.get_database_backend();
    if rows.is_empty() {
        return Ok(());
    }
    let json = serde_json::to_string(&rows.iter().map(InsertRow::from).collect::<Vec<_>>())
        .map_err(|e| StoreError::Db(sea_orm::DbErr::Custom(format!("encoding audit rows: {e}"))))?;
    let sql = match backend {
        DbBackend::Postgres => format!(
            "INSERT INTO audit_events ({AUDIT_COLUMNS}) \
             SELECT r->>0, (r->>1)::timestamptz, r->>2, r->>3, r->>4, r->>5, r->>6, r->>7, r->>8, r->>9, \
                    (r->>10)::integer, r->>11, r->>12, r->>13, r->>14, r->>15 \
             FROM jsonb_array_elements($1::jsonb) AS r {AUDIT_RETRY}"
        ),
        _ => format!(
            "INSERT INTO audit_events ({AUDIT_COLUMNS}) \
             SELECT value->>0, value->>1, value->>2, value->>3, value->>4, value->>5, value->>6, value->>7, \
                    value->>8, value->>9, value->>10, value->>11, value->>12, value->>13, value->>14, value->>15 \
             FROM json_each(?) WHERE true {AUDIT_RETRY}"
        ),
    };
    db.execute_raw(Statement::from_sql_and_values(backend, sql, [Value::from(json)])).await?;
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
        })
    }
}

/// Position in a newest-first listing of audit events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditCursor {
    pub timestamp: DateTime<Utc>,
    pub id: String,
}

/// Filters of ListAuditEvents; the merchant is mandatory.
#[derive(Debug, Clone)]
pub struct AuditQuery<'a> {
    pub merchant_id: &'a str,
    pub api_key_id: Option<&'a str>,
    /// Inclusive.
    pub start: Option<DateTime<Utc>>,
    /// Exclusive.
    pub end: Option<DateTime<Utc>>,
}

/// SQLite's batch in the order of the per-merchant and per-key indexes
/// (merchant, key, time, id), so that a key's rows go into its part of
/// those indexes one after another. Rows of many keys interleave in
/// arrival order, and each one moves the insert to another leaf page of
/// the per-key index; sorted, the insert walks each index once. Into a
/// table of 2M rows over 1000 keys this took SQLite's CPU per row from
/// 21 to 17.5 µs at 4000 rows per batch and from 16.7 to 11.8 µs at
/// 16000 (`benches/audit_batches.rs --prefill 2000000`). PostgreSQL's
/// backend measured no better sorted (likely because its WAL mostly logs
/// tuples, not pages), so its COPY keeps arrival order. Nothing reads the order in which a
/// batch's rows were written: listings order by (timestamp, id).
fn in_index_order(rows: &[AuditRecord]) -> Vec<&AuditRecord> {
    let mut sorted: Vec<&AuditRecord> = rows.iter().collect();
    sorted.sort_unstable_by_key(|&r| {
        (r.merchant_id.as_deref(), r.api_key_id.as_deref(), r.timestamp, r.id.as_str())
    });
    sorted
}

/// The batch in PostgreSQL's binary COPY format, columns in
/// [`AUDIT_COLUMNS`] order.
fn encode_audit_copy(rows: &[AuditRecord]) -> Result<Vec<u8>, EncodeError> {
    // Typical verification rows take ~250–350 bytes.
    let mut w = CopyWriter::with_capacity(rows.len() * 320);
    for r in rows {
        w.row(AUDIT_COLUMN_COUNT as i16)
            .text(Some(&r.id))?
            .timestamptz(r.timestamp)?
            .text(Some(r.kind.as_str()))?
            .text(r.merchant_id.as_deref())?
            .text(r.api_key_id.as_deref())?
            .text(r.api_key_name.as_deref())?
            .text(r.key_prefix.as_deref())?
            .text(r.endpoint.as_deref())?
            .text(r.method.as_deref())?
            .text(r.ip.as_deref())?
            .int4(r.status.map(i32::from))
            .text(r.decision.map(Decision::as_str))?
            .text(r.deny_reason.map(DenyReason::as_str))?
            .text(r.actor.as_deref())?
            .text(r.trace_id.as_deref())?
            .text(r.detail.as_deref())?;
    }
    Ok(w.finish())
}

fn is_unique_violation(e: &sea_orm::sqlx::Error) -> bool {
    e.as_database_error().is_some_and(|d| d.is_unique_violation())
}

fn sqlx_error(e: sea_orm::sqlx::Error) -> StoreError {
    StoreError::from(sea_orm::DbErr::Exec(sea_orm::RuntimeErr::SqlxError(std::sync::Arc::new(e))))
}

impl Store {
    /// Writes a batch of rows atomically: one COPY on PostgreSQL (an upsert
    /// instead when the batch turns out to be partly stored already), which
    /// also applies outcomes other replicas held for these rows (one more
    /// statement); a transaction of a few INSERTs on SQLite.
    pub async fn insert_audit_batch(&self, rows: &[AuditRecord]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        match self.backend() {
            super::Backend::Sqlite => self.insert_audit_values(&in_index_order(rows)).await,
            super::Backend::Postgres => {
                self.count(1);
                match self.copy_audit_rows(rows).await {
                    // Some rows are there already: this is the retry of a
                    // batch whose commit was not acknowledged. COPY cannot
                    // skip rows, so the batch goes again as an upsert.
                    Err(e) if is_unique_violation(&e) => {
                        self.count(1);
                        self.insert_audit_arrays(rows).await?;
                    }
                    other => other.map_err(sqlx_error)?,
                }
                let allowed: Vec<&str> = rows
                    .iter()
                    .filter(|r| r.decision == Some(Decision::Allow))
                    .map(|r| r.id.as_str())
                    .collect();
                self.apply_held_outcomes(&allowed).await.map(drop)
            }
        }
    }

    /// SQLite: the batch bound value by value into multi-row VALUES
    /// inserts of [`SQLITE_CHUNK`] rows, in one transaction when it takes
    /// more than one. Binding directly spares SQLite parsing each row back
    /// out of JSON (measured: ~1.1 × the rows per second through this
    /// store, ~1.4 × in `benches/sqlite_audit_insert.py`). On the embedded
    /// backend this writer shares the service's cores, so its cost is
    /// Verify's.
    async fn insert_audit_values(&self, rows: &[&AuditRecord]) -> Result<(), StoreError> {
        let pool = self.db().get_sqlite_connection_pool();
        self.count(1);
        if rows.len() <= SQLITE_CHUNK {
            return sqlite_insert(rows)
                .map_err(sqlx_error)?
                .execute(pool)
                .await
                .map(drop)
                .map_err(sqlx_error);
        }
        let mut tx = pool.begin().await.map_err(sqlx_error)?;
        for chunk in rows.chunks(SQLITE_CHUNK) {
            self.count(1);
            sqlite_insert(chunk).map_err(sqlx_error)?.execute(&mut *tx).await.map_err(sqlx_error)?;
        }
        self.count(1);
        tx.commit().await.map_err(sqlx_error)
    }

    /// PostgreSQL: the batch streamed in by binary `COPY`, PostgreSQL's
    /// cheapest way in (~0.6 × the server CPU per row of the array upsert
    /// below; see [`super::pg_copy`]). On one box the audit writer is what
    /// a saturated Verify waits for, and on a fleet PostgreSQL's row rate is
    /// the ceiling every replica's audit trail shares.
    async fn copy_audit_rows(&self, rows: &[AuditRecord]) -> Result<(), sea_orm::sqlx::Error> {
        use sea_orm::sqlx::{self, postgres::PgPoolCopyExt};
        let data = encode_audit_copy(rows).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
        let mut copy = self
            .db()
            .get_postgres_connection_pool()
            .copy_in_raw(&format!("COPY audit_events ({AUDIT_COLUMNS}) FROM STDIN (FORMAT binary)"))
            .await?;
        copy.send(data).await?;
        copy.finish().await.map(drop)
    }

    /// PostgreSQL: the batch as one array per column, bound in binary and
    /// unnested by the server, as an upsert on the event id: the retry path
    /// for a batch some of whose rows may already be stored.
    async fn insert_audit_arrays(&self, rows: &[AuditRecord]) -> Result<(), StoreError> {
        use sea_orm::sqlx;
        fn column<'a, T>(rows: &'a [AuditRecord], f: impl Fn(&'a AuditRecord) -> T) -> Vec<T> {
            rows.iter().map(f).collect()
        }
        let sql = format!(
            "INSERT INTO audit_events ({AUDIT_COLUMNS}) SELECT * FROM unnest(\
             $1::text[], $2::timestamptz[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], \
             $8::text[], $9::text[], $10::text[], $11::int4[], $12::text[], $13::text[], $14::text[], \
             $15::text[], $16::text[]) {AUDIT_RETRY}"
        );
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(column(rows, |r| r.id.as_str()))
            .bind(column(rows, |r| r.timestamp))
            .bind(column(rows, |r| r.kind.as_str()))
            .bind(column(rows, |r| r.merchant_id.as_deref()))
            .bind(column(rows, |r| r.api_key_id.as_deref()))
            .bind(column(rows, |r| r.api_key_name.as_deref()))
            .bind(column(rows, |r| r.key_prefix.as_deref()))
            .bind(column(rows, |r| r.endpoint.as_deref()))
            .bind(column(rows, |r| r.method.as_deref()))
            .bind(column(rows, |r| r.ip.as_deref()))
            .bind(column(rows, |r| r.status.map(i32::from)))
            .bind(column(rows, |r| r.decision.map(Decision::as_str)))
            .bind(column(rows, |r| r.deny_reason.map(DenyReason::as_str)))
            .bind(column(rows, |r| r.actor.as_deref()))
            .bind(column(rows, |r| r.trace_id.as_deref()))
            .bind(column(rows, |r| r.detail.as_deref()))
            .execute(self.db().get_postgres_connection_pool())
            .await
            .map(drop)
            .map_err(sqlx_error)
    }

    /// PostgreSQL: moves held outcomes onto their rows, for the rows that
    /// exist now (a held outcome whose row turns out not to be an allowed
    /// verification is discarded, as RecordOutcomes would have done). Runs
    /// after every audit insert and after every hold, so whichever of the two
    /// commits last applies the outcome.
    async fn apply_held_outcomes(&self, ids: &[&str]) -> Result<u64, StoreError> {
        if ids.is_empty() {
            return Ok(0);
        }
        self.count(1);
        let ids = serde_json::to_string(ids)
            .map_err(|e| StoreError::Db(sea_orm::DbErr::Custom(format!("encoding event ids: {e}"))))?;
        let sql = format!(
            "WITH moved AS (DELETE FROM audit_outcomes o \
               WHERE o.event_id IN (SELECT jsonb_array_elements_text($1::jsonb)) \
               AND EXISTS (SELECT 1 FROM audit_events e WHERE e.id = o.event_id) \
             RETURNING o.event_id, o.status) \
             UPDATE audit_events SET status = moved.status FROM moved \
             WHERE audit_events.id = moved.event_id AND audit_events.kind = '{}' AND audit_events.decision = '{}'",
            AuditKind::Verify.as_str(),
            Decision::Allow.as_str(),
        );
        Ok(self
            .db()
            .execute_raw(Statement::from_sql_and_values(self.db_backend(), sql, [Value::from(ids)]))
            .await?
            .rows_affected())
    }

    /// PostgreSQL: holds outcomes for rows that may still be queued on
    /// another replica, then applies any whose row has landed meanwhile.
    pub async fn hold_outcomes(
        &self,
        outcomes: &[(String, u16)],
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        use sea_orm::sea_query::OnConflict;
        if outcomes.is_empty() || self.backend() != super::Backend::Postgres {
            return Ok(());
        }
        self.count(1);
        let rows = outcomes.iter().map(|(id, status)| audit_outcome::ActiveModel {
            event_id: Set(id.clone()),
            status: Set(i32::from(*status)),
            received_at: Set(now),
        });
        audit_outcome::Entity::insert_many(rows)
            .on_conflict(
                OnConflict::column(audit_outcome::Column::EventId)
                    .update_column(audit_outcome::Column::Status)
                    .to_owned(),
            )
            .exec_without_returning(self.db())
            .await?;
        let ids: Vec<&str> = outcomes.iter().map(|(id, _)| id.as_str()).collect();
        self.apply_held_outcomes(&ids).await?;
        Ok(())
    }

    /// Drops held outcomes whose row never appeared (unknown ids).
    pub async fn expire_held_outcomes(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        if self.backend() != super::Backend::Postgres {
            return Ok(0);
        }
        self.count(1);
        Ok(audit_outcome::Entity::delete_many()
            .filter(audit_outcome::Column::ReceivedAt.lt(before))
            .exec(self.db())
            .await?
            .rows_affected)
    }

    /// Sets the reported HTTP status on allowed verification rows; returns
    /// how many rows matched. Later reports overwrite earlier ones.
    /// Returns, per outcome, whether it matched a row.
    pub async fn set_outcomes(&self, outcomes: &[(String, u16)]) -> Result<Vec<bool>, StoreError> {
        use audit_event::Column as C;
        if outcomes.is_empty() {
            return Ok(Vec::new());
        }
        let txn = self.db().begin().await?;
        self.count(2 + outcomes.len() as u64);
        let mut matched = Vec::with_capacity(outcomes.len());
        for (id, status) in outcomes {
            let rows = audit_event::Entity::update_many()
                .col_expr(C::Status, Expr::value(Some(i32::from(*status))))
                .filter(C::Id.eq(id.as_str()))
                .filter(C::Kind.eq(AuditKind::Verify.as_str()))
                .filter(C::Decision.eq(Decision::Allow.as_str()))
                .exec(&txn)
                .await?
                .rows_affected;
            matched.push(rows > 0);
        }
        txn.commit().await?;
        Ok(matched)
    }

    /// Newest first, `limit` rows after `after`.
    pub async fn list_audit(
        &self,
        query: &AuditQuery<'_>,
        after: Option<&AuditCursor>,
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
            super::Backend::Postgres => format!("EXPLAIN {}", statement.sql),
            super::Backend::Sqlite => format!("EXPLAIN QUERY PLAN {}", statement.sql),
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
        if self.backend() == super::Backend::Postgres {
            self.count(1);
            let locked = txn
                .query_one_raw(Statement::from_sql_and_values(
                    self.db_backend(),
                    "SELECT pg_try_advisory_xact_lock($1)",
                    [Value::from(RETENTION_LOCK)],
                ))
                .await?
                .and_then(|row| row.try_get_by_index::<bool>(0).ok())
                .unwrap_or(false);
            if !locked {
                txn.rollback().await?;
                return Ok(None);
            }
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
    after: Option<&AuditCursor>,
    limit: u64,
) -> sea_orm::Select<audit_event::Entity> {
    use audit_event::Column as C;
    {
        let mut select = audit_event::Entity::find().filter(C::MerchantId.eq(query.merchant_id));
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
            select = select.filter(
                C::Timestamp
                    .lt(cursor.timestamp)
                    .or(C::Timestamp.eq(cursor.timestamp).and(C::Id.lt(cursor.id.as_str()))),
            );
        }
        select.order_by_desc(C::Timestamp).order_by_desc(C::Id).limit(limit)
    }
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Timelike};

    use super::*;

    fn row(id: &str, at: DateTime<Utc>) -> AuditRecord {
        AuditRecord {
            id: id.into(),
            merchant_id: Some("m".into()),
            decision: Some(Decision::Allow),
            ..AuditRecord::new(AuditKind::Verify, at)
        }
    }

    #[test]
    fn the_column_count_matches_the_column_list() {
        assert_eq!(AUDIT_COLUMNS.split(',').count(), AUDIT_COLUMN_COUNT);
    }

    fn key_row(id: &str, merchant: Option<&str>, key: Option<&str>, at: DateTime<Utc>) -> AuditRecord {
        AuditRecord { merchant_id: merchant.map(Into::into), api_key_id: key.map(Into::into), ..row(id, at) }
    }

    #[test]
    fn a_batch_is_written_grouped_by_merchant_and_key_in_time_order() {
        let t = |s| Utc.with_ymd_and_hms(2026, 11, 28, 12, 0, s).unwrap();
        let rows = [
            key_row("6", Some("m2"), Some("k1"), t(1)),
            key_row("1", Some("m1"), Some("k2"), t(2)),
            key_row("4", Some("m1"), Some("k9"), t(0)),
            key_row("2", Some("m1"), Some("k2"), t(3)),
            key_row("0", None, None, t(5)),
            key_row("5", Some("m1"), Some("k9"), t(4)),
            key_row("3", Some("m1"), Some("k2"), t(3)),
        ];
        let order: Vec<&str> = in_index_order(&rows).iter().map(|r| r.id.as_str()).collect();
        assert_eq!(order, ["0", "1", "2", "3", "4", "5", "6"]);
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

        let all = AuditQuery { merchant_id: "m", api_key_id: None, start: None, end: None };
        let listed = store.list_audit(&all, None, 100).await.unwrap();
        let newest_first: Vec<&AuditRecord> = rows.iter().rev().collect();
        assert_eq!(listed.iter().collect::<Vec<_>>(), newest_first);
        let ka = AuditQuery { api_key_id: Some("ka"), ..all };
        let listed = store.list_audit(&ka, None, 100).await.unwrap();
        let expected: Vec<&AuditRecord> =
            rows.iter().rev().filter(|r| r.api_key_id.as_deref() == Some("ka")).collect();
        assert_eq!(listed.iter().collect::<Vec<_>>(), expected);
    }

    proptest::proptest! {
        /// Every instant, and especially the whole seconds, milliseconds and
        /// microseconds where AutoSi shortens the fraction.
        #[test]
        fn timestamps_are_written_exactly_as_chrono_writes_them(
            secs in -62_167_219_200_i64..253_402_300_800,
            nanos in 0u32..1_000_000_000,
            shorten in 0u32..4,
        ) {
            let nanos = match shorten {
                0 => 0,
                1 => nanos / 1_000_000 * 1_000_000,
                2 => nanos / 1_000 * 1_000,
                _ => nanos,
            };
            let t = DateTime::from_timestamp(secs, nanos).unwrap();
            proptest::prop_assert_eq!(
                rfc3339_auto_si(t),
                t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, false)
            );
        }
    }

    #[test]
    fn timestamps_chrono_writes_its_own_way_are_left_to_chrono() {
        for t in [DateTime::<Utc>::MIN_UTC, DateTime::<Utc>::MAX_UTC] {
            assert_eq!(rfc3339_auto_si(t), t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, false));
        }
        let leap = Utc.with_ymd_and_hms(2016, 12, 31, 23, 59, 59).unwrap()
            + chrono::Duration::nanoseconds(999_999_999);
        let leap = leap.with_nanosecond(1_500_000_000).unwrap();
        assert_eq!(rfc3339_auto_si(leap), leap.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, false));
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
            merchant_id: "m",
            api_key_id: None,
            start: Some(start),
            end: Some(end),
        };
        let found = store
            .list_audit(&at(whole_ms, whole_ms + chrono::Duration::microseconds(1)), None, 10)
            .await
            .unwrap();
        assert_eq!(found.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["01-b", "01-a"]);
        let cursor = AuditCursor { timestamp: whole_ms, id: "01-b".into() };
        let next = store.list_audit(&at(whole_ms, with_us), Some(&cursor), 10).await.unwrap();
        assert_eq!(next.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["01-a"], "tie broken by id");
    }
}
