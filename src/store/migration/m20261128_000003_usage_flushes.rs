//! Ids of usage flushes already added to the key rows, so a flush retried
//! after a lost commit acknowledgement is recognised and not counted twice.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table("usage_flushes")
                    .col(string("id").primary_key())
                    .col(timestamp_with_time_zone("applied_at"))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("usage_flushes_applied_at")
                    .table("usage_flushes")
                    .col("applied_at")
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.drop_table(Table::drop().table("usage_flushes").to_owned()).await
    }
}
