//! `key_events`: the outbox. One row per lifecycle event, written in the
//! transaction of the change it describes (or once per occasion by the
//! expiry scan); `body` is the CloudEvent exactly as every sink receives it.

use sea_orm::entity::prelude::*;

#[sea_orm::model]
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "key_events")]
pub struct Model {
    /// Commit order per key (a change holds the key's row lock while it
    /// writes its event).
    #[sea_orm(primary_key)]
    pub seq: i64,
    #[sea_orm(unique)]
    pub id: String,
    #[sea_orm(column_name = "type")]
    pub kind: String,
    pub merchant_id: String,
    pub key_id: String,
    pub time: DateTimeUtc,
    /// Set for scheduled events only (`key.expiring` and the like).
    #[sea_orm(unique)]
    pub occasion: Option<String>,
    pub body: String,
    /// Set when the relay queued its deliveries; the order pull readers see.
    #[sea_orm(unique)]
    pub position: Option<i64>,
}

impl ActiveModelBehavior for ActiveModel {}
