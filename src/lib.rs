//! keywarden: verification of merchants' scoped API keys over gRPC.
//!
//! # Layout
//!
//! Imports point down this list; nothing imports a module above it. CI
//! fails on a module cycle and on an import `.ci/module_edges.txt` does
//! not allow; that file lists what each module may use.
//!
//! - [`startup`]: assembly. Builds every part from [`config::Settings`],
//!   runs the servers and background tasks, shuts down in order; its
//!   [`startup::tls`] accepts connections (TLS/mTLS, certificate and CRL
//!   reload, per-address caps, handshake and idle timeouts); `startup::serve`
//!   runs the listeners, the tower stack and the drain; [`startup::tasks`]
//!   registers the background tasks each part offers and ends them at
//!   shutdown; [`startup::secrets`] resolves the peppers and admin tokens
//!   (generating them on an embedded first run, the one place a secret is
//!   written to disk); [`startup::supervise`] restarts them when they fail,
//!   `startup::health` reports readiness from the database monitor and the
//!   tasks, and [`startup::exporter`] serves `/metrics`. Domain jobs live
//!   with their owners ([`audit::retention`], [`credits::refill`]).
//! - [`cli`]: the command-line client (KeyAdmin and KeyVerify over gRPC).
//! - [`api`]: the gRPC layer. Decodes messages, calls a use case, and maps
//!   every [`service::ServiceError`] to a `tonic::Status` in one place
//!   (`api::status`); the peer of a connection ([`api::peer`]), who may
//!   verify and who may report outcomes ([`api::callers`]), each call's
//!   time bound ([`api::lifetime`]), admin authentication and trace
//!   context are layers. Beside it, one HTTP route: GitHub's leak reports
//!   ([`api::leak_reports`]).
//! - [`service`]: the use cases, [`service::admin::KeyManager`],
//!   [`service::operators::OperatorTokens`] and [`service::verify::Verifier`]
//!   (a pipeline: identify, decide, admit, record, one file each), with
//!   RecordOutcomes in [`service::outcomes`]; the after-commit seam of key
//!   changes ([`service::events`]); who may do what ([`service::access`]);
//!   request validation and pagination; the scrypt pool; pepper generations
//!   ([`service::peppers`]) and the background rehash of keys checked under
//!   an old one ([`service::rehash`]); leak reports, proven by scrypt and
//!   revoked with their rotation partners ([`service::leaks`]).
//! - [`cache`], [`usage`], [`audit`], [`throttle`], [`limiter`],
//!   [`credits`], [`fleet`]: runtime state of the Verify path. The
//!   verification cache and the change feed that keeps it current; batched
//!   usage counters, spilled to local disk while the database is away
//!   ([`usage::spill`]); the audit queue, its writer and its local spool;
//!   the counters of wrong secrets that throttle guessing; per-key rate
//!   limits, per replica or leased from Redis ([`limiter`], which uses
//!   [`fleet`]); credits, one call that pays from the fleet's shared
//!   balance in Redis mode or from this replica's view (kept with the usage
//!   counts and flushed in the same batches), and the refill job
//!   ([`credits`]). [`fleet`]: the Redis connection replicas share and the
//!   warm-start map, optional. The audit row itself, typed, is
//!   [`audit::AuditRecord`]; `api` reads it to answer ListAuditEvents.
//! - [`events`]: lifecycle events. The CloudEvent each key change writes to
//!   the outbox in its own transaction ([`events::Outbox`]), the relay that
//!   one replica at a time runs under a lease to deliver them to NATS
//!   JetStream and signed webhooks ([`events::relay`]), and the expiry scan
//!   that writes reminders, expiries and grace ends once per occasion
//!   ([`events::expiry`]).
//! - [`store`]: persistence on sea-orm (SQLite or PostgreSQL): keys, usage,
//!   operator tokens, audit rows (written and read through
//!   [`store::audit::AuditRow`], the column mapping the audit record
//!   implements, so the store knows no audit type) and their bulk writers,
//!   the event outbox, its deliveries and webhook endpoints, and migrations.
//! - [`routes`]: the gateway's route table (which scope an HTTP method and
//!   path need), parsed and matched without I/O; it imports only [`keys`].
//! - [`keys`]: the key domain, free of I/O: format and checksum, hashing,
//!   scopes, CIDR allow-lists, the decision, key events and their sinks,
//!   mTLS client identities, the one excerpting function errors quote input
//!   through, and operator tokens, their records and roles. Deny reasons and their HTTP
//!   answers come from the `keywarden-http` workspace crate, which
//!   keywarden-client shares.
//!
//! Leaves that any layer may use: [`config`] (the settings contract and
//! each concern's typed settings, one file per concern; it imports only
//! [`keys`] and never writes), [`telemetry`] (logs, spans, the caller's trace id),
//! [`metrics`] (the counters code paths bump), [`clock`], and [`task`]
//! (a background task as its owner offers it to startup's registry).
pub mod api;
pub mod audit;
pub mod cache;
pub mod cli;
pub mod clock;
pub mod config;
pub mod credits;
pub mod events;
pub mod fleet;
pub mod keys;
pub mod limiter;
pub mod metrics;
pub mod routes;
pub mod service;
pub mod startup;
pub mod store;
pub mod task;
pub mod telemetry;
pub mod throttle;
pub mod usage;
