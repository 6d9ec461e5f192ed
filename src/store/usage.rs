//! Usage counts and credit spending written to `api_keys` in batches (the
//! usage flush), exactly once per flush id, and the balances those writes
//! leave.

use chrono::{DateTime, Utc};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QuerySelect, Statement,
    TransactionTrait, TryInsertResult, Value,
};

use super::{
    Backend, Store, StoreError,
    entity::{api_key, usage_flush},
};

/// Accumulated usage of one key, to be added to its row.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UsageDelta {
    pub allowed: i64,
    pub denied: i64,
    pub last_used_at: Option<DateTime<Utc>>,
    /// Credits spent, taken from the balance of a key that has one.
    pub spent: i64,
}

/// A key's stored balance as a write left it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncedBalance {
    pub key_id: String,
    /// `None`: the key has no credits (now).
    pub remaining: Option<i64>,
    pub seq: i64,
}

/// What [`Store::apply_usage`] did with a flush.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UsageApplied {
    /// Written; the balances of the keys that spent credits, as written.
    Applied(Vec<SyncedBalance>),
    /// A flush with this id had already been committed (an earlier attempt
    /// whose acknowledgement was lost); nothing was added again.
    AlreadyApplied,
}

impl Store {
    /// Adds one flush of batched usage to the key rows: one UPDATE … FROM
    /// (VALUES …) per chunk of keys, `n = n + delta`, so replicas never
    /// overwrite each other. The flush's id is recorded in the same
    /// transaction, so a flush retried because its commit was never
    /// acknowledged is recognised and not added twice; and all chunks commit
    /// or none do. Usage never bumps the version: it does not change what a
    /// key permits. On PostgreSQL the rows are locked first, in id order:
    /// replicas flushing the same keys then queue behind each other instead
    /// of each holding rows the other waits for (a deadlock, which aborts
    /// one flush).
    pub async fn apply_usage(
        &self,
        flush_id: &str,
        applied_at: DateTime<Utc>,
        deltas: &[(&str, UsageDelta)],
    ) -> Result<UsageApplied, StoreError> {
        let txn = self.db().begin().await?;
        // BEGIN, INSERT flush id, (PostgreSQL) the row locks, the UPDATEs,
        // COMMIT.
        self.count(2);
        let recorded = usage_flush::Entity::insert(usage_flush::ActiveModel {
            id: Set(flush_id.to_owned()),
            applied_at: Set(crate::clock::stored(applied_at)),
        })
        .on_conflict_do_nothing()
        .exec_without_returning(&txn)
        .await?;
        let first = matches!(recorded, TryInsertResult::Inserted(n) if n > 0);
        if !first {
            self.count(1);
            txn.rollback().await?;
            return Ok(UsageApplied::AlreadyApplied);
        }
        if self.backend() == Backend::Postgres && !deltas.is_empty() {
            let ids = Store::json_ids(deltas.iter().map(|(id, _)| *id))?;
            self.count(1);
            txn.execute_raw(Statement::from_sql_and_values(
                self.db_backend(),
                "SELECT id FROM api_keys WHERE id IN (SELECT jsonb_array_elements_text($1::jsonb)) \
                 ORDER BY id FOR UPDATE",
                [ids],
            ))
            .await?;
        }
        let mut balances = Vec::new();
        for chunk in deltas.chunks(USAGE_CHUNK) {
            let (sql, values) = usage_statement(self.backend(), chunk);
            self.count(1);
            let rows =
                txn.query_all_raw(Statement::from_sql_and_values(self.db_backend(), sql, values)).await?;
            balances.extend(rows.iter().map(synced_balance).collect::<Result<Vec<_>, _>>()?);
        }
        self.count(1);
        txn.commit().await?;
        Ok(UsageApplied::Applied(balances))
    }

    /// The stored balances of these keys (for a flush whose write was
    /// already committed).
    pub async fn credit_balances(&self, key_ids: &[&str]) -> Result<Vec<SyncedBalance>, StoreError> {
        use api_key::Column as C;
        let mut out = Vec::with_capacity(key_ids.len());
        for chunk in key_ids.chunks(USAGE_CHUNK) {
            self.count(1);
            let rows: Vec<(String, Option<i64>, i64)> = api_key::Entity::find()
                .select_only()
                .columns([C::Id, C::CreditsRemaining, C::CreditsSeq])
                .filter(C::Id.is_in(chunk.iter().copied()))
                .into_tuple()
                .all(self.db())
                .await?;
            out.extend(rows.into_iter().map(|(key_id, remaining, seq)| SyncedBalance {
                key_id,
                remaining,
                seq,
            }));
        }
        Ok(out)
    }

    /// Whether the usage flush `flush_id` was committed.
    pub async fn usage_flush_applied(&self, flush_id: &str) -> Result<bool, StoreError> {
        self.count(1);
        Ok(usage_flush::Entity::find_by_id(flush_id.to_owned()).one(self.db()).await?.is_some())
    }

    /// Forgets the ids of usage flushes applied before `cutoff`: a retry
    /// comes within seconds of its first attempt, never days later.
    pub async fn delete_usage_flushes_before(&self, cutoff: DateTime<Utc>) -> Result<u64, StoreError> {
        self.count(1);
        Ok(usage_flush::Entity::delete_many()
            .filter(usage_flush::Column::AppliedAt.lt(cutoff))
            .exec(self.db())
            .await?
            .rows_affected)
    }
}

/// Keys per usage UPDATE: four parameters each, well inside both databases'
/// limits on bound parameters.
const USAGE_CHUNK: usize = 500;

/// `last_used_at` only ever moves forward (another replica may have seen a
/// later use); a delta without allowed uses leaves it alone.
fn usage_statement(backend: Backend, chunk: &[(&str, UsageDelta)]) -> (String, Vec<Value>) {
    let mut values = Vec::with_capacity(chunk.len() * 5);
    let mut rows = Vec::with_capacity(chunk.len());
    for (i, (key_id, delta)) in chunk.iter().enumerate() {
        values.push(Value::from(*key_id));
        values.push(Value::from(delta.allowed));
        values.push(Value::from(delta.denied));
        values.push(Value::ChronoDateTimeUtc(delta.last_used_at));
        values.push(Value::from(delta.spent));
        rows.push(match backend {
            Backend::Postgres => {
                let n = i * 5;
                format!(
                    "(${}::text, ${}::bigint, ${}::bigint, ${}::timestamptz, ${}::bigint)",
                    n + 1,
                    n + 2,
                    n + 3,
                    n + 4,
                    n + 5
                )
            }
            Backend::Sqlite => "(?, ?, ?, ?, ?)".to_owned(),
        });
    }
    let rows = rows.join(", ");
    let source = match backend {
        Backend::Postgres => format!("(VALUES {rows}) AS v(id, allowed, denied, used, spent)"),
        Backend::Sqlite => format!(
            "(SELECT column1 AS id, column2 AS allowed, column3 AS denied, column4 AS used, column5 AS spent \
             FROM (VALUES {rows})) AS v"
        ),
    };
    // A balance may end below 0 when replicas without Redis overspend
    // together: it records what was spent, exactly.
    let sql = format!(
        "UPDATE api_keys SET \
           request_count = api_keys.request_count + v.allowed, \
           denied_count = api_keys.denied_count + v.denied, \
           last_used_at = CASE \
             WHEN v.used IS NULL THEN api_keys.last_used_at \
             WHEN api_keys.last_used_at IS NULL OR api_keys.last_used_at < v.used THEN v.used \
             ELSE api_keys.last_used_at END, \
           credits_remaining = CASE WHEN v.spent > 0 AND api_keys.credits_remaining IS NOT NULL \
             THEN api_keys.credits_remaining - v.spent ELSE api_keys.credits_remaining END, \
           credits_seq = CASE WHEN v.spent > 0 THEN api_keys.credits_seq + 1 ELSE api_keys.credits_seq END \
         FROM {source} WHERE api_keys.id = v.id \
         RETURNING api_keys.id, api_keys.credits_remaining, api_keys.credits_seq"
    );
    (sql, values)
}

/// A row the usage UPDATE returned.
fn synced_balance(row: &sea_orm::QueryResult) -> Result<SyncedBalance, StoreError> {
    Ok(SyncedBalance {
        key_id: row.try_get("", "id")?,
        remaining: row.try_get("", "credits_remaining")?,
        seq: row.try_get("", "credits_seq")?,
    })
}
