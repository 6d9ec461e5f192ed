//! Operator tokens: KeyAdmin credentials with a role and merchant limits.
//! A new table only, so the previous release runs on this schema unchanged.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table("operator_tokens")
                    .col(string("id").primary_key())
                    .col(string("name"))
                    .col(string("role"))
                    .col(text("merchant_ids"))
                    .col(string_uniq("prefix"))
                    .col(string("digest"))
                    .col(string("created_by"))
                    .col(timestamp_with_time_zone("created_at"))
                    .col(timestamp_with_time_zone_null("expires_at"))
                    .col(timestamp_with_time_zone_null("revoked_at"))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.drop_table(Table::drop().table("operator_tokens").to_owned()).await
    }
}
