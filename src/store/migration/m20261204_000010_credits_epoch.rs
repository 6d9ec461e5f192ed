//! `credits_epoch`: bumped only when a balance is set outright (an update
//! of the key's credits, a refill), never by spending. Replicas that share
//! a balance through Redis (`credits::leased`) seed Redis's copy again when
//! the epoch moves, and only then. The previous release ignores it.

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
                    .add_column(ColumnDef::new("credits_epoch").big_integer().not_null().default(0))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(Table::alter().table("api_keys").drop_column(Alias::new("credits_epoch")).to_owned())
            .await
    }
}
