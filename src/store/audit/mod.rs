//! `audit_events`: what the store needs of a row ([`AuditRow`]: its cells
//! in the entity's column order, and a way back from a stored row) and the
//! queries on it: batched inserts, outcome updates, newest-first listing,
//! retention. The row's domain type is `audit::AuditRecord`.
//!
//! Each backend has one bulk path for the audit writer's batches
//! (`sqlite`, `postgres`); the few rows written inside an admin
//! transaction go through one portable multi-row INSERT built from the same
//! cells. docs/decisions.md says why each bulk path looks the way it does.

mod outcomes;
mod pg_copy;
mod postgres;
mod sqlite;

use std::net::IpAddr;

use chrono::{DateTime, Utc};
use sea_orm::{
    ColumnTrait, ConnectionTrait, EntityTrait, ExprTrait, Iterable, QueryFilter, QueryOrder, QuerySelect,
    QueryTrait, Statement, TransactionTrait, Value,
    sea_query::{Expr, OnConflict, Order, Query},
};

use super::{Backend, Store, StoreError, entity::audit_event};
use crate::keys::Decision;

pub use outcomes::OutcomeWrite;

/// The stored name of a verification row's kind, which the outcome
/// queries select on (`audit::AuditKind::Verify` is written as this).
pub const VERIFY_KIND: &str = "VERIFY";

/// What the store needs of an audit row: its values column by column, a
/// way to name the key a change's row is about, and a way back from a
/// stored row. `audit::AuditRecord` is the implementation; the store only
/// maps cells to columns, so it knows no audit type.
pub trait AuditRow: Sized + Send + Sync {
    /// The row's values, one per column of the entity, in its order: the
    /// single mapping from record to row that every writer uses.
    fn cells(&self) -> Cells<'_>;

    /// Fills in the key's name as of the change, for a row written without one.
    fn name_key(&mut self, name: &str);

    /// The record a stored row holds; [`StoreError::Corrupt`] if it holds
    /// something no record can.
    fn from_model(m: audit_event::Model) -> Result<Self, StoreError>;
}

/// The columns of `audit_events`, in the entity's order.
pub type Column = audit_event::Column;

/// Columns of `audit_events`.
pub const COLUMN_COUNT: usize = 17;

/// A row's values, each with its column.
pub type Cells<'a> = [(Column, Cell<'a>); COLUMN_COUNT];

/// One value of an audit row, as each writer binds it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Cell<'a> {
    Text(Option<&'a str>),
    /// Stored as its text form.
    Ip(Option<IpAddr>),
    Time(DateTime<Utc>),
    Int(Option<i32>),
}

/// The values the store's own work reads from a row: its id, where it goes
/// in the per-merchant and per-key indexes, and whether it is an allowed
/// verification (whose outcome another replica may hold).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct RowKey<'a> {
    merchant: Option<&'a str>,
    key: Option<&'a str>,
    at: DateTime<Utc>,
    pub id: &'a str,
    pub allowed_verify: bool,
}

impl<'a> RowKey<'a> {
    pub(super) fn of(row: &'a impl AuditRow) -> Self {
        let (mut kind, mut decision) = (None, None);
        let mut key =
            Self { merchant: None, key: None, at: DateTime::UNIX_EPOCH, id: "", allowed_verify: false };
        for (column, cell) in row.cells() {
            match (column, cell) {
                (Column::Id, Cell::Text(v)) => key.id = v.unwrap_or_default(),
                (Column::Timestamp, Cell::Time(t)) => key.at = t,
                (Column::MerchantId, Cell::Text(v)) => key.merchant = v,
                (Column::ApiKeyId, Cell::Text(v)) => key.key = v,
                (Column::Kind, Cell::Text(v)) => kind = v,
                (Column::Decision, Cell::Text(v)) => decision = v,
                _ => {}
            }
        }
        key.allowed_verify = kind == Some(VERIFY_KIND) && decision == Some(Decision::Allow.as_str());
        key
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
    rows: &[impl AuditRow],
) -> Result<(), StoreError> {
    for chunk in rows.chunks(PORTABLE_CHUNK) {
        let mut insert = Query::insert();
        insert.into_table(audit_event::Entity).columns(Column::iter()).on_conflict(on_conflict());
        for row in chunk {
            let values = row.cells().map(|(_, cell)| match cell {
                Cell::Text(v) => Expr::val(Value::String(v.map(str::to_owned))),
                Cell::Ip(v) => Expr::val(Value::String(v.map(|ip| ip.to_string()))),
                Cell::Time(t) => Expr::val(Value::ChronoDateTimeUtc(Some(t))),
                Cell::Int(v) => Expr::val(Value::Int(v)),
            });
            insert.values(values).map_err(|e| StoreError::Db(sea_orm::DbErr::Custom(e.to_string())))?;
        }
        db.execute(&insert).await?;
    }
    Ok(())
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

/// Most characters of a database error kept as a dead letter's reason.
const MAX_DEAD_LETTER_REASON: usize = 500;

impl Store {
    /// Keeps a row the database refused for what it holds, with why. A row
    /// dead-lettered twice (a retried batch) is kept once.
    pub async fn insert_dead_letter(
        &self,
        id: &str,
        row_json: &str,
        reason: &str,
        failed_at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let reason: String = reason.chars().filter(|c| *c != '\0').take(MAX_DEAD_LETTER_REASON).collect();
        let mut insert = Query::insert();
        insert
            .into_table(sea_orm::sea_query::Alias::new("audit_dead_letters"))
            .columns(["id", "failed_at", "reason", "row"].map(sea_orm::sea_query::Alias::new))
            .values_panic([
                Expr::val(id.to_owned()),
                Expr::val(crate::clock::stored(failed_at)),
                Expr::val(reason),
                Expr::val(row_json.to_owned()),
            ])
            .on_conflict(OnConflict::column(sea_orm::sea_query::Alias::new("id")).do_nothing().to_owned());
        self.count(1);
        self.db().execute(&insert).await?;
        Ok(())
    }

    /// Writes a batch of rows atomically through the backend's bulk path.
    /// Writing a batch again (a retry whose first commit was not
    /// acknowledged) stores each row once.
    pub async fn insert_audit_batch(&self, rows: &[impl AuditRow]) -> Result<(), StoreError> {
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
    pub async fn upsert_audit_rows(&self, rows: &[impl AuditRow]) -> Result<(), StoreError> {
        self.count(rows.len().div_ceil(PORTABLE_CHUNK) as u64);
        insert_audit_rows(self.db(), rows).await
    }

    /// Newest first, `limit` rows after `after`.
    pub async fn list_audit<R: AuditRow>(
        &self,
        query: &AuditQuery<'_>,
        after: Option<super::Cursor>,
        limit: u64,
    ) -> Result<Vec<R>, StoreError> {
        self.count_read();
        list_select(query, after, limit).all(self.db()).await?.into_iter().map(R::from_model).collect()
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
    pub async fn get_audit<R: AuditRow>(&self, id: &str) -> Result<Option<R>, StoreError> {
        self.count_read();
        audit_event::Entity::find_by_id(id.to_owned()).one(self.db()).await?.map(R::from_model).transpose()
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
pub(crate) mod tests {
    use super::*;

    /// A row with only what the store's ordering reads.
    pub struct TestRow {
        pub id: String,
        pub merchant: Option<String>,
        pub key: Option<String>,
        pub at: DateTime<Utc>,
    }

    impl TestRow {
        /// A row of no merchant at `at`.
        pub fn at(id: &str, at: DateTime<Utc>) -> Self {
            Self { id: id.into(), merchant: None, key: None, at }
        }
    }

    impl AuditRow for TestRow {
        fn cells(&self) -> Cells<'_> {
            let mut cells = Column::iter().map(|c| (c, Cell::Text(None)));
            std::array::from_fn(|_| match cells.next() {
                Some((Column::Id, _)) => (Column::Id, Cell::Text(Some(&self.id))),
                Some((Column::Timestamp, _)) => (Column::Timestamp, Cell::Time(self.at)),
                Some((Column::Kind, _)) => (Column::Kind, Cell::Text(Some(VERIFY_KIND))),
                Some((Column::MerchantId, _)) => (Column::MerchantId, Cell::Text(self.merchant.as_deref())),
                Some((Column::ApiKeyId, _)) => (Column::ApiKeyId, Cell::Text(self.key.as_deref())),
                Some((c, Cell::Text(_))) if matches!(c, Column::Status | Column::Count) => {
                    (c, Cell::Int(None))
                }
                Some(cell) => cell,
                None => (Column::Id, Cell::Text(None)),
            })
        }

        fn name_key(&mut self, _: &str) {}

        fn from_model(m: audit_event::Model) -> Result<Self, StoreError> {
            Ok(Self { id: m.id, merchant: m.merchant_id, key: m.api_key_id, at: m.timestamp })
        }
    }

    /// Stored and read back through the same trait the audit record uses.
    #[tokio::test]
    async fn a_row_is_stored_and_read_back_through_its_cells() {
        let (store, _dir) = crate::store::temp_sqlite_store().await;
        let row = TestRow {
            merchant: Some("m".into()),
            key: Some("k".into()),
            ..TestRow::at("01-t", DateTime::UNIX_EPOCH)
        };
        store.insert_audit_batch(std::slice::from_ref(&row)).await.unwrap();
        let back: TestRow = store.get_audit("01-t").await.unwrap().unwrap();
        assert_eq!((back.id, back.merchant, back.key, back.at), (row.id, row.merchant, row.key, row.at));
    }

    #[test]
    fn bulk_statements_name_the_entity_columns_in_order() {
        assert_eq!(Column::iter().count(), COLUMN_COUNT);
        assert!(column_list().starts_with("(\"id\", \"timestamp\", \"kind\""), "{}", column_list());
    }
}
