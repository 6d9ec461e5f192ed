//! The initial schema: keys, audit events, and the indexes their queries use.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table("api_keys")
                    .col(string("id").primary_key())
                    .col(string("merchant_id"))
                    .col(string("name"))
                    .col(string_uniq("prefix"))
                    .col(string("key_hash"))
                    .col(text("scopes"))
                    .col(text("allowed_cidrs"))
                    .col(timestamp_with_time_zone_null("expires_at"))
                    .col(timestamp_with_time_zone("created_at"))
                    .col(string("created_by"))
                    .col(timestamp_with_time_zone("updated_at"))
                    .col(timestamp_with_time_zone_null("revoked_at"))
                    .col(text_null("revoke_reason"))
                    .col(string_null("replaced_by_key_id"))
                    .col(big_integer("request_count").default(0))
                    .col(big_integer("denied_count").default(0))
                    .col(timestamp_with_time_zone_null("last_used_at"))
                    .col(big_integer("version").default(1))
                    .to_owned(),
            )
            .await?;
        // ListKeys: one merchant's keys, newest first, (created_at, id) cursor.
        manager
            .create_index(
                Index::create()
                    .name("idx_api_keys_merchant_created")
                    .table("api_keys")
                    .col("merchant_id")
                    .col("created_at")
                    .col("id")
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table("audit_events")
                    .col(string("id").primary_key())
                    .col(timestamp_with_time_zone("timestamp"))
                    .col(string("kind"))
                    .col(string_null("merchant_id"))
                    .col(string_null("api_key_id"))
                    .col(string_null("api_key_name"))
                    .col(string_null("key_prefix"))
                    .col(text_null("endpoint"))
                    .col(string_null("method"))
                    .col(string_null("ip"))
                    .col(integer_null("status"))
                    .col(string_null("decision"))
                    .col(string_null("deny_reason"))
                    .col(string_null("actor"))
                    .col(string_null("trace_id"))
                    .col(text_null("detail"))
                    .to_owned(),
            )
            .await?;
        // ListAuditEvents by merchant, and by key, newest first.
        for (name, col) in
            [("idx_audit_events_merchant_ts", "merchant_id"), ("idx_audit_events_key_ts", "api_key_id")]
        {
            manager
                .create_index(
                    Index::create()
                        .name(name)
                        .table("audit_events")
                        .col(col)
                        .col("timestamp")
                        .col("id")
                        .to_owned(),
                )
                .await?;
        }
        // Retention deletes the oldest rows first.
        manager
            .create_index(
                Index::create().name("idx_audit_events_ts").table("audit_events").col("timestamp").to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.drop_table(Table::drop().table("audit_events").to_owned()).await?;
        manager.drop_table(Table::drop().table("api_keys").to_owned()).await
    }
}
