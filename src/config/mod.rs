//! Settings: defaults, then an optional TOML file (`--config`), then
//! `KEYWARDEN_*` environment variables, each overriding the one before.
//!
//! [`Settings`] is the public contract: every TOML key and `KEYWARDEN_*`
//! variable, one flat struct, deserialized in one pass so that a load error
//! names the exact setting (docs/decisions.md says why it is not nested).
//! Each concern reads its own typed settings from it, in its own file:
//! [`transport`] (TLS, mTLS callers, connection and call bounds), [`store`]
//! (database, connections, health), [`audit`] (queue, spool, rollups,
//! retention, flushes), [`cache`] (verification cache, throttling,
//! scrypt), [`fleet`] (Redis, rate-limit mode), [`keys`] (key prefix,
//! scopes, routes); [`describe`] words load errors.
//!
//! Secrets (pepper, admin tokens) are part of the settings but never
//! logged. Config reads them and never writes: generating them on an
//! embedded first run is `startup::secrets`.

pub mod audit;
pub mod cache;
pub mod describe;
pub mod events;
pub mod fleet;
pub mod keys;
pub mod leaks;
pub mod store;
pub mod transport;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use figment::{
    Figment,
    providers::{Env, Format, Toml},
};
use secrecy::SecretString;
use serde::Deserialize;
use thiserror::Error;

pub use audit::{AuditSettings, Overflow};
pub use cache::{CacheSettings, ThrottleSettings};
pub use describe::describe_load_error;
pub use events::{EventSettings, NatsSettings};
pub use fleet::{FleetSettings, MIN_FLEET_SECRET_LEN, OnRedisFailure, RateLimitMode};
pub use transport::{IdentityGrant, TlsSettings};

use crate::keys::{
    hash::PepperError,
    scope::{CatalogueError, PresetDef, ScopeDef},
};

/// Log line format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// gRPC listen address: KeyVerify, health, reflection (and KeyAdmin
    /// unless `admin_listen_addr` is set).
    pub listen_addr: SocketAddr,
    /// When set, KeyAdmin is served only here.
    pub admin_listen_addr: Option<SocketAddr>,
    /// Optional plaintext listener serving only grpc.health.v1.Health.
    pub health_listen_addr: Option<SocketAddr>,
    /// PEM certificate chain and key; when set, every gRPC listener but the
    /// health one serves TLS 1.2/1.3.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// PEM CA bundle; when set, clients need a certificate chaining to it.
    pub tls_client_ca_file: Option<PathBuf>,
    /// How often the TLS files are checked for changes.
    pub tls_reload_interval_ms: u64,
    /// Identities allowed to call KeyVerify under mTLS; empty: any
    /// certificate from the client CA. A comma-separated string or a list.
    #[serde(deserialize_with = "comma_list")]
    pub verify_callers: Vec<String>,
    /// Identities allowed to report outcomes (RecordOutcomes, Envoy's
    /// access-log stream) under mTLS; unset: `verify_callers`.
    #[serde(deserialize_with = "optional_comma_list")]
    pub outcome_reporters: Option<Vec<String>>,
    /// PEM CRLs for client certificates, re-read with the certificates.
    pub tls_client_crl_file: Option<PathBuf>,
    /// Serve plaintext gRPC on a non-loopback address (logs a warning).
    pub allow_plaintext: bool,
    /// Under mTLS: client identities that act as operators.
    pub operator_identities: Vec<IdentityGrant>,
    /// Prometheus `/metrics` address.
    pub metrics_addr: SocketAddr,
    pub metrics_enabled: bool,
    /// Where the embedded database and generated secrets live.
    pub data_dir: PathBuf,
    /// `sqlite://…` or `postgres://…`; default: SQLite in `data_dir`.
    pub database_url: Option<String>,
    /// Base64, at least 32 bytes: pepper generation `1`, whose hashes are
    /// `v1$salt$hash`.
    pub pepper: Option<SecretString>,
    /// Later pepper generations by id (1-32 of `A-Z a-z 0-9 _ -`), base64,
    /// at least 32 bytes each; hashes under them are `v2$<id>$salt$hash`.
    pub peppers: BTreeMap<String, SecretString>,
    /// The generation new hashes are made under. Required when more than
    /// one pepper is configured; otherwise the only one.
    #[serde(deserialize_with = "id_text")]
    pub pepper_current: Option<String>,
    /// A single admin token, named `admin`.
    pub admin_token: Option<SecretString>,
    /// Admin tokens by name; the name is the audit actor.
    pub admin_tokens: BTreeMap<String, SecretString>,
    pub key_prefix: String,
    /// Apply migrations at start; when off, refuse to start on an old schema.
    pub migrate_on_start: bool,
    pub log_format: LogFormat,
    /// How long in-flight calls may take to finish after SIGTERM.
    pub shutdown_grace_ms: u64,
    /// How long the final audit/usage flush may retry at shutdown.
    pub flush_timeout_ms: u64,
    /// The first wait before a failed background task is restarted; it
    /// doubles on each failure, up to 5 s.
    pub task_restart_backoff_ms: u64,
    /// Failures of one background task within a minute after which the
    /// process gives up: it drains and exits non-zero.
    pub task_restart_limit: usize,
    pub usage_flush_interval_ms: u64,
    pub audit_queue_capacity: usize,
    /// Rows per insert. Large batches matter most for SQLite: each batch
    /// dirties a page of the per-key index for nearly every row (rows of many
    /// keys interleave), so fewer, larger commits write far fewer pages.
    pub audit_batch_size: usize,
    pub audit_linger_ms: u64,
    pub audit_overflow: Overflow,
    /// How long a Verify waits for room in a full audit queue.
    pub audit_queue_wait_ms: u64,
    /// How often rollup rows (calls of no merchant) are written with their
    /// counts so far.
    pub audit_rollup_interval_ms: u64,
    /// Largest Verify request message, in bytes.
    pub max_verify_message_bytes: usize,
    /// Largest RecordOutcomes request message, in bytes.
    pub max_record_outcomes_message_bytes: usize,
    /// Largest request message of any other RPC (KeyAdmin, health), in bytes.
    pub max_message_bytes: usize,
    /// HTTP/2 streams (concurrent calls) one connection may have open.
    pub max_concurrent_streams: u32,
    /// Connections one listener holds open at once, TLS handshakes
    /// included; beyond that new connections wait in the kernel's backlog.
    pub max_connections: usize,
    /// Connections one client address may hold open at once on a
    /// listener; 0: no cap.
    pub max_connections_per_ip: usize,
    /// How long a new connection may take to finish its TLS handshake and
    /// send the HTTP/2 preface.
    pub handshake_timeout_ms: u64,
    /// How long a connection may stay open with no call in flight; 0: no
    /// limit.
    pub idle_connection_timeout_ms: u64,
    /// How long one call may run before it is answered CANCELLED; Envoy's
    /// access-log stream is exempt (see `access_log_stream_max_age_ms`).
    pub request_timeout_ms: u64,
    /// When an access-log stream is ended (cleanly, after writing what it
    /// holds); Envoy opens a new one.
    pub access_log_stream_max_age_ms: u64,
    /// HTTP/2 PING interval on idle connections; 0 turns keepalive off.
    pub http2_keepalive_interval_ms: u64,
    /// How long a PING may go unanswered before the connection is closed.
    pub http2_keepalive_timeout_ms: u64,
    /// Wrong secrets per key prefix per window before throttling; 0: off.
    pub throttle_failures_per_prefix: u32,
    /// Wrong secrets per client IP (the Verify `ip`) per window; 0: off.
    pub throttle_failures_per_ip: u32,
    pub throttle_window_ms: u64,
    /// scrypt threads; 0 means one per CPU the process may use (its cgroup
    /// CPU quota, or the machine's CPUs without one).
    pub hash_workers: usize,
    /// scrypt jobs that may wait; beyond that Verify answers RESOURCE_EXHAUSTED.
    pub hash_queue: usize,
    pub db_max_connections: u32,
    /// How long a call waits for a database connection before failing.
    pub db_acquire_timeout_ms: u64,
    /// Database connections Verify traffic can never take: KeyAdmin, the
    /// health check and the audit, rollup and usage writers share them.
    pub db_reserved_connections: u32,
    /// How long cached key state may be served once change notices stop and
    /// the database is unreachable; after that Verify fails closed.
    pub staleness_bound_ms: u64,
    /// How often the database is pinged for health (and its clock read,
    /// on which revocation and expiry are decided).
    pub health_check_interval_ms: u64,
    /// Where audit rows wait on local disk while the database is slow or
    /// unreachable; default `<data_dir>/spool`.
    pub audit_spool_dir: Option<PathBuf>,
    /// Most bytes the spool may hold; 0 turns it off (a failing database
    /// then fills the queue, and the overflow mode applies).
    pub audit_spool_max_bytes: u64,
    /// How long an audit write may take before its batch is spooled.
    pub audit_spill_after_ms: u64,
    /// How often each replica NOTIFYs its own channel to prove its change
    /// listener alive (PostgreSQL); two intervals without any notice and
    /// the listener is declared dead.
    pub feed_heartbeat_interval_ms: u64,
    /// Gateway mode: the route table (TOML) that says which scope each
    /// HTTP method and path need. Without it, Check denies every request.
    pub routes_file: Option<PathBuf>,
    /// How often the route file is read again for changes.
    pub routes_reload_interval_ms: u64,
    /// Proxies in front of Envoy whose `x-forwarded-for` entries are
    /// trusted: 0 uses the connection's source address.
    pub trusted_proxy_hops: usize,
    /// The fleet tier: `redis://` or `rediss://` (TLS). Unset keeps all
    /// state per replica. It may carry a password, so it is a secret.
    pub redis_url: Option<SecretString>,
    /// Overrides any password in `redis_url`.
    pub redis_password: Option<SecretString>,
    /// `redis_url` names a seed node of a Redis Cluster.
    pub redis_cluster: bool,
    /// PEM CA bundle that a `rediss://` server's certificate must chain
    /// to, instead of the system's roots (a private CA).
    pub redis_ca_file: Option<PathBuf>,
    /// Bound on each Redis command, connecting included.
    pub redis_timeout_ms: u64,
    /// At least 32 bytes; keys the digests replicas share through Redis.
    /// Required with `redis_url`, and held like the pepper.
    pub fleet_secret: Option<SecretString>,
    /// How long a warm-start entry lives after its last use (at least a
    /// day).
    pub warm_start_ttl_secs: u64,
    /// `local` or `redis`; unset means `redis` when `redis_url` is set.
    pub rate_limit_mode: Option<RateLimitMode>,
    pub rate_limit_on_redis_failure: OnRedisFailure,
    /// How far this replica's own clock is off, for tests of clock skew.
    /// Never read from the environment or a file.
    #[serde(skip)]
    pub clock_skew_ms: i64,
    /// How far the credits refill job's calendar is moved from the
    /// database's clock, for tests of the UTC boundary. Never read from the
    /// environment or a file.
    #[serde(skip)]
    pub refill_clock_offset_ms: i64,
    /// Audit rows older than this many days are deleted; 0 keeps them forever.
    pub audit_retention_days: u32,
    pub audit_retention_interval_ms: u64,
    /// Cache verified keys so warm Verify skips scrypt and the database.
    pub cache_enabled: bool,
    pub cache_max_keys: u64,
    /// Backstop re-read of a cached key's state even without a change notice.
    pub cache_state_ttl_ms: u64,
    pub negative_cache_max: u64,
    pub negative_cache_ttl_ms: u64,
    /// Scope catalogue; default: the platform's five scopes.
    pub scopes: Option<Vec<ScopeDef>>,
    /// Integration presets; default: the documentation's table.
    pub presets: Option<Vec<PresetDef>>,
    /// Lifecycle events' CloudEvents `source`.
    pub events_source: String,
    /// NATS JetStream for lifecycle events (`nats://host:4222`, or
    /// `tls://`); unset: no NATS delivery.
    pub events_nats_url: Option<String>,
    /// The JetStream stream, created if missing.
    pub events_nats_stream: String,
    pub events_nats_creds_file: Option<PathBuf>,
    pub events_nats_token: Option<SecretString>,
    pub events_nats_user: Option<String>,
    pub events_nats_password: Option<SecretString>,
    pub events_nats_tls_ca_file: Option<PathBuf>,
    pub events_nats_tls_cert_file: Option<PathBuf>,
    pub events_nats_tls_key_file: Option<PathBuf>,
    /// Webhook URLs may be `http://`.
    pub webhook_allow_http: bool,
    /// How long a webhook delivery is retried (`24h`).
    pub webhook_max_age: String,
    pub webhook_timeout_ms: u64,
    /// How often the delivering replica looks for work.
    pub events_poll_interval_ms: u64,
    /// The delivering replica's lease: how soon another takes over.
    pub events_lease_ms: u64,
    /// `key.expiring` lead times (`14d`, `3d`). A comma-separated string
    /// or a list.
    #[serde(deserialize_with = "comma_list")]
    pub expiry_reminder_leads: Vec<String>,
    pub expiry_scan_interval_ms: u64,
    /// Delivered lifecycle events older than this many days are deleted;
    /// 0 keeps them forever.
    pub events_retention_days: u32,
    /// GitHub's secret-scanning reports (`POST /v1/leaks/github`), on the
    /// gRPC listeners' TLS; unset: no leak-report listener.
    pub leak_report_listen_addr: Option<SocketAddr>,
    /// GitHub's public keys, in the shape of its public-keys endpoint;
    /// re-read when it changes.
    pub leak_report_keys_file: Option<PathBuf>,
    /// GitHub's public-keys endpoint, fetched and cached for an hour.
    pub leak_report_keys_url: Option<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            listen_addr: SocketAddr::from(([127, 0, 0, 1], 50051)),
            admin_listen_addr: None,
            health_listen_addr: None,
            tls_cert_file: None,
            tls_key_file: None,
            tls_client_ca_file: None,
            tls_reload_interval_ms: 5_000,
            verify_callers: Vec::new(),
            outcome_reporters: None,
            tls_client_crl_file: None,
            allow_plaintext: false,
            operator_identities: Vec::new(),
            metrics_addr: SocketAddr::from(([127, 0, 0, 1], 9464)),
            metrics_enabled: true,
            data_dir: PathBuf::from("keywarden-data"),
            database_url: None,
            pepper: None,
            peppers: BTreeMap::new(),
            pepper_current: None,
            admin_token: None,
            admin_tokens: BTreeMap::new(),
            key_prefix: "sntr_".into(),
            migrate_on_start: true,
            log_format: LogFormat::Text,
            shutdown_grace_ms: 10_000,
            task_restart_backoff_ms: 100,
            task_restart_limit: 5,
            flush_timeout_ms: 30_000,
            usage_flush_interval_ms: 1_000,
            audit_queue_capacity: 100_000,
            audit_batch_size: 16_000,
            audit_linger_ms: 50,
            audit_overflow: Overflow::Block,
            audit_queue_wait_ms: 100,
            audit_rollup_interval_ms: 5_000,
            max_verify_message_bytes: 16 << 10,
            max_record_outcomes_message_bytes: 256 << 10,
            max_message_bytes: 1 << 20,
            max_concurrent_streams: 200,
            max_connections: 4096,
            max_connections_per_ip: 512,
            handshake_timeout_ms: 10_000,
            idle_connection_timeout_ms: 300_000,
            request_timeout_ms: 30_000,
            access_log_stream_max_age_ms: 600_000,
            http2_keepalive_interval_ms: 30_000,
            http2_keepalive_timeout_ms: 10_000,
            throttle_failures_per_prefix: 10,
            throttle_failures_per_ip: 100,
            throttle_window_ms: 60_000,
            hash_workers: 0,
            hash_queue: 32,
            db_max_connections: 10,
            db_acquire_timeout_ms: 2_000,
            db_reserved_connections: 3,
            staleness_bound_ms: 30_000,
            health_check_interval_ms: 1_000,
            feed_heartbeat_interval_ms: 2_000,
            routes_file: None,
            routes_reload_interval_ms: 2_000,
            trusted_proxy_hops: 0,
            redis_url: None,
            redis_password: None,
            redis_cluster: false,
            redis_ca_file: None,
            redis_timeout_ms: 100,
            fleet_secret: None,
            warm_start_ttl_secs: 7 * 86_400,
            rate_limit_mode: None,
            rate_limit_on_redis_failure: OnRedisFailure::Local,
            audit_spool_dir: None,
            audit_spool_max_bytes: 256 * 1024 * 1024,
            audit_spill_after_ms: 500,
            clock_skew_ms: 0,
            refill_clock_offset_ms: 0,
            audit_retention_days: 90,
            audit_retention_interval_ms: 600_000,
            cache_enabled: true,
            cache_max_keys: 1_000_000,
            cache_state_ttl_ms: 300_000,
            negative_cache_max: 100_000,
            negative_cache_ttl_ms: 60_000,
            scopes: None,
            presets: None,
            events_source: "keywarden".into(),
            events_nats_url: None,
            events_nats_stream: "KEYWARDEN_EVENTS".into(),
            events_nats_creds_file: None,
            events_nats_token: None,
            events_nats_user: None,
            events_nats_password: None,
            events_nats_tls_ca_file: None,
            events_nats_tls_cert_file: None,
            events_nats_tls_key_file: None,
            webhook_allow_http: false,
            webhook_max_age: "24h".into(),
            webhook_timeout_ms: 10_000,
            events_poll_interval_ms: 250,
            events_lease_ms: 30_000,
            expiry_reminder_leads: vec!["14d".into(), "3d".into()],
            expiry_scan_interval_ms: 60_000,
            events_retention_days: 30,
            leak_report_listen_addr: None,
            leak_report_keys_file: None,
            leak_report_keys_url: None,
        }
    }
}

#[derive(Debug, Error)]
pub enum ConfigError {
    /// Settings that did not parse, described without their values
    /// ([`describe_load_error`]).
    #[error("configuration: {0}")]
    Load(String),
    #[error("configuration: {0}")]
    Invalid(String),
    // The cause is the source, which error reports print after this.
    #[error("configuration: KEYWARDEN_PEPPER / KEYWARDEN_PEPPERS")]
    Pepper(#[from] PepperError),
    #[error("configuration: scope catalogue")]
    Catalogue(#[from] CatalogueError),
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
}

impl Settings {
    /// Defaults < TOML file < environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut figment = Figment::new();
        if let Some(file) = file {
            if !file.exists() {
                return Err(ConfigError::Invalid(format!("config file {} does not exist", file.display())));
            }
            figment = figment.merge(Toml::file(file));
        }
        let figment = figment.merge(Env::prefixed("KEYWARDEN_").ignore(&["test_postgres_url"]));
        figment.extract().map_err(|e| ConfigError::Load(describe_load_error(e, &figment)))
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }
}

/// An id given as text or, as an environment variable like
/// `KEYWARDEN_PEPPER_CURRENT=2` reads, as a number.
fn id_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum TextOrNumber {
        Text(String),
        Number(u64),
    }
    Ok(Option::<TextOrNumber>::deserialize(d)?.map(|v| match v {
        TextOrNumber::Text(s) => s,
        TextOrNumber::Number(n) => n.to_string(),
    }))
}

/// Accepts `"a,b"` (an environment variable) or `["a", "b"]` (TOML).
fn comma_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    let items = match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => s.split(',').map(str::to_owned).collect(),
        OneOrMany::Many(v) => v,
    };
    Ok(items.into_iter().map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect())
}

/// [`comma_list`], for a setting whose absence means something.
fn optional_comma_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    comma_list(d).map(Some)
}

/// The embedded database's file name in the data directory.
pub const DATABASE_FILE: &str = "keywarden.db";
/// Audit rows refused by the database, and then as dead letters too, in
/// `data_dir` (one JSON object per line).
pub const DEAD_LETTER_FILE: &str = "audit-dead-letters.jsonl";

#[cfg(test)]
mod tests {
    use std::path::Path;

    use base64::{Engine as _, engine::general_purpose::STANDARD};
    use figment::providers::{Format, Toml};

    use super::*;
    use crate::keys::{KeyHasher, operator::OperatorRole};

    #[test]
    fn the_example_settings_file_loads_and_is_consistent() {
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("keywarden.example.toml");
        let settings: Settings = Figment::new().merge(Toml::file(example)).extract().unwrap();
        assert_eq!(settings.operator_identities[0].role, OperatorRole::KeyManager);
        assert!(settings.tls().unwrap().is_some_and(|t| t.client_ca_file.is_some()));
    }

    #[test]
    fn verify_callers_come_as_a_comma_separated_string_or_a_list() {
        for value in [
            serde_json::json!("spiffe://a/x, dns.example ,"),
            serde_json::json!(["spiffe://a/x", "dns.example"]),
        ] {
            let settings: Settings =
                serde_json::from_value(serde_json::json!({ "verify_callers": value })).unwrap();
            assert_eq!(settings.verify_callers, ["spiffe://a/x", "dns.example"]);
        }
    }

    #[test]
    fn debug_output_never_contains_secrets() {
        let settings = Settings {
            pepper: Some(SecretString::from("c2VjcmV0LXBlcHBlci12YWx1ZS0xMjM0NTY3ODkwYWJjZGVm")),
            admin_token: Some(SecretString::from("very-secret-admin-token")),
            peppers: BTreeMap::from([("2".into(), SecretString::from("c2VjcmV0LXNlY29uZC1wZXBwZXI="))]),
            ..Settings::default()
        };
        let shown = format!("{settings:?}");
        assert!(!shown.contains("very-secret-admin-token") && !shown.contains("c2VjcmV0"), "{shown}");
        let hasher = KeyHasher::from_base64(&STANDARD.encode([9u8; 32])).unwrap();
        assert!(!format!("{hasher:?}").contains(&STANDARD.encode([9u8; 32])));
    }
}
