//! `disabled_at` and `disabled_reason` (DisableKey: refused until enabled
//! again) and `metadata` (a JSON object of labels, `{}` for none) on
//! `api_keys`. New nullable or defaulted columns only: the previous
//! release ignores them and keeps running beside this one.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

/// SQLite adds one column per ALTER TABLE.
fn columns() -> [ColumnDef; 3] {
    [
        timestamp_with_time_zone_null("disabled_at"),
        text_null("disabled_reason"),
        ColumnDef::new("metadata").text().not_null().default("{}").to_owned(),
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
        for name in ["metadata", "disabled_reason", "disabled_at"] {
            manager
                .alter_table(Table::alter().table("api_keys").drop_column(Alias::new(name)).to_owned())
                .await?;
        }
        Ok(())
    }
}
