//! Outcomes reported to one replica for audit rows still queued on another
//! (PostgreSQL fleets): held here until the row lands.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table("audit_outcomes")
                    .col(string("event_id").primary_key())
                    .col(integer("status"))
                    .col(timestamp_with_time_zone("received_at"))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.drop_table(Table::drop().table("audit_outcomes").to_owned()).await
    }
}
