//! Lifecycle events: the outbox (`key_events`, written in the transaction
//! of the change it describes), each event's delivery to each sink
//! (`event_deliveries`), webhook endpoints, and the lease that lets one
//! replica at a time deliver (`event_leases`). New tables only, so the
//! previous release runs on this schema unchanged (and writes no events).

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table("key_events")
                    .col(big_pk_auto("seq"))
                    .col(string_uniq("id"))
                    .col(string("type"))
                    .col(string("merchant_id"))
                    .col(string("key_id"))
                    .col(timestamp_with_time_zone("time"))
                    // A scheduled event's occasion: unique, so that however
                    // many replicas scan, each occasion is written once.
                    .col(ColumnDef::new("occasion").string().null().unique_key())
                    .col(text("body"))
                    // Set by the relay when it queues the deliveries, in
                    // the order it does so: the gap-free order ListEvents
                    // pages in (`seq` values can commit out of order).
                    .col(ColumnDef::new("position").big_integer().null().unique_key())
                    .to_owned(),
            )
            .await?;
        for (name, columns) in [
            ("key_events_merchant", ["merchant_id", "position"]),
            ("key_events_fan_out", ["position", "seq"]),
        ] {
            let mut index = Index::create();
            index.name(name).table("key_events");
            for column in columns {
                index.col(column);
            }
            manager.create_index(index.to_owned()).await?;
        }
        manager
            .create_table(
                Table::create()
                    .table("event_deliveries")
                    .col(big_integer("event_seq"))
                    .col(string("sink"))
                    .col(string("key_id"))
                    .col(string("state"))
                    .col(integer("attempts").default(0))
                    .col(integer_null("last_status"))
                    .col(string_null("last_error"))
                    .col(timestamp_with_time_zone("created_at"))
                    .col(timestamp_with_time_zone("next_attempt_at"))
                    .col(timestamp_with_time_zone_null("last_attempt_at"))
                    .primary_key(Index::create().col("event_seq").col("sink"))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("event_deliveries_due")
                    .table("event_deliveries")
                    .col("sink")
                    .col("state")
                    .col("key_id")
                    .col("event_seq")
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table("webhook_endpoints")
                    .col(string("id").primary_key())
                    .col(text("url"))
                    .col(text("event_types"))
                    .col(string("merchant_id"))
                    .col(string("sealed_secret"))
                    .col(string("pepper"))
                    .col(string("created_by"))
                    .col(timestamp_with_time_zone("created_at"))
                    .to_owned(),
            )
            .await?;
        // The expiry scan reads keys by when they expire or stopped verifying.
        for (name, column) in [("api_keys_expires_at", "expires_at"), ("api_keys_revoked_at", "revoked_at")] {
            manager.create_index(Index::create().name(name).table("api_keys").col(column).to_owned()).await?;
        }
        manager
            .create_table(
                Table::create()
                    .table("event_leases")
                    .col(string("name").primary_key())
                    .col(string("holder"))
                    .col(timestamp_with_time_zone("until"))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for name in ["api_keys_expires_at", "api_keys_revoked_at"] {
            manager.drop_index(Index::drop().name(name).table("api_keys").to_owned()).await?;
        }
        for table in ["event_leases", "webhook_endpoints", "event_deliveries", "key_events"] {
            manager.drop_table(Table::drop().table(table).to_owned()).await?;
        }
        Ok(())
    }
}
