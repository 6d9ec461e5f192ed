//! `webhook_endpoints`: where lifecycle events are POSTed. The signing
//! secret is stored sealed under a pepper subkey, never in the clear.

use sea_orm::entity::prelude::*;

#[sea_orm::model]
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "webhook_endpoints")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub url: String,
    /// Space-separated; empty means every type.
    pub event_types: String,
    /// Empty means every merchant.
    pub merchant_id: String,
    pub sealed_secret: String,
    /// The pepper generation the secret is sealed under.
    pub pepper: String,
    pub created_by: String,
    pub created_at: DateTimeUtc,
}

impl ActiveModelBehavior for ActiveModel {}
