//! The keys the expiry scan looks at: each query reads one window of
//! `api_keys` on an indexed time, so a scan's cost follows the keys due
//! around now, not all keys ever issued.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use sea_orm::{ColumnTrait, EntityTrait, ExprTrait, QueryFilter, QueryOrder, QuerySelect, sea_query::Expr};

use super::{
    Store, StoreError,
    entity::{api_key, key_event},
    keys::StoredKey,
};

impl Store {
    /// Unrevoked keys that expire in `(after, until]`, soonest first.
    pub async fn keys_expiring(
        &self,
        after: DateTime<Utc>,
        until: DateTime<Utc>,
        limit: u64,
    ) -> Result<Vec<StoredKey>, StoreError> {
        use api_key::Column as C;
        self.keys_where(
            api_key::Entity::find()
                .filter(C::ExpiresAt.gt(after))
                .filter(C::ExpiresAt.lte(until))
                .filter(C::RevokedAt.is_null())
                .order_by_asc(C::ExpiresAt),
            limit,
        )
        .await
    }

    /// Keys that expired in `(after, until]` while they could still verify
    /// (not revoked before they expired).
    pub async fn keys_expired(
        &self,
        after: DateTime<Utc>,
        until: DateTime<Utc>,
        limit: u64,
    ) -> Result<Vec<StoredKey>, StoreError> {
        use api_key::Column as C;
        self.keys_where(
            api_key::Entity::find()
                .filter(C::ExpiresAt.gt(after))
                .filter(C::ExpiresAt.lte(until))
                .filter(C::RevokedAt.is_null().or(Expr::col(C::RevokedAt).gt(Expr::col(C::ExpiresAt))))
                .order_by_asc(C::ExpiresAt),
            limit,
        )
        .await
    }

    /// Rotated keys whose grace ended in `(after, until]` (not cut short by
    /// a revocation, which rewrites the reason).
    pub async fn keys_out_of_grace(
        &self,
        after: DateTime<Utc>,
        until: DateTime<Utc>,
        limit: u64,
    ) -> Result<Vec<StoredKey>, StoreError> {
        use api_key::Column as C;
        self.keys_where(
            api_key::Entity::find()
                .filter(C::RevokedAt.gt(after))
                .filter(C::RevokedAt.lte(until))
                .filter(C::ReplacedByKeyId.is_not_null())
                .filter(C::RevokeReason.eq("regenerated"))
                .order_by_asc(C::RevokedAt),
            limit,
        )
        .await
    }

    async fn keys_where(
        &self,
        query: sea_orm::Select<api_key::Entity>,
        limit: u64,
    ) -> Result<Vec<StoredKey>, StoreError> {
        self.count_read();
        query.limit(limit).all(self.db()).await?.into_iter().map(StoredKey::try_from).collect()
    }

    /// Which of `occasions` have an event already.
    pub async fn occasions_taken(&self, occasions: &[String]) -> Result<HashSet<String>, StoreError> {
        use key_event::Column as C;
        let mut taken = HashSet::new();
        for chunk in occasions.chunks(500) {
            self.count_read();
            let found: Vec<Option<String>> = key_event::Entity::find()
                .select_only()
                .column(C::Occasion)
                .filter(C::Occasion.is_in(chunk.iter().map(String::as_str)))
                .into_tuple()
                .all(self.db())
                .await?;
            taken.extend(found.into_iter().flatten());
        }
        Ok(taken)
    }
}
