//! `audit_outcomes`: reported statuses held for audit rows not written yet
//! (they are queued on another replica).

use sea_orm::entity::prelude::*;

#[sea_orm::model]
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "audit_outcomes")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub event_id: String,
    pub status: i32,
    pub received_at: DateTimeUtc,
}

impl ActiveModelBehavior for ActiveModel {}
