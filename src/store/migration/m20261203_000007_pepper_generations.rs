//! Which pepper generation each key hash and operator digest was made
//! under, so that `peppers status` can count what still needs an old pepper
//! without reading every hash. Every row before this migration is
//! generation `1` (the only one a previous release writes), hence the
//! default; the previous release writes and reads around the column.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

const TABLES: [&str; 2] = ["api_keys", "operator_tokens"];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // One statement per table: SQLite alters one column at a time.
        for table in TABLES {
            manager
                .alter_table(
                    Table::alter()
                        .table(table)
                        .add_column(ColumnDef::new("pepper").string().not_null().default("1"))
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in TABLES {
            manager.alter_table(Table::alter().table(table).drop_column("pepper").to_owned()).await?;
        }
        Ok(())
    }
}
