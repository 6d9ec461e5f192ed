//! Changes of a key's state short of an update: disabling and enabling it,
//! and revoking a leaked key together with its rotation partners.

use chrono::{DateTime, Utc};
use sea_orm::{
    ColumnTrait, EntityTrait, ExprTrait, QueryFilter, QuerySelect, TransactionTrait, sea_query::Expr,
};

use super::{Change, StoredKey, fetch};
use crate::store::{
    Store, StoreError,
    audit::{AuditRow, insert_audit_rows},
    entity::api_key,
    events::{NewEvent, insert_events},
};

/// Most keys one rotation chain may link, each way: a chain is as long as
/// the regenerations inside one grace period, and the walk stays bounded
/// whatever the rows say.
const MAX_CHAIN: usize = 16;

/// What a leak did to the reported key.
#[derive(Debug)]
pub enum Leaked {
    /// Revoked now, with the rotation partners that stopped with it.
    Revoked { key: StoredKey, partners: Vec<StoredKey> },
    /// Already revoked: nothing was written.
    AlreadyRevoked(StoredKey),
    /// No such key (deleted between the match and the write).
    NotFound,
}

/// Which half of a leak a key is, for the rows written about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeakRevocation {
    /// The key the report proved.
    Reported,
    /// A key in the same rotation, stopped with it.
    Partner,
}

impl Store {
    /// Disables a key that is neither revoked nor disabled. A refused change
    /// answers the key as it is, for the caller to say why.
    pub async fn disable_key(
        &self,
        merchant_id: &str,
        key_id: &str,
        reason: Option<&str>,
        now: DateTime<Utc>,
        audit: impl AuditRow,
        event: impl FnOnce(&StoredKey) -> NewEvent + Send,
    ) -> Result<Change, StoreError> {
        use api_key::Column as C;
        let update = api_key::Entity::update_many()
            .col_expr(C::DisabledAt, Expr::value(Some(now)))
            .col_expr(C::DisabledReason, Expr::value(reason.map(str::to_owned)))
            .filter(C::DisabledAt.is_null())
            .filter(C::RevokedAt.is_null().or(C::RevokedAt.gt(now)));
        self.change_one(merchant_id, key_id, now, update, audit, event).await
    }

    /// Enables a disabled key that is not revoked.
    pub async fn enable_key(
        &self,
        merchant_id: &str,
        key_id: &str,
        now: DateTime<Utc>,
        audit: impl AuditRow,
        event: impl FnOnce(&StoredKey) -> NewEvent + Send,
    ) -> Result<Change, StoreError> {
        use api_key::Column as C;
        let update = api_key::Entity::update_many()
            .col_expr(C::DisabledAt, Expr::value(Option::<DateTime<Utc>>::None))
            .col_expr(C::DisabledReason, Expr::value(Option::<String>::None))
            .filter(C::DisabledAt.is_not_null())
            .filter(C::RevokedAt.is_null().or(C::RevokedAt.gt(now)));
        self.change_one(merchant_id, key_id, now, update, audit, event).await
    }

    /// Revokes a leaked key now, and every key of its rotation still in its
    /// grace period (predecessors it replaced, successors that replaced
    /// it), in one transaction with the rows `record` builds for each. A
    /// key already revoked writes nothing, so a report delivered twice
    /// changes nothing the second time. Partners are revoked with
    /// `partner_reason`.
    pub async fn revoke_leaked<A, F>(
        &self,
        key_id: &str,
        reason: &str,
        partner_reason: &str,
        now: DateTime<Utc>,
        mut record: F,
    ) -> Result<Leaked, StoreError>
    where
        A: AuditRow,
        F: FnMut(&StoredKey, LeakRevocation) -> (A, NewEvent) + Send,
    {
        use api_key::Column as C;
        let txn = self.db().begin().await?;
        // BEGIN, UPDATE, SELECT; each partner below adds its own.
        self.count(3);
        let live = C::RevokedAt.is_null().or(C::RevokedAt.gt(now));
        let revoke = |id: &str, reason: &str| {
            api_key::Entity::update_many()
                .col_expr(C::RevokedAt, Expr::value(Some(now)))
                .col_expr(C::RevokeReason, Expr::value(Some(reason.to_owned())))
                .col_expr(C::UpdatedAt, Expr::value(now))
                .col_expr(C::Version, Expr::col(C::Version).add(1))
                .filter(C::Id.eq(id))
                .filter(live.clone())
        };
        // Written first, as every mutation here is: SQLite's write lock is
        // taken up front, with no read lock to upgrade. A key the update
        // applied to that names a successor was rotating (regeneration sets
        // both), so its successor is in grace with it.
        let updated = revoke(key_id, reason).exec(&txn).await?.rows_affected;
        let Some(key) = fetch(&txn, key_id).await? else { return Ok(Leaked::NotFound) };
        if updated != 1 {
            return Ok(Leaked::AlreadyRevoked(key));
        }
        let mut partners = Vec::new();
        // Successors: while a key is rotating, the key that replaced it.
        let mut next = key.replaced_by_key_id.clone();
        while let Some(id) = next.take() {
            if partners.len() >= MAX_CHAIN {
                break;
            }
            self.count(2);
            let Some(successor) = fetch(&txn, &id).await? else { break };
            let rotating = successor.revoked_at.is_some_and(|at| at > now);
            if revoke(&id, partner_reason).exec(&txn).await?.rows_affected == 1 {
                if let Some(changed) = fetch(&txn, &id).await? {
                    partners.push(changed);
                }
                next = rotating.then_some(successor.replaced_by_key_id).flatten();
            }
        }
        // Predecessors: keys this one replaced whose grace has not ended.
        let mut current = key_id.to_owned();
        for _ in 0..MAX_CHAIN {
            self.count(1);
            let predecessor: Option<String> = api_key::Entity::find()
                .select_only()
                .column(C::Id)
                .filter(C::ReplacedByKeyId.eq(current.as_str()))
                .filter(live.clone())
                .into_tuple()
                .one(&txn)
                .await?;
            let Some(id) = predecessor else { break };
            self.count(2);
            revoke(&id, partner_reason).exec(&txn).await?;
            let Some(changed) = fetch(&txn, &id).await? else { break };
            current = id;
            partners.push(changed);
        }
        let mut audits = Vec::with_capacity(partners.len() + 1);
        let mut events = Vec::with_capacity(partners.len() + 1);
        for (changed, role) in std::iter::once((&key, LeakRevocation::Reported))
            .chain(partners.iter().map(|p| (p, LeakRevocation::Partner)))
        {
            let (audit, event) = record(changed, role);
            audits.push(audit);
            events.push(event);
            self.notify_change(&txn, changed).await?;
        }
        self.count(3);
        insert_audit_rows(&txn, &audits).await?;
        insert_events(&txn, events).await?;
        txn.commit().await?;
        Ok(Leaked::Revoked { key, partners })
    }
}
