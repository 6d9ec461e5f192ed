//! `usage_flushes`: ids of usage flushes already added to the key rows, so
//! that a flush retried after a lost commit acknowledgement adds nothing.

use sea_orm::entity::prelude::*;

#[sea_orm::model]
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "usage_flushes")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub applied_at: DateTimeUtc,
}

impl ActiveModelBehavior for ActiveModel {}
