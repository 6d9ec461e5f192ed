//! What still depends on each pepper generation, and moving rows to the
//! current one. A rewrite is conditional on the row still holding what was
//! checked, so it never undoes a concurrent regeneration or another
//! replica's rewrite.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sea_orm::{
    ColumnTrait, Condition, EntityTrait, ExprTrait, FromQueryResult, QueryFilter, QuerySelect,
    TransactionTrait,
    sea_query::{Expr, Func},
};

use super::{
    Store, StoreError,
    entity::{api_key, operator_token, webhook_endpoint},
};
use crate::keys::{KeyHash, PepperId};

/// How many rows one pepper generation still has.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GenerationCount {
    /// Keys that can still verify (not revoked, or rotating; not expired):
    /// they need this pepper until they are rehashed.
    pub live_keys: u64,
    /// Revoked or expired keys: they never verify again, so they need no
    /// pepper.
    pub inactive_keys: u64,
    /// Operator tokens that can still authenticate.
    pub live_operator_tokens: u64,
    /// Webhook endpoints whose signing secret is sealed under it.
    pub webhook_endpoints: u64,
}

/// A key checked under an old pepper, and its hash under the current one.
#[derive(Debug, Clone)]
pub struct Rehash {
    pub key_id: String,
    pub checked: KeyHash,
    pub current: KeyHash,
}

#[derive(Debug, FromQueryResult)]
struct Counted {
    pepper: String,
    n: i64,
}

impl Store {
    /// Rows by pepper generation. Two grouped scans of `api_keys`, one of
    /// `operator_tokens` and one of `webhook_endpoints`: for an operator's
    /// occasional question, not a hot path.
    pub async fn count_by_pepper(
        &self,
        now: DateTime<Utc>,
    ) -> Result<BTreeMap<String, GenerationCount>, StoreError> {
        use api_key::Column as K;
        use operator_token::Column as O;
        let live = Condition::all()
            .add(K::RevokedAt.is_null().or(K::RevokedAt.gt(now)))
            .add(K::ExpiresAt.is_null().or(K::ExpiresAt.gt(now)));
        let mut counts: BTreeMap<String, GenerationCount> = BTreeMap::new();
        let count = |n: i64| u64::try_from(n).unwrap_or(0);
        self.count(3);
        for live_only in [true, false] {
            let condition = if live_only { live.clone() } else { live.clone().not() };
            let found = api_key::Entity::find()
                .select_only()
                .column(K::Pepper)
                .column_as(Expr::from(Func::count(Expr::col(K::Id))), "n")
                .filter(condition)
                .group_by(K::Pepper)
                .into_model::<Counted>()
                .all(self.db())
                .await?;
            for row in found {
                let entry = counts.entry(row.pepper).or_default();
                if live_only {
                    entry.live_keys = count(row.n);
                } else {
                    entry.inactive_keys = count(row.n);
                }
            }
        }
        let operators = operator_token::Entity::find()
            .select_only()
            .column(O::Pepper)
            .column_as(Expr::from(Func::count(Expr::col(O::Id))), "n")
            .filter(O::RevokedAt.is_null().or(O::RevokedAt.gt(now)))
            .filter(O::ExpiresAt.is_null().or(O::ExpiresAt.gt(now)))
            .group_by(O::Pepper)
            .into_model::<Counted>()
            .all(self.db())
            .await?;
        for row in operators {
            counts.entry(row.pepper).or_default().live_operator_tokens = count(row.n);
        }
        self.count(1);
        let hooks = webhook_endpoint::Entity::find()
            .select_only()
            .column(webhook_endpoint::Column::Pepper)
            .column_as(Expr::from(Func::count(Expr::col(webhook_endpoint::Column::Id))), "n")
            .group_by(webhook_endpoint::Column::Pepper)
            .into_model::<Counted>()
            .all(self.db())
            .await?;
        for row in hooks {
            counts.entry(row.pepper).or_default().webhook_endpoints = count(row.n);
        }
        Ok(counts)
    }

    /// Rewrites each key whose hash is still the one checked, in one
    /// transaction; returns how many were rewritten. A rehash is not a
    /// change to what a key permits: no version bump, no change notice.
    pub async fn rehash_keys(&self, batch: &[Rehash]) -> Result<u64, StoreError> {
        use api_key::Column as C;
        let txn = self.db().begin().await?;
        self.count(2 + batch.len() as u64);
        let mut rewritten = 0;
        for r in batch {
            rewritten += api_key::Entity::update_many()
                .col_expr(C::KeyHash, Expr::value(r.current.to_string()))
                .col_expr(C::Pepper, Expr::value(r.current.pepper().to_string()))
                .filter(C::Id.eq(&r.key_id))
                .filter(C::KeyHash.eq(r.checked.to_string()))
                .exec(&txn)
                .await?
                .rows_affected;
        }
        txn.commit().await?;
        Ok(rewritten)
    }

    /// Replaces an operator token's digest with one under the current
    /// pepper, if it is still the one checked.
    pub async fn rewrite_operator_digest(
        &self,
        id: &str,
        checked: &[u8],
        pepper: &PepperId,
        digest: &[u8],
    ) -> Result<bool, StoreError> {
        use operator_token::Column as C;
        self.count(1);
        let rewritten = operator_token::Entity::update_many()
            .col_expr(C::Digest, Expr::value(super::operators::encode_hex(digest)))
            .col_expr(C::Pepper, Expr::value(pepper.to_string()))
            .filter(C::Id.eq(id))
            .filter(C::Digest.eq(super::operators::encode_hex(checked)))
            .exec(self.db())
            .await?
            .rows_affected;
        Ok(rewritten == 1)
    }
}
