//! Per-key rate limits, in the stored form `name=limit/window_ms`,
//! space-separated (`keys::limits`). Empty means unlimited, which is what
//! every key before this migration is; the previous release reads and
//! writes around the column.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table("api_keys")
                    .add_column(ColumnDef::new("rate_limits").string().not_null().default(""))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.alter_table(Table::alter().table("api_keys").drop_column("rate_limits").to_owned()).await
    }
}
