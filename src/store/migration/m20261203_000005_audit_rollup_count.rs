//! Rollup rows: calls that belong to no merchant (malformed keys, unknown
//! prefixes, throttled checks) are stored as one row per minute and
//! distinct request, with how many calls it stands for. One nullable
//! column; the previous release writes and reads around it.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table("audit_events")
                    .add_column(ColumnDef::new("count").integer().null())
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.alter_table(Table::alter().table("audit_events").drop_column("count").to_owned()).await
    }
}
