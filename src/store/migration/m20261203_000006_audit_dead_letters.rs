//! Audit rows the database refused for what they hold (a constraint, a
//! value it cannot store), kept with the reason instead of blocking every
//! row behind them. Additive; the previous release ignores the table.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table("audit_dead_letters")
                    .col(string("id").primary_key())
                    .col(timestamp_with_time_zone("failed_at"))
                    .col(text("reason"))
                    .col(text("row"))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.drop_table(Table::drop().table("audit_dead_letters").to_owned()).await
    }
}
