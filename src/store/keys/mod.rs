//! Queries on `api_keys`. Mutations write first and read back inside one
//! transaction, with the audit row of the change in the same transaction:
//! writing first takes SQLite's write lock up front (no lock upgrades that
//! could fail), and a conditional UPDATE makes concurrent changes safe on both
//! backends without SELECT … FOR UPDATE.

use chrono::{DateTime, Utc};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DatabaseTransaction, EntityTrait, ExprTrait, QueryFilter,
    QueryOrder, QuerySelect, SqlErr, Statement, TransactionTrait, Value, sea_query::Expr,
};

use super::{
    Backend, Store, StoreError,
    audit::{AuditRow, insert_audit_rows},
    entity::api_key,
    events::{NewEvent, insert_events},
};
use crate::keys::{Credits, KeyHash, Metadata, RateLimits, Refill, RefillInterval};

mod state;

pub use state::{LeakRevocation, Leaked};

/// A key as stored, with its hash parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredKey {
    pub id: String,
    pub merchant_id: String,
    pub name: String,
    pub prefix: String,
    pub hash: KeyHash,
    pub scopes: Vec<String>,
    pub allowed_cidrs: Vec<String>,
    pub rate_limits: RateLimits,
    pub expires_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub created_by: String,
    pub updated_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub revoke_reason: Option<String>,
    pub replaced_by_key_id: Option<String>,
    pub request_count: i64,
    pub denied_count: i64,
    pub last_used_at: Option<DateTime<Utc>>,
    pub version: i64,
    /// `None` is unlimited. `remaining` is as stored: without the spending
    /// replicas have not flushed yet.
    pub credits: Option<Credits>,
    /// Bumped by every write of the balance.
    pub credits_seq: i64,
    /// Bumped when the balance is set outright (an update, a refill).
    pub credits_epoch: i64,
    /// Set while the key is disabled.
    pub disabled_at: Option<DateTime<Utc>>,
    pub disabled_reason: Option<String>,
    pub metadata: Metadata,
}

impl TryFrom<api_key::Model> for StoredKey {
    type Error = StoreError;

    fn try_from(m: api_key::Model) -> Result<Self, StoreError> {
        let hash = m.key_hash.parse::<KeyHash>().map_err(|e| StoreError::Corrupt {
            id: m.id.clone(),
            what: "key hash",
            detail: e.to_string(),
        })?;
        let rate_limits = RateLimits::from_stored(&m.rate_limits).map_err(|detail| StoreError::Corrupt {
            id: m.id.clone(),
            what: "rate limits",
            detail,
        })?;
        let credits = stored_credits(&m)?;
        let metadata = Metadata::from_stored(&m.metadata).map_err(|detail| StoreError::Corrupt {
            id: m.id.clone(),
            what: "metadata",
            detail,
        })?;
        Ok(Self {
            metadata,
            disabled_at: m.disabled_at,
            disabled_reason: m.disabled_reason,
            hash,
            rate_limits,
            credits,
            credits_seq: m.credits_seq,
            credits_epoch: m.credits_epoch,
            scopes: split(&m.scopes),
            allowed_cidrs: split(&m.allowed_cidrs),
            id: m.id,
            merchant_id: m.merchant_id,
            name: m.name,
            prefix: m.prefix,
            expires_at: m.expires_at,
            created_at: m.created_at,
            created_by: m.created_by,
            updated_at: m.updated_at,
            revoked_at: m.revoked_at,
            revoke_reason: m.revoke_reason,
            replaced_by_key_id: m.replaced_by_key_id,
            request_count: m.request_count,
            denied_count: m.denied_count,
            last_used_at: m.last_used_at,
            version: m.version,
        })
    }
}

/// The credits columns as one value; a refill needs both of its columns.
fn stored_credits(m: &api_key::Model) -> Result<Option<Credits>, StoreError> {
    let Some(remaining) = m.credits_remaining else { return Ok(None) };
    let refill = match (m.credits_refill_amount, m.credits_refill_interval.as_deref()) {
        (None, None) => None,
        (Some(amount), Some(interval)) => match RefillInterval::parse(interval) {
            Some(interval) => Some(Refill { amount, interval }),
            None => {
                return Err(StoreError::Corrupt {
                    id: m.id.clone(),
                    what: "credits refill interval",
                    detail: format!("{interval:?} is not daily or monthly"),
                });
            }
        },
        _ => {
            return Err(StoreError::Corrupt {
                id: m.id.clone(),
                what: "credits refill",
                detail: "an amount without an interval, or the reverse".into(),
            });
        }
    };
    Ok(Some(Credits { remaining, refill }))
}

fn split(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_owned).collect()
}

/// A key about to be inserted.
#[derive(Debug, Clone)]
pub struct NewKey {
    pub id: String,
    pub merchant_id: String,
    pub name: String,
    pub prefix: String,
    pub hash: KeyHash,
    pub scopes: Vec<String>,
    pub allowed_cidrs: Vec<String>,
    pub rate_limits: RateLimits,
    pub credits: Option<Credits>,
    pub metadata: Metadata,
    pub expires_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub created_by: String,
}

impl NewKey {
    fn into_active(self) -> api_key::ActiveModel {
        api_key::ActiveModel {
            id: Set(self.id),
            merchant_id: Set(self.merchant_id),
            name: Set(self.name),
            prefix: Set(self.prefix),
            key_hash: Set(self.hash.to_string()),
            pepper: Set(self.hash.pepper().to_string()),
            scopes: Set(self.scopes.join(" ")),
            allowed_cidrs: Set(self.allowed_cidrs.join(" ")),
            rate_limits: Set(self.rate_limits.to_stored()),
            expires_at: Set(self.expires_at),
            created_at: Set(self.created_at),
            created_by: Set(self.created_by),
            updated_at: Set(self.created_at),
            revoked_at: Set(None),
            revoke_reason: Set(None),
            replaced_by_key_id: Set(None),
            request_count: Set(0),
            denied_count: Set(0),
            last_used_at: Set(None),
            version: Set(1),
            credits_remaining: Set(self.credits.map(|c| c.remaining)),
            credits_refill_amount: Set(self.credits.and_then(|c| c.refill).map(|r| r.amount)),
            credits_refill_interval: Set(self
                .credits
                .and_then(|c| c.refill)
                .map(|r| r.interval.as_str().to_owned())),
            // A new balance counts as refilled at the boundary it was set in.
            credits_refilled_at: Set(self
                .credits
                .and_then(|c| c.refill)
                .map(|r| r.interval.last_boundary(self.created_at))),
            credits_seq: Set(0),
            credits_epoch: Set(0),
            disabled_at: Set(None),
            disabled_reason: Set(None),
            metadata: Set(self.metadata.to_stored()),
        }
    }
}

/// Fields an update changes; `None` leaves a field alone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyChanges {
    pub name: Option<String>,
    pub scopes: Option<Vec<String>>,
    pub allowed_cidrs: Option<Vec<String>>,
    pub rate_limits: Option<RateLimits>,
    /// `Some(None)` makes the key unlimited.
    pub credits: Option<Option<Credits>>,
    /// `Some(None)` clears the expiry.
    pub expires_at: Option<Option<DateTime<Utc>>>,
    /// Replaces every entry.
    pub metadata: Option<Metadata>,
}

/// What a conditional change did.
#[derive(Debug)]
pub enum Change {
    Applied(StoredKey),
    /// No such key for this merchant.
    NotFound,
    /// The key exists but its state refused the change; here it is as it is.
    Refused(StoredKey),
}

/// What a regeneration did: the old key as revoked and its successor, both
/// as the transaction left them.
#[derive(Debug)]
pub enum Rotation {
    Applied { old: StoredKey, new: Box<StoredKey> },
    NotFound,
    Refused(StoredKey),
}

#[derive(Debug, thiserror::Error)]
pub enum InsertError {
    #[error("the lookup prefix is already taken")]
    PrefixTaken,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Store {
    /// Inserts a key, its KEY_CREATED row and its event together.
    pub async fn insert_key(
        &self,
        key: NewKey,
        audit: impl AuditRow,
        event: NewEvent,
    ) -> Result<StoredKey, InsertError> {
        let id = key.id.clone();
        let txn = self.db().begin().await.map_err(StoreError::from)?;
        // BEGIN, INSERT key, INSERT audit, INSERT event, SELECT, COMMIT.
        self.count(6);
        match api_key::Entity::insert(key.into_active()).exec_without_returning(&txn).await {
            Err(e) if matches!(e.sql_err(), Some(SqlErr::UniqueConstraintViolation(_))) => {
                return Err(InsertError::PrefixTaken);
            }
            other => other.map_err(StoreError::from)?,
        };
        insert_audit_rows(&txn, &[audit]).await?;
        insert_events(&txn, vec![event]).await?;
        let stored = fetch(&txn, &id).await?;
        txn.commit().await.map_err(StoreError::from)?;
        stored.ok_or_else(|| {
            StoreError::Corrupt { id, what: "row", detail: "vanished after insert".into() }.into()
        })
    }

    /// One merchant's key by id; another merchant's key is not found.
    pub async fn get_key(&self, merchant_id: &str, key_id: &str) -> Result<Option<StoredKey>, StoreError> {
        self.count_read();
        fetch_scoped(self.db(), merchant_id, key_id).await
    }

    /// The key with this lookup prefix, for verification.
    pub async fn find_by_prefix(&self, prefix: &str) -> Result<Option<StoredKey>, StoreError> {
        self.count_read();
        api_key::Entity::find()
            .filter(api_key::Column::Prefix.eq(prefix))
            .one(self.db())
            .await?
            .map(StoredKey::try_from)
            .transpose()
    }

    /// A key by id alone, for refreshing verification state.
    pub async fn find_by_id(&self, key_id: &str) -> Result<Option<StoredKey>, StoreError> {
        self.count_read();
        fetch(self.db(), key_id).await
    }

    /// Newest first, `limit` rows after `after`.
    pub async fn list_keys(
        &self,
        merchant_id: &str,
        include_revoked: bool,
        now: DateTime<Utc>,
        after: Option<super::Cursor>,
        limit: u64,
    ) -> Result<Vec<StoredKey>, StoreError> {
        use api_key::Column as C;
        let mut query = api_key::Entity::find().filter(C::MerchantId.eq(merchant_id));
        if !include_revoked {
            query = query.filter(C::RevokedAt.is_null().or(C::RevokedAt.gt(now)));
        }
        if let Some(cursor) = after {
            query = query.filter(cursor.after(C::CreatedAt, C::Id));
        }
        self.count_read();
        query
            .order_by_desc(C::CreatedAt)
            .order_by_desc(C::Id)
            .limit(limit)
            .all(self.db())
            .await?
            .into_iter()
            .map(StoredKey::try_from)
            .collect()
    }

    /// Applies `changes` to a key that is neither revoked nor rotating.
    pub async fn update_key(
        &self,
        merchant_id: &str,
        key_id: &str,
        changes: &KeyChanges,
        now: DateTime<Utc>,
        audit: impl AuditRow,
        event: impl FnOnce(&StoredKey) -> NewEvent + Send,
    ) -> Result<Change, StoreError> {
        use api_key::Column as C;
        let mut update = api_key::Entity::update_many();
        if let Some(name) = &changes.name {
            update = update.col_expr(C::Name, Expr::value(name.clone()));
        }
        if let Some(scopes) = &changes.scopes {
            update = update.col_expr(C::Scopes, Expr::value(scopes.join(" ")));
        }
        if let Some(cidrs) = &changes.allowed_cidrs {
            update = update.col_expr(C::AllowedCidrs, Expr::value(cidrs.join(" ")));
        }
        if let Some(limits) = &changes.rate_limits {
            update = update.col_expr(C::RateLimits, Expr::value(limits.to_stored()));
        }
        if let Some(expires_at) = changes.expires_at {
            update = update.col_expr(C::ExpiresAt, Expr::value(expires_at));
        }
        if let Some(metadata) = &changes.metadata {
            update = update.col_expr(C::Metadata, Expr::value(metadata.to_stored()));
        }
        if let Some(credits) = changes.credits {
            let refill = credits.and_then(|c| c.refill);
            update = update
                .col_expr(C::CreditsRemaining, Expr::value(credits.map(|c| c.remaining)))
                .col_expr(C::CreditsRefillAmount, Expr::value(refill.map(|r| r.amount)))
                .col_expr(
                    C::CreditsRefillInterval,
                    Expr::value(refill.map(|r| r.interval.as_str().to_owned())),
                )
                .col_expr(C::CreditsRefilledAt, Expr::value(refill.map(|r| r.interval.last_boundary(now))))
                .col_expr(C::CreditsSeq, Expr::col(C::CreditsSeq).add(1))
                .col_expr(C::CreditsEpoch, Expr::col(C::CreditsEpoch).add(1));
        }
        let update = update.filter(C::RevokedAt.is_null());
        self.change_one(merchant_id, key_id, now, update, audit, event).await
    }

    /// Revokes a key now (cutting a rotation's grace short). Revoking a key
    /// that is already revoked changes nothing.
    pub async fn revoke_key(
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
            .col_expr(C::RevokedAt, Expr::value(Some(now)))
            .col_expr(C::RevokeReason, Expr::value(reason.map(str::to_owned)))
            .filter(C::RevokedAt.is_null().or(C::RevokedAt.gt(now)));
        self.change_one(merchant_id, key_id, now, update, audit, event).await
    }

    /// Applies `update` (with `updated_at` and a version bump) to one
    /// merchant's key, with its audit row and event, in one transaction;
    /// `update`'s own filters say when the change is refused.
    async fn change_one(
        &self,
        merchant_id: &str,
        key_id: &str,
        now: DateTime<Utc>,
        update: sea_orm::UpdateMany<api_key::Entity>,
        audit: impl AuditRow,
        event: impl FnOnce(&StoredKey) -> NewEvent + Send,
    ) -> Result<Change, StoreError> {
        use api_key::Column as C;
        let txn = self.db().begin().await?;
        let updated = update
            .col_expr(C::UpdatedAt, Expr::value(now))
            .col_expr(C::Version, Expr::col(C::Version).add(1))
            .filter(C::Id.eq(key_id))
            .filter(C::MerchantId.eq(merchant_id))
            .exec(&txn)
            .await?
            .rows_affected;
        self.finish_change(txn, merchant_id, key_id, updated == 1, vec![audit], event).await
    }

    /// Marks an unrevoked key as replaced by `successor` from `revoke_at` on,
    /// and inserts the successor, the audit rows and the event that
    /// `make_successor` builds from the old key's state, all in one
    /// transaction.
    pub async fn regenerate_key<F, A>(
        &self,
        merchant_id: &str,
        key_id: &str,
        successor_id: &str,
        revoke_at: DateTime<Utc>,
        now: DateTime<Utc>,
        make_successor: F,
    ) -> Result<Rotation, InsertError>
    where
        F: FnOnce(&StoredKey) -> (NewKey, Vec<A>, NewEvent) + Send,
        A: AuditRow,
    {
        use api_key::Column as C;
        let txn = self.db().begin().await.map_err(StoreError::from)?;
        // BEGIN, UPDATE old, SELECT old.
        self.count(3);
        let updated = api_key::Entity::update_many()
            .col_expr(C::RevokedAt, Expr::value(Some(revoke_at)))
            .col_expr(C::RevokeReason, Expr::value(Some("regenerated".to_owned())))
            .col_expr(C::ReplacedByKeyId, Expr::value(Some(successor_id.to_owned())))
            .col_expr(C::UpdatedAt, Expr::value(now))
            .col_expr(C::Version, Expr::col(C::Version).add(1))
            .filter(C::Id.eq(key_id))
            .filter(C::MerchantId.eq(merchant_id))
            .filter(C::RevokedAt.is_null())
            .exec(&txn)
            .await
            .map_err(StoreError::from)?
            .rows_affected;
        let Some(old) = fetch_scoped(&txn, merchant_id, key_id).await? else {
            return Ok(Rotation::NotFound);
        };
        if updated != 1 {
            return Ok(Rotation::Refused(old));
        }
        let (new_key, audits, event) = make_successor(&old);
        let new_id = new_key.id.clone();
        // INSERT new, INSERT audits, INSERT event, SELECT new, COMMIT.
        self.count(5);
        match api_key::Entity::insert(new_key.into_active()).exec_without_returning(&txn).await {
            Err(e) if matches!(e.sql_err(), Some(SqlErr::UniqueConstraintViolation(_))) => {
                return Err(InsertError::PrefixTaken);
            }
            other => other.map_err(StoreError::from)?,
        };
        insert_audit_rows(&txn, &audits).await?;
        insert_events(&txn, vec![event]).await?;
        // Read before the commit: what is answered is what commits, with no
        // read after it that could fail and lose the new plaintext.
        let Some(new) = fetch(&txn, &new_id).await? else {
            return Err(StoreError::Corrupt {
                id: new_id,
                what: "successor key",
                detail: "not readable in the transaction that inserted it".into(),
            }
            .into());
        };
        self.notify_change(&txn, &old).await?;
        txn.commit().await.map_err(StoreError::from)?;
        Ok(Rotation::Applied { old, new: Box::new(new) })
    }

    /// Tells every replica that `key` changed, as part of the transaction:
    /// PostgreSQL delivers the notice on commit and never for a rollback.
    /// The payload is `<key id> <version> <sent at, µs since the epoch>`.
    pub(super) async fn notify_change(
        &self,
        txn: &DatabaseTransaction,
        key: &StoredKey,
    ) -> Result<(), StoreError> {
        if self.backend() != Backend::Postgres {
            return Ok(());
        }
        self.count(1);
        #[expect(clippy::disallowed_methods, reason = "the sending time of the propagation-lag metric")]
        let sent = chrono::Utc::now().timestamp_micros();
        let payload = format!("{} {} {sent}", key.id, key.version);
        txn.execute_raw(Statement::from_sql_and_values(
            self.db_backend(),
            "SELECT pg_notify($1, $2)",
            [Value::from(super::CHANGES_CHANNEL), Value::from(payload)],
        ))
        .await?;
        Ok(())
    }

    /// Writes the audit rows and the event (built from the key as changed)
    /// and commits if the conditional write applied; in every case reads
    /// the key back to say what it now is.
    async fn finish_change(
        &self,
        txn: DatabaseTransaction,
        merchant_id: &str,
        key_id: &str,
        applied: bool,
        mut audits: Vec<impl AuditRow>,
        event: impl FnOnce(&StoredKey) -> NewEvent + Send,
    ) -> Result<Change, StoreError> {
        // BEGIN and UPDATE (by the caller), SELECT, COMMIT.
        self.count(4);
        let row = fetch_scoped(&txn, merchant_id, key_id).await?;
        if applied {
            if let Some(key) = &row {
                for audit in &mut audits {
                    audit.name_key(&key.name);
                }
                self.notify_change(&txn, key).await?;
                self.count(1);
                insert_events(&txn, vec![event(key)]).await?;
            }
            self.count(1);
            insert_audit_rows(&txn, &audits).await?;
        }
        txn.commit().await?;
        Ok(match (row, applied) {
            (None, _) => Change::NotFound,
            (Some(key), true) => Change::Applied(key),
            (Some(key), false) => Change::Refused(key),
        })
    }
}

pub(super) async fn fetch<C: ConnectionTrait>(db: &C, key_id: &str) -> Result<Option<StoredKey>, StoreError> {
    api_key::Entity::find_by_id(key_id.to_owned()).one(db).await?.map(StoredKey::try_from).transpose()
}

/// A key by id, only if it belongs to `merchant_id`: every read that answers
/// an admin call goes through here, so one merchant never sees another's key.
async fn fetch_scoped<C: ConnectionTrait>(
    db: &C,
    merchant_id: &str,
    key_id: &str,
) -> Result<Option<StoredKey>, StoreError> {
    api_key::Entity::find()
        .filter(api_key::Column::Id.eq(key_id))
        .filter(api_key::Column::MerchantId.eq(merchant_id))
        .one(db)
        .await?
        .map(StoredKey::try_from)
        .transpose()
}
