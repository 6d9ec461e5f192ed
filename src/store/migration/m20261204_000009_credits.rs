//! Per-key credits (`keys::credits`): the balance (NULL is unlimited, which
//! every key before this migration is), its refill, the boundary it was
//! last refilled at, and `credits_seq`, bumped by every write of the
//! balance (a usage flush, an update, a refill) so that a replica can tell
//! which of two readings is the later one. The previous release reads and
//! writes around the columns.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

/// One column per statement: SQLite adds one column per ALTER TABLE.
fn columns() -> Vec<ColumnDef> {
    vec![
        ColumnDef::new("credits_remaining").big_integer().null().to_owned(),
        ColumnDef::new("credits_refill_amount").big_integer().null().to_owned(),
        ColumnDef::new("credits_refill_interval").string().null().to_owned(),
        ColumnDef::new("credits_refilled_at").timestamp_with_time_zone().null().to_owned(),
        ColumnDef::new("credits_seq").big_integer().not_null().default(0).to_owned(),
    ]
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for mut column in columns() {
            manager.alter_table(Table::alter().table("api_keys").add_column(&mut column).to_owned()).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for column in columns().iter().rev() {
            let name = column.get_column_name();
            manager
                .alter_table(Table::alter().table("api_keys").drop_column(Alias::new(name)).to_owned())
                .await?;
        }
        Ok(())
    }
}
