//! `api_keys`: one row per issued key. The plaintext is never stored, only
//! its lookup prefix (unique) and its hash.

use sea_orm::entity::prelude::*;

#[sea_orm::model]
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "api_keys")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub merchant_id: String,
    pub name: String,
    #[sea_orm(unique)]
    pub prefix: String,
    pub key_hash: String,
    /// The pepper generation `key_hash` names, written with it.
    pub pepper: String,
    /// Space-separated scope names, in catalogue order.
    pub scopes: String,
    /// Space-separated canonical IPs and CIDR ranges.
    pub allowed_cidrs: String,
    /// Space-separated `name=limit/window_ms` (`keys::limits`).
    pub rate_limits: String,
    pub expires_at: Option<DateTimeUtc>,
    pub created_at: DateTimeUtc,
    pub created_by: String,
    pub updated_at: DateTimeUtc,
    pub revoked_at: Option<DateTimeUtc>,
    pub revoke_reason: Option<String>,
    pub replaced_by_key_id: Option<String>,
    pub request_count: i64,
    pub denied_count: i64,
    pub last_used_at: Option<DateTimeUtc>,
    /// Bumped by every change, so replicas can tell stale state from fresh.
    pub version: i64,
    /// The balance (`keys::credits`); `None` is unlimited.
    pub credits_remaining: Option<i64>,
    pub credits_refill_amount: Option<i64>,
    /// `daily` or `monthly`, with `credits_refill_amount`.
    pub credits_refill_interval: Option<String>,
    /// The boundary the balance was last refilled at.
    pub credits_refilled_at: Option<DateTimeUtc>,
    /// Bumped by every write of the balance, usage flushes included.
    pub credits_seq: i64,
    /// Bumped when the balance is set outright (an update, a refill).
    pub credits_epoch: i64,
    /// Set while the key is disabled; cleared by EnableKey.
    pub disabled_at: Option<DateTimeUtc>,
    pub disabled_reason: Option<String>,
    /// A JSON object of labels (`keys::metadata`); `{}` for none.
    pub metadata: String,
}

impl ActiveModelBehavior for ActiveModel {}
