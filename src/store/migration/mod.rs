//! Schema migrations, applied in order by `keywarden migrate` (and at start
//! unless disabled).

use sea_orm_migration::prelude::*;

mod m20261127_000001_create_tables;
mod m20261127_000002_audit_outcomes;
mod m20261128_000003_usage_flushes;
mod m20261203_000004_operator_tokens;
mod m20261203_000005_audit_rollup_count;
mod m20261203_000006_audit_dead_letters;
mod m20261203_000007_pepper_generations;
mod m20261204_000008_rate_limits;
mod m20261204_000009_credits;
mod m20261204_000010_credits_epoch;
mod m20261207_000011_events;
mod m20261208_000012_key_states;

pub struct Migrator;

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261127_000001_create_tables::Migration),
            Box::new(m20261127_000002_audit_outcomes::Migration),
            Box::new(m20261128_000003_usage_flushes::Migration),
            Box::new(m20261203_000004_operator_tokens::Migration),
            Box::new(m20261203_000005_audit_rollup_count::Migration),
            Box::new(m20261203_000006_audit_dead_letters::Migration),
            Box::new(m20261203_000007_pepper_generations::Migration),
            Box::new(m20261204_000008_rate_limits::Migration),
            Box::new(m20261204_000009_credits::Migration),
            Box::new(m20261204_000010_credits_epoch::Migration),
            Box::new(m20261207_000011_events::Migration),
            Box::new(m20261208_000012_key_states::Migration),
        ]
    }
}
