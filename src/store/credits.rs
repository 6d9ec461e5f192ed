//! Queries on the credit columns of `api_keys`: the balance a fleet's
//! shared copy is seeded with, and the daily and monthly refills. (The
//! spending itself is written with the usage counts, `apply_usage`.)

use chrono::{DateTime, Utc};
use sea_orm::{
    ColumnTrait, EntityTrait, ExprTrait, QueryFilter, QuerySelect, TransactionTrait, sea_query::Expr,
};

use super::{Store, StoreError, entity::api_key, keys::fetch, usage::SyncedBalance};
use crate::keys::RefillInterval;

/// Arbitrary constant naming keywarden's credits refill lock.
const REFILL_LOCK: i64 = 0x6b77_7265_6669_6c6c;

impl Store {
    /// A key's stored balance and its epoch, to seed the fleet's shared
    /// copy with: `None` if the key is gone or has no credits.
    pub async fn credit_epoch(&self, key_id: &str) -> Result<Option<(i64, i64)>, StoreError> {
        use api_key::Column as C;
        self.count(1);
        let row: Option<(Option<i64>, i64)> = api_key::Entity::find()
            .select_only()
            .columns([C::CreditsRemaining, C::CreditsEpoch])
            .filter(C::Id.eq(key_id))
            .into_tuple()
            .one(self.db())
            .await?;
        Ok(row.and_then(|(remaining, epoch)| remaining.map(|r| (r, epoch))))
    }

    /// Sets every balance whose refill boundary has passed since its last
    /// refill back to its amount, as of `now` (the database's clock):
    /// `None` when another replica holds the refill lock (PostgreSQL).
    /// Each refilled key changes version, so caches everywhere read it
    /// again; the balances as written are returned. Idempotent: a key is
    /// refilled once per boundary however often this runs.
    pub async fn refill_credits(&self, now: DateTime<Utc>) -> Result<Option<Vec<SyncedBalance>>, StoreError> {
        use api_key::Column as C;
        let txn = self.db().begin().await?;
        self.count(2);
        if !self.try_transaction_lock(&txn, REFILL_LOCK).await? {
            txn.rollback().await?;
            return Ok(None);
        }
        let mut refilled = Vec::new();
        for interval in [RefillInterval::Daily, RefillInterval::Monthly] {
            let boundary = interval.last_boundary(now);
            self.count(1);
            let due: Vec<api_key::Model> = api_key::Entity::find()
                .filter(C::CreditsRefillInterval.eq(interval.as_str()))
                .filter(C::CreditsRefilledAt.is_null().or(C::CreditsRefilledAt.lt(boundary)))
                .filter(C::RevokedAt.is_null())
                .all(&txn)
                .await?;
            for key in due {
                self.count(1);
                api_key::Entity::update_many()
                    .col_expr(C::CreditsRemaining, Expr::col(C::CreditsRefillAmount))
                    .col_expr(C::CreditsRefilledAt, Expr::value(Some(boundary)))
                    .col_expr(C::CreditsSeq, Expr::col(C::CreditsSeq).add(1))
                    .col_expr(C::CreditsEpoch, Expr::col(C::CreditsEpoch).add(1))
                    .col_expr(C::Version, Expr::col(C::Version).add(1))
                    .filter(C::Id.eq(key.id.as_str()))
                    .exec(&txn)
                    .await?;
                let Some(after) = fetch(&txn, &key.id).await? else { continue };
                self.notify_change(&txn, &after).await?;
                refilled.push(SyncedBalance {
                    key_id: after.id.clone(),
                    remaining: after.credits.map(|c| c.remaining),
                    seq: after.credits_seq,
                });
            }
        }
        txn.commit().await?;
        Ok(Some(refilled))
    }
}
