//! `operator_tokens`: KeyAdmin credentials with a role. Only the lookup
//! prefix (unique) and a keyed digest of the token are stored.

use sea_orm::entity::prelude::*;

#[sea_orm::model]
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "operator_tokens")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub name: String,
    /// ADMIN, KEY_MANAGER, AUDITOR or LEAK_REPORTER.
    pub role: String,
    /// Space-separated; empty means every merchant.
    pub merchant_ids: String,
    #[sea_orm(unique)]
    pub prefix: String,
    /// Hex HMAC-SHA256 of the token under a pepper subkey.
    pub digest: String,
    /// The pepper generation the digest was made under.
    pub pepper: String,
    pub created_by: String,
    pub created_at: DateTimeUtc,
    pub expires_at: Option<DateTimeUtc>,
    pub revoked_at: Option<DateTimeUtc>,
}

impl ActiveModelBehavior for ActiveModel {}
