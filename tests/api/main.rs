//! The integration tests: one binary, each module a part of the public
//! surface, every test against a real server ([`helpers::spawn_app`]) on
//! SQLite and again on PostgreSQL.

#![allow(clippy::unwrap_used, clippy::expect_used)]
// Tests are the world outside the service: they read the real clock.
#![allow(clippy::disallowed_methods)]

#[macro_use]
mod helpers;

mod abuse;
mod admin_api;
mod connections;
mod credits;
mod events;
mod fleet;
mod fleet_credits;
mod fleet_limits;
mod gateway;
mod harness;
mod hostile;
mod hot_path;
mod key_states;
mod leaks;
mod lifecycle;
mod limits;
mod middleware;
mod operations;
mod operators;
mod peppers;
mod pki;
mod schema;
mod spans;
mod spool;
mod trust;
mod upgrades;
mod verify_api;
mod warm_start;
