//! `audit_events`: one row per verification and per administrative action.

use sea_orm::entity::prelude::*;

#[sea_orm::model]
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "audit_events")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub timestamp: DateTimeUtc,
    pub kind: String,
    pub merchant_id: Option<String>,
    pub api_key_id: Option<String>,
    pub api_key_name: Option<String>,
    pub key_prefix: Option<String>,
    pub endpoint: Option<String>,
    pub method: Option<String>,
    pub ip: Option<String>,
    pub status: Option<i32>,
    pub decision: Option<String>,
    pub deny_reason: Option<String>,
    pub actor: Option<String>,
    pub trace_id: Option<String>,
    pub detail: Option<String>,
    /// Calls a VERIFY_ROLLUP row stands for; NULL on every other row.
    pub count: Option<i32>,
}

impl ActiveModelBehavior for ActiveModel {}
