//! PostgreSQL's bulk path: the writer's batch streamed in by binary `COPY`
//! (PostgreSQL's cheapest way in; see docs/decisions.md), and the outcomes
//! other replicas hold for rows still queued elsewhere.

use chrono::{DateTime, Utc};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, Statement, TransactionTrait,
    sea_query::OnConflict,
};

use super::{
    AuditRow, COLUMN_COUNT, Cell, RowKey, VERIFY_KIND, column_list, insert_audit_rows,
    pg_copy::{CopyWriter, EncodeError},
};
use crate::{
    keys::Decision,
    store::{Backend, Store, StoreError, entity::audit_outcome, sqlx_error},
};

impl Store {
    /// One COPY (an upsert instead when the batch turns out to be partly
    /// stored already), then the outcomes other replicas held for these
    /// rows (one more statement).
    pub(super) async fn insert_audit_postgres<R: AuditRow>(&self, rows: &[R]) -> Result<(), StoreError> {
        self.count(1);
        match self.copy_audit_rows(rows).await {
            // Some rows are there already: this is the retry of a batch
            // whose commit was not acknowledged. COPY cannot skip rows, so
            // the batch goes again as an upsert.
            Err(e) if e.as_database_error().is_some_and(|d| d.is_unique_violation()) => {
                self.count(rows.len().div_ceil(super::PORTABLE_CHUNK) as u64);
                let txn = self.db().begin().await?;
                insert_audit_rows(&txn, rows).await?;
                txn.commit().await?;
            }
            other => other.map_err(sqlx_error)?,
        }
        let allowed: Vec<&str> =
            rows.iter().map(RowKey::of).filter(|k| k.allowed_verify).map(|k| k.id).collect();
        self.apply_held_outcomes(&allowed).await.map(drop)
    }

    async fn copy_audit_rows<R: AuditRow>(&self, rows: &[R]) -> Result<(), sea_orm::sqlx::Error> {
        use sea_orm::sqlx::{self, postgres::PgPoolCopyExt};
        let data = encode_copy(rows).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
        let mut copy = self
            .db()
            .get_postgres_connection_pool()
            .copy_in_raw(&format!("COPY audit_events {} FROM STDIN (FORMAT binary)", column_list()))
            .await?;
        copy.send(data).await?;
        copy.finish().await.map(drop)
    }

    /// PostgreSQL: moves held outcomes onto their rows, for the rows that
    /// exist now (a held outcome whose row turns out not to be an allowed
    /// verification is discarded, as RecordOutcomes would have done). Runs
    /// after every audit insert and after every hold, so whichever of the two
    /// commits last applies the outcome.
    ///
    /// Almost always nothing is held for the ids, so a lookup in the small
    /// `audit_outcomes` table comes first and usually ends it. The move
    /// itself touches the large audit table, and a plan cached while that
    /// table was small (connections keep their prepared statements) can
    /// scan it whole; it runs only for ids actually held.
    async fn apply_held_outcomes(&self, ids: &[&str]) -> Result<u64, StoreError> {
        if ids.is_empty() {
            return Ok(0);
        }
        self.count(1);
        let held: Vec<String> = self
            .db()
            .query_all_raw(Statement::from_sql_and_values(
                self.db_backend(),
                "SELECT event_id FROM audit_outcomes WHERE event_id IN (SELECT jsonb_array_elements_text($1::jsonb))",
                [Store::json_ids(ids.iter().copied())?],
            ))
            .await?
            .iter()
            .map(|row| row.try_get_by_index::<String>(0))
            .collect::<Result<_, _>>()?;
        if held.is_empty() {
            return Ok(0);
        }
        self.count(1);
        let sql = format!(
            "WITH moved AS (DELETE FROM audit_outcomes o \
               WHERE o.event_id IN (SELECT jsonb_array_elements_text($1::jsonb)) \
               AND EXISTS (SELECT 1 FROM audit_events e WHERE e.id = o.event_id) \
             RETURNING o.event_id, o.status) \
             UPDATE audit_events SET status = moved.status FROM moved \
             WHERE audit_events.id = moved.event_id AND audit_events.kind = '{}' AND audit_events.decision = '{}' \
             AND audit_events.status IS NULL",
            VERIFY_KIND,
            Decision::Allow.as_str(),
        );
        Ok(self
            .db()
            .execute_raw(Statement::from_sql_and_values(
                self.db_backend(),
                sql,
                [Store::json_ids(held.iter().map(String::as_str))?],
            ))
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
        if outcomes.is_empty() || self.backend() != Backend::Postgres {
            return Ok(());
        }
        self.count(1);
        let rows = outcomes.iter().map(|(id, status)| audit_outcome::ActiveModel {
            event_id: Set(id.clone()),
            status: Set(i32::from(*status)),
            received_at: Set(now),
        });
        // The first status held for an id stays, as on the row itself.
        audit_outcome::Entity::insert_many(rows)
            .on_conflict(OnConflict::column(audit_outcome::Column::EventId).do_nothing().to_owned())
            .exec_without_returning(self.db())
            .await?;
        let ids: Vec<&str> = outcomes.iter().map(|(id, _)| id.as_str()).collect();
        self.apply_held_outcomes(&ids).await?;
        Ok(())
    }

    /// Drops held outcomes whose row never appeared (unknown ids).
    pub async fn expire_held_outcomes(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        if self.backend() != Backend::Postgres {
            return Ok(0);
        }
        self.count(1);
        Ok(audit_outcome::Entity::delete_many()
            .filter(audit_outcome::Column::ReceivedAt.lt(before))
            .exec(self.db())
            .await?
            .rows_affected)
    }
}

/// The batch in PostgreSQL's binary COPY format.
fn encode_copy<R: AuditRow>(rows: &[R]) -> Result<Vec<u8>, EncodeError> {
    // A typical verification row is a few hundred bytes.
    let mut w = CopyWriter::with_capacity(rows.len() * 320);
    for row in rows {
        w.row(COLUMN_COUNT as i16);
        for (_, cell) in row.cells() {
            match cell {
                Cell::Text(v) => w.text(v)?,
                Cell::Ip(v) => w.text(v.map(|ip| ip.to_string()).as_deref())?,
                Cell::Time(t) => w.timestamptz(t)?,
                Cell::Int(v) => w.int4(v),
            };
        }
    }
    Ok(w.finish())
}
