//! sea-orm entities, one per table. Lists are stored as space-separated text
//! so the schema is the same on SQLite and PostgreSQL.

pub mod api_key;
pub mod audit_event;
pub mod audit_outcome;
pub mod event_delivery;
pub mod event_lease;
pub mod key_event;
pub mod operator_token;
pub mod usage_flush;
pub mod webhook_endpoint;
