//! Settings: defaults, then an optional TOML file (`--config`), then
//! `KEYWARDEN_*` environment variables, each overriding the one before.
//!
//! Secrets (pepper, admin tokens) are part of the settings but never logged.
//! On an embedded (SQLite) run with none configured they are generated once
//! into the data directory, so the first-run command works and is still
//! secure by default; a PostgreSQL deployment must configure them.

use std::{
    collections::BTreeMap,
    io::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use figment::{
    Figment,
    providers::{Env, Format, Toml},
};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use thiserror::Error;

use crate::keys::{
    KeyHasher, KeyPrefix, PepperId,
    hash::PepperError,
    operator::{OPERATOR_PREFIX, OperatorRole},
    scope::{CatalogueError, PresetDef, ScopeCatalogue, ScopeDef},
};

/// Where the TLS material is and how often it is re-read.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// When set, clients must present a certificate chaining to it (mTLS).
    pub client_ca_file: Option<PathBuf>,
    /// PEM CRLs: a client certificate they revoke is refused (mTLS only).
    pub client_crl_file: Option<PathBuf>,
    pub reload_interval: Duration,
}

/// Under mTLS: a client identity that authenticates as an operator by its
/// certificate alone.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityGrant {
    /// The certificate's URI SAN, else its first DNS SAN.
    pub identity: String,
    pub role: OperatorRole,
    /// Empty: every merchant (required for `admin`).
    #[serde(default)]
    pub merchant_ids: Vec<String>,
}

/// Where per-key rate limits are counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RateLimitMode {
    /// On each replica by itself: exact per replica, N replicas admit N times.
    Local,
    /// Fleet-wide through Redis, each replica holding a small lease of tokens.
    Redis,
}

/// What Redis-mode rate limits do while Redis cannot grant a lease.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnRedisFailure {
    /// Count on this replica alone until Redis answers again.
    #[default]
    Local,
    /// Admit every call a limit would have decided.
    Open,
    /// Refuse them (RATE_LIMITED), as a limit that cannot be checked.
    Closed,
}

/// What Verify does when the audit queue is full.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Overflow {
    /// Wait for room: Verify slows down rather than lose a row.
    #[default]
    Block,
    /// Drop the row, count it and log it: Verify never waits on auditing.
    Drop,
}

#[derive(Debug, Clone)]
pub struct AuditSettings {
    pub capacity: usize,
    pub batch_size: usize,
    /// How long a batch may wait to fill before it is written: fewer, larger
    /// inserts under load, at most this much delay when idle.
    pub linger: Duration,
    pub overflow: Overflow,
    /// How long Verify may wait for room in a full queue before the
    /// overflow mode applies (UNAVAILABLE under `block`, a counted loss
    /// under `drop`).
    pub wait: Duration,
    /// Where audit rows go that the database refuses, also as dead letters.
    pub dead_letter_file: PathBuf,
    /// How long an audit write may take before its batch goes to the spool.
    pub spill_after: Duration,
}

/// Guess throttling (see `throttle`).
#[derive(Debug, Clone)]
pub struct ThrottleSettings {
    /// Wrong secrets per lookup prefix per window before its uncached
    /// checks are refused; 0 turns the prefix limit off.
    pub per_prefix: u32,
    /// Wrong secrets per client IP per window; 0 turns the IP limit off.
    pub per_ip: u32,
    pub window: Duration,
}

#[derive(Debug, Clone)]
pub struct CacheSettings {
    /// Most keys whose identity and state are held.
    pub max_keys: u64,
    /// State older than this is re-read even without a change notice: a
    /// backstop for changes made behind the service's back.
    pub state_ttl: Duration,
    pub negative_max: u64,
    pub negative_ttl: Duration,
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self {
            max_keys: 1_000_000,
            state_ttl: Duration::from_secs(300),
            negative_max: 100_000,
            negative_ttl: Duration::from_secs(60),
        }
    }
}

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

/// figment's own messages quote the offending value, and for a token, a
/// pepper or a database URL that value is the secret. This names each
/// setting (as the source spells it, e.g. `KEYWARDEN_ADMIN_TOKENS`) and
/// what is wrong with it, never the value.
pub fn describe_load_error(e: figment::Error, figment: &Figment) -> String {
    let described: Vec<String> = e.into_iter().map(|e| describe_one(&e, figment)).collect();
    described.join("; ")
}

fn describe_one(e: &figment::Error, figment: &Figment) -> String {
    use figment::error::Kind;
    let key = e.path.join(".");
    let setting = match &e.metadata {
        _ if key.is_empty() => "the settings".to_owned(),
        Some(md) if md.name.contains("environment") => {
            format!("KEYWARDEN_{}", md.interpolate(&e.profile.clone().unwrap_or_default(), &e.path))
        }
        Some(md) => match &md.source {
            Some(source) => format!("{key} (in {source})"),
            None => format!("{key} (in {})", md.name),
        },
        None => key.clone(),
    };
    let what = match &e.kind {
        Kind::InvalidType(actual, expected) => format!("expected {expected}, found {}", type_of(actual)),
        Kind::InvalidValue(actual, expected) => format!("invalid {}, expected {expected}", type_of(actual)),
        Kind::InvalidLength(_, expected) => format!("invalid length, expected {expected}"),
        Kind::UnknownVariant(_, expected) => {
            format!("unknown value, expected one of: {}", expected.join(", "))
        }
        Kind::UnknownField(field, _) => format!("unknown setting {field}"),
        Kind::MissingField(field) => format!("missing setting {field}"),
        Kind::DuplicateField(field) => format!("{field} is set twice"),
        Kind::ISizeOutOfRange(_) | Kind::USizeOutOfRange(_) => "out of range".to_owned(),
        Kind::Unsupported(actual) => format!("{} is not supported here", type_of(actual)),
        Kind::UnsupportedKey(_, expected) => format!("unsupported key, expected {expected}"),
        // A parser's own message (an address, a path) is kept only when it
        // is known not to quote the value.
        Kind::Message(message) => match figment.find_value(&key) {
            Ok(figment::value::Value::String(_, value)) if !value.is_empty() && !message.contains(&value) => {
                message.clone()
            }
            _ => "invalid value".to_owned(),
        },
    };
    format!("{setting}: {what}")
}

fn type_of(actual: &figment::error::Actual) -> &'static str {
    use figment::error::Actual;
    match actual {
        Actual::Bool(_) => "a boolean",
        Actual::Unsigned(_) | Actual::Signed(_) => "an integer",
        Actual::Float(_) => "a number",
        Actual::Char(_) => "a character",
        Actual::Str(_) => "a string",
        Actual::Bytes(_) => "bytes",
        Actual::Seq => "a list",
        Actual::Map => "a table",
        Actual::Unit | Actual::Option => "an empty value",
        _ => "a value",
    }
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

    pub fn is_embedded(&self) -> bool {
        self.database_url.as_deref().is_none_or(|u| u.starts_with("sqlite:"))
    }

    pub fn database_url(&self) -> String {
        match &self.database_url {
            Some(url) => url.clone(),
            None => format!("sqlite://{}?mode=rwc", self.data_dir.join(DATABASE_FILE).display()),
        }
    }

    /// The spool's directory, if there is a spool.
    pub fn audit_spool_dir(&self) -> Option<PathBuf> {
        (self.audit_spool_max_bytes > 0)
            .then(|| self.audit_spool_dir.clone().unwrap_or_else(|| self.data_dir.join("spool")))
    }

    pub fn feed_heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.feed_heartbeat_interval_ms.max(10))
    }

    pub fn routes_reload_interval(&self) -> Duration {
        Duration::from_millis(self.routes_reload_interval_ms.max(10))
    }

    /// Where rate limits are counted: `redis` needs `redis_url`.
    pub fn rate_limit_mode(&self) -> Result<RateLimitMode, ConfigError> {
        match (self.rate_limit_mode, &self.redis_url) {
            (Some(RateLimitMode::Redis), None) => Err(ConfigError::Invalid(
                "rate_limit_mode (KEYWARDEN_RATE_LIMIT_MODE) is redis but redis_url is not set".into(),
            )),
            (Some(mode), _) => Ok(mode),
            (None, Some(_)) => Ok(RateLimitMode::Redis),
            (None, None) => Ok(RateLimitMode::Local),
        }
    }

    /// The fleet tier's settings, when Redis is configured.
    pub fn fleet(&self) -> Result<Option<FleetSettings>, ConfigError> {
        let Some(url) = &self.redis_url else {
            return Ok(None);
        };
        let Some(secret) = &self.fleet_secret else {
            return Err(ConfigError::Invalid(
                "fleet_secret (KEYWARDEN_FLEET_SECRET) is required with redis_url".into(),
            ));
        };
        if secret.expose_secret().len() < MIN_FLEET_SECRET_LEN {
            return Err(ConfigError::Invalid(format!(
                "fleet_secret (KEYWARDEN_FLEET_SECRET) is shorter than {MIN_FLEET_SECRET_LEN} bytes"
            )));
        }
        if self.warm_start_ttl_secs < 86_400 {
            return Err(ConfigError::Invalid(
                "warm_start_ttl_secs (KEYWARDEN_WARM_START_TTL_SECS) must be at least 86400 (a day)".into(),
            ));
        }
        if self.redis_timeout_ms == 0 {
            return Err(ConfigError::Invalid(
                "redis_timeout_ms (KEYWARDEN_REDIS_TIMEOUT_MS) must be at least 1".into(),
            ));
        }
        let redis_ca_pem = match &self.redis_ca_file {
            None => None,
            Some(_) if !url.expose_secret().starts_with("rediss://") => {
                return Err(ConfigError::Invalid(
                    "redis_ca_file (KEYWARDEN_REDIS_CA_FILE) needs a rediss:// redis_url".into(),
                ));
            }
            Some(path) => Some(std::fs::read(path).map_err(|e| {
                ConfigError::Invalid(format!(
                    "redis_ca_file (KEYWARDEN_REDIS_CA_FILE): cannot read {}: {e}",
                    path.display()
                ))
            })?),
        };
        Ok(Some(FleetSettings {
            redis_url: url.clone(),
            redis_password: self.redis_password.clone(),
            redis_cluster: self.redis_cluster,
            redis_ca_pem,
            redis_timeout: Duration::from_millis(self.redis_timeout_ms),
            fleet_secret: secret.clone(),
            warm_start_ttl: Duration::from_secs(self.warm_start_ttl_secs),
        }))
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }

    pub fn flush_timeout(&self) -> Duration {
        Duration::from_millis(self.flush_timeout_ms)
    }

    pub fn usage_flush_interval(&self) -> Duration {
        Duration::from_millis(self.usage_flush_interval_ms.max(10))
    }

    pub fn hash_workers(&self) -> usize {
        if self.hash_workers > 0 {
            self.hash_workers
        } else {
            std::thread::available_parallelism().map_or(2, usize::from)
        }
    }

    pub fn audit(&self) -> AuditSettings {
        AuditSettings {
            capacity: self.audit_queue_capacity,
            batch_size: self.audit_batch_size,
            linger: Duration::from_millis(self.audit_linger_ms),
            overflow: self.audit_overflow,
            wait: Duration::from_millis(self.audit_queue_wait_ms),
            dead_letter_file: self.data_dir.join(DEAD_LETTER_FILE),
            spill_after: Duration::from_millis(self.audit_spill_after_ms.max(1)),
        }
    }

    pub fn audit_rollup_interval(&self) -> Duration {
        Duration::from_millis(self.audit_rollup_interval_ms.max(10))
    }

    pub fn throttle(&self) -> ThrottleSettings {
        ThrottleSettings {
            per_prefix: self.throttle_failures_per_prefix,
            per_ip: self.throttle_failures_per_ip,
            window: Duration::from_millis(self.throttle_window_ms.max(1)),
        }
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms.max(1))
    }

    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms.max(1))
    }

    pub fn idle_connection_timeout(&self) -> Option<Duration> {
        (self.idle_connection_timeout_ms > 0).then(|| Duration::from_millis(self.idle_connection_timeout_ms))
    }

    pub fn access_log_stream_max_age(&self) -> Duration {
        Duration::from_millis(self.access_log_stream_max_age_ms.max(1))
    }

    pub fn http2_keepalive_interval(&self) -> Option<Duration> {
        (self.http2_keepalive_interval_ms > 0)
            .then(|| Duration::from_millis(self.http2_keepalive_interval_ms))
    }

    pub fn http2_keepalive_timeout(&self) -> Duration {
        Duration::from_millis(self.http2_keepalive_timeout_ms.max(1))
    }

    /// Connections Verify may hold at once: the pool less the reserve, at
    /// least one.
    pub fn db_verify_connections(&self) -> usize {
        self.db_max_connections.saturating_sub(self.db_reserved_connections).max(1) as usize
    }

    pub fn db_acquire_timeout(&self) -> Duration {
        Duration::from_millis(self.db_acquire_timeout_ms.max(1))
    }

    pub fn staleness_bound(&self) -> Duration {
        Duration::from_millis(self.staleness_bound_ms)
    }

    pub fn health_check_interval(&self) -> Duration {
        Duration::from_millis(self.health_check_interval_ms.max(10))
    }

    pub fn audit_retention(&self) -> Option<chrono::Duration> {
        (self.audit_retention_days > 0).then(|| chrono::Duration::days(i64::from(self.audit_retention_days)))
    }

    pub fn audit_retention_interval(&self) -> Duration {
        Duration::from_millis(self.audit_retention_interval_ms.max(10))
    }

    pub fn cache(&self) -> CacheSettings {
        CacheSettings {
            max_keys: self.cache_max_keys,
            state_ttl: Duration::from_millis(self.cache_state_ttl_ms),
            negative_max: self.negative_cache_max,
            negative_ttl: Duration::from_millis(self.negative_cache_ttl_ms),
        }
    }

    pub fn key_prefix(&self) -> Result<KeyPrefix, ConfigError> {
        if self.key_prefix == OPERATOR_PREFIX {
            return Err(ConfigError::Invalid(format!(
                "key_prefix {OPERATOR_PREFIX:?} is reserved for operator tokens"
            )));
        }
        KeyPrefix::new(&self.key_prefix).map_err(|e| ConfigError::Invalid(e.to_string()))
    }

    /// The TLS settings, if TLS is configured, checked for consistency.
    pub fn tls(&self) -> Result<Option<TlsSettings>, ConfigError> {
        let tls = match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(cert), Some(key)) => Some(TlsSettings {
                cert_file: cert.clone(),
                key_file: key.clone(),
                client_ca_file: self.tls_client_ca_file.clone(),
                client_crl_file: self.tls_client_crl_file.clone(),
                reload_interval: Duration::from_millis(self.tls_reload_interval_ms.max(100)),
            }),
            (None, None) => None,
            _ => {
                return Err(ConfigError::Invalid(
                    "KEYWARDEN_TLS_CERT_FILE and KEYWARDEN_TLS_KEY_FILE go together: set both or neither"
                        .into(),
                ));
            }
        };
        let mtls = tls.as_ref().is_some_and(|t| t.client_ca_file.is_some());
        if self.tls_client_ca_file.is_some() && tls.is_none() {
            return Err(ConfigError::Invalid(
                "KEYWARDEN_TLS_CLIENT_CA_FILE needs KEYWARDEN_TLS_CERT_FILE and KEYWARDEN_TLS_KEY_FILE"
                    .into(),
            ));
        }
        if !mtls && self.outcome_reporters.is_some() {
            return Err(ConfigError::Invalid(
                "KEYWARDEN_OUTCOME_REPORTERS needs mTLS (KEYWARDEN_TLS_CLIENT_CA_FILE): reporters are certificate identities"
                    .into(),
            ));
        }
        if !mtls && self.tls_client_crl_file.is_some() {
            return Err(ConfigError::Invalid(
                "KEYWARDEN_TLS_CLIENT_CRL_FILE needs mTLS (KEYWARDEN_TLS_CLIENT_CA_FILE)".into(),
            ));
        }
        if !mtls && !self.verify_callers.is_empty() {
            return Err(ConfigError::Invalid(
                "KEYWARDEN_VERIFY_CALLERS needs mTLS (KEYWARDEN_TLS_CLIENT_CA_FILE): callers are certificate identities"
                    .into(),
            ));
        }
        if !mtls && !self.operator_identities.is_empty() {
            return Err(ConfigError::Invalid(
                "operator_identities needs mTLS (KEYWARDEN_TLS_CLIENT_CA_FILE): they are certificate identities".into(),
            ));
        }
        for grant in &self.operator_identities {
            if grant.identity.is_empty() {
                return Err(ConfigError::Invalid("operator_identities: identity is required".into()));
            }
            if grant.role == OperatorRole::Admin && !grant.merchant_ids.is_empty() {
                return Err(ConfigError::Invalid(format!(
                    "operator_identities: {:?} is admin, which cannot be limited to merchants",
                    grant.identity
                )));
            }
        }
        if tls.is_none() && !self.allow_plaintext {
            let exposed: Vec<String> = [Some(self.listen_addr), self.admin_listen_addr]
                .into_iter()
                .flatten()
                .filter(|a| !a.ip().is_loopback())
                .map(|a| a.to_string())
                .collect();
            if !exposed.is_empty() {
                return Err(ConfigError::Invalid(format!(
                    "refusing to serve keys and admin tokens in plaintext on {}: configure \
                     KEYWARDEN_TLS_CERT_FILE and KEYWARDEN_TLS_KEY_FILE, or set KEYWARDEN_ALLOW_PLAINTEXT=true \
                     (e.g. behind a mesh sidecar that terminates mTLS)",
                    exposed.join(", ")
                )));
            }
        }
        Ok(tls)
    }

    pub fn catalogue(&self) -> Result<ScopeCatalogue, ConfigError> {
        let (default_scopes, default_presets) = ScopeCatalogue::default_defs();
        let scopes = self.scopes.clone().unwrap_or(default_scopes);
        // Custom scopes without custom presets: the default presets would
        // name scopes that may not exist, so there are none.
        let presets = match (&self.scopes, &self.presets) {
            (_, Some(presets)) => presets.clone(),
            (None, None) => default_presets,
            (Some(_), None) => Vec::new(),
        };
        Ok(ScopeCatalogue::new(scopes, presets)?)
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

/// Shortest fleet secret accepted, in bytes.
pub const MIN_FLEET_SECRET_LEN: usize = 32;

/// The fleet tier (Redis), when configured. Holds secrets: `Debug` shows
/// none of them.
#[derive(Clone)]
pub struct FleetSettings {
    pub redis_url: SecretString,
    pub redis_password: Option<SecretString>,
    pub redis_cluster: bool,
    /// Roots for a `rediss://` server, if not the system's.
    pub redis_ca_pem: Option<Vec<u8>>,
    pub redis_timeout: Duration,
    pub fleet_secret: SecretString,
    pub warm_start_ttl: Duration,
}

impl std::fmt::Debug for FleetSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetSettings")
            .field("redis_cluster", &self.redis_cluster)
            .field("redis_timeout", &self.redis_timeout)
            .field("warm_start_ttl", &self.warm_start_ttl)
            .finish_non_exhaustive()
    }
}

/// Shortest admin token accepted: anything shorter is guessable.
pub const MIN_ADMIN_TOKEN_LEN: usize = 16;

/// Secrets after bootstrap: where each came from is reported, never the value.
#[derive(Debug)]
pub struct Secrets {
    pub hasher: KeyHasher,
    pub admin_tokens: Vec<(String, SecretString)>,
}

impl Secrets {
    /// Takes the configured secrets or, on an embedded run, reads or
    /// generates them in the data directory.
    pub fn resolve(settings: &Settings) -> Result<Self, ConfigError> {
        let hasher = resolve_peppers(settings)?;

        let mut admin_tokens: Vec<(String, SecretString)> =
            settings.admin_tokens.iter().map(|(n, t)| (n.clone(), t.clone())).collect();
        if let Some(token) = &settings.admin_token {
            if settings.admin_tokens.contains_key("admin") {
                return Err(ConfigError::Invalid(
                    "admin_token and admin_tokens.admin are both set; keep one".into(),
                ));
            }
            admin_tokens.push(("admin".into(), token.clone()));
        }
        if admin_tokens.is_empty() {
            if !settings.is_embedded() {
                return Err(ConfigError::Invalid(
                    "an admin token is required with PostgreSQL: set KEYWARDEN_ADMIN_TOKEN or admin_tokens"
                        .into(),
                ));
            }
            let token = bootstrap(&settings.data_dir, ADMIN_TOKEN_FILE, "KEYWARDEN_ADMIN_TOKEN", 32)?;
            admin_tokens.push(("admin".into(), token));
        }
        for (name, token) in &admin_tokens {
            let name_ok = !name.is_empty()
                && name.len() <= 64
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !name_ok {
                return Err(ConfigError::Invalid(format!(
                    "admin token name {name:?} must be 1-64 characters of A-Z, a-z, 0-9, '_' or '-'"
                )));
            }
            if token.expose_secret().len() < MIN_ADMIN_TOKEN_LEN {
                return Err(ConfigError::Invalid(format!(
                    "admin token {name:?} (KEYWARDEN_ADMIN_TOKEN or KEYWARDEN_ADMIN_TOKENS) is shorter than \
                     {MIN_ADMIN_TOKEN_LEN} characters"
                )));
            }
        }
        Ok(Self { hasher, admin_tokens })
    }
}

/// The configured pepper generations as one [`KeyHasher`]. Generation `1`
/// is `pepper` (on an embedded run, read or generated in the data
/// directory when not configured); errors name generations, never values.
fn resolve_peppers(settings: &Settings) -> Result<KeyHasher, ConfigError> {
    let mut peppers: Vec<(PepperId, SecretString)> = Vec::new();
    for (id, secret) in &settings.peppers {
        let id = PepperId::parse(id).map_err(|e| {
            ConfigError::Invalid(format!("peppers (KEYWARDEN_PEPPERS) names a generation {id:?}: {e}"))
        })?;
        if id.is_first() && settings.pepper.is_some() {
            return Err(ConfigError::Invalid(
                "pepper (KEYWARDEN_PEPPER) and peppers.1 are both generation 1; keep one".into(),
            ));
        }
        peppers.push((id, secret.clone()));
    }
    let first = match &settings.pepper {
        Some(p) => Some(p.clone()),
        // Nothing configured: an embedded run makes its own.
        None if settings.is_embedded() && settings.peppers.is_empty() => {
            Some(bootstrap(&settings.data_dir, PEPPER_FILE, "KEYWARDEN_PEPPER", 32)?)
        }
        // Rotated on an embedded run: the generated pepper stays generation
        // 1 while its file is there, but a missing one is never made up.
        None if settings.is_embedded() && !settings.peppers.contains_key(PepperId::FIRST) => {
            read_secret(&settings.data_dir.join(PEPPER_FILE))?
        }
        None => None,
    };
    if let Some(first) = first {
        peppers.insert(0, (PepperId::first(), first));
    }
    let current = match (&settings.pepper_current, peppers.as_slice()) {
        (Some(id), _) => PepperId::parse(id)
            .map_err(|e| ConfigError::Invalid(format!("pepper_current (KEYWARDEN_PEPPER_CURRENT): {e}")))?,
        (None, [(only, _)]) => only.clone(),
        (None, []) => {
            return Err(ConfigError::Invalid(
                "KEYWARDEN_PEPPER is required with PostgreSQL (base64, at least 32 bytes); \
                 generate one with: head -c 32 /dev/urandom | base64"
                    .into(),
            ));
        }
        (None, _) => {
            return Err(ConfigError::Invalid(
                "several peppers are configured: name the one new hashes use in pepper_current \
                 (KEYWARDEN_PEPPER_CURRENT)"
                    .into(),
            ));
        }
    };
    Ok(KeyHasher::new(peppers.iter().map(|(id, secret)| (id.clone(), secret.expose_secret())), &current)?)
}

/// The embedded database's file name in the data directory.
pub const DATABASE_FILE: &str = "keywarden.db";
/// Audit rows refused by the database, and then as dead letters too, in
/// `data_dir` (one JSON object per line).
pub const DEAD_LETTER_FILE: &str = "audit-dead-letters.jsonl";

/// Where an embedded run keeps the pepper and the admin token it generated.
const PEPPER_FILE: &str = "pepper";
const ADMIN_TOKEN_FILE: &str = "admin-token";

/// Files of the data directory that hold key hashes, the audit trail or
/// secrets.
const PRIVATE_FILES: [&str; 5] =
    [DATABASE_FILE, "keywarden.db-wal", "keywarden.db-shm", PEPPER_FILE, ADMIN_TOKEN_FILE];

/// Makes the data directory private to this user, on every start: `dir` is
/// created 0700 (with any missing parents) or, if it exists with wider
/// modes, tightened to 0700; the files in it that hold private data are
/// tightened to 0600; and the database file is created 0600 before SQLite
/// opens it, so that its WAL and shared-memory files, which SQLite creates
/// with the database's mode, are too. Returns what it had to tighten, for
/// the caller to name in a warning.
pub fn secure_data_dir(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    create_private_dir(dir)?;
    let mut tightened = Vec::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let tighten = |path: &Path, mode: u32, tightened: &mut Vec<PathBuf>| -> std::io::Result<()> {
            match std::fs::symlink_metadata(path) {
                Ok(meta) if meta.permissions().mode() & 0o077 != 0 => {
                    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
                    tightened.push(path.to_owned());
                    Ok(())
                }
                Ok(_) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e),
            }
        };
        tighten(dir, 0o700, &mut tightened)?;
        for file in PRIVATE_FILES {
            tighten(&dir.join(file), 0o600, &mut tightened)?;
        }
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dir.join(DATABASE_FILE))
        {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Ok(tightened)
}

/// Creates `dir` (and parents) readable by this user only.
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

/// Reads `<dir>/<file>`, or creates it (mode 0600) with `len` random bytes in
/// base64 and says so on stderr — the path, never the value.
/// A secret file's content, or `None` if there is no such file.
fn read_secret(path: &Path) -> Result<Option<SecretString>, ConfigError> {
    match std::fs::read_to_string(path) {
        Ok(existing) => Ok(Some(SecretString::from(existing.trim().to_owned()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ConfigError::Io { what: "cannot read", path: path.to_owned(), source: e }),
    }
}

fn bootstrap(dir: &Path, file: &str, variable: &str, len: usize) -> Result<SecretString, ConfigError> {
    let path = dir.join(file);
    if let Some(existing) = read_secret(&path)? {
        return Ok(existing);
    }
    create_private_dir(dir).map_err(|e| ConfigError::Io {
        what: "cannot create",
        path: dir.into(),
        source: e,
    })?;
    let mut bytes = vec![0u8; len];
    crate::keys::format::fill_random(&mut bytes).map_err(|e| ConfigError::Invalid(e.to_string()))?;
    let value = STANDARD.encode(&bytes);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut f = options.open(&path).map_err(|e| ConfigError::Io {
        what: "cannot create",
        path: path.clone(),
        source: e,
    })?;
    f.write_all(value.as_bytes()).and_then(|()| f.sync_all()).map_err(|e| ConfigError::Io {
        what: "cannot write",
        path: path.clone(),
        source: e,
    })?;
    eprintln!(
        "\n*** keywarden: no {variable} configured: generated one into {} (mode 0600).\n\
         *** Keep it: {}\n",
        path.display(),
        if file == PEPPER_FILE {
            "keys hashed with this pepper only verify with it."
        } else {
            "send it as `authorization: Bearer <token>` on KeyAdmin calls."
        }
    );
    Ok(SecretString::from(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_first_run_generates_secrets_once_with_private_files() {
        let dir = tempfile::tempdir().unwrap();
        let settings = Settings { data_dir: dir.path().to_owned(), ..Settings::default() };
        let first = Secrets::resolve(&settings).unwrap();
        let second = Secrets::resolve(&settings).unwrap();
        assert_eq!(first.admin_tokens[0].1.expose_secret(), second.admin_tokens[0].1.expose_secret());
        #[cfg(unix)]
        for file in [PEPPER_FILE, ADMIN_TOKEN_FILE] {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(file)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{file}");
        }
    }

    #[test]
    fn postgres_requires_configured_secrets() {
        let settings =
            Settings { database_url: Some("postgres://x@localhost/db".into()), ..Settings::default() };
        let err = Secrets::resolve(&settings).unwrap_err().to_string();
        assert!(err.contains("KEYWARDEN_PEPPER"), "{err}");
    }

    #[test]
    fn redis_needs_a_long_fleet_secret_and_errors_never_quote_either() {
        let url = "redis://:hunter2-password@redis:6379";
        let mut settings = Settings { redis_url: Some(url.into()), ..Settings::default() };
        let missing = settings.fleet().unwrap_err().to_string();
        assert!(missing.contains("KEYWARDEN_FLEET_SECRET") && !missing.contains("hunter2"), "{missing}");
        settings.fleet_secret = Some("short-secret".into());
        let short = settings.fleet().unwrap_err().to_string();
        assert!(short.contains("32 bytes") && !short.contains("short-secret"), "{short}");
        settings.fleet_secret = Some("f".repeat(32).into());
        settings.warm_start_ttl_secs = 3_600;
        assert!(settings.fleet().unwrap_err().to_string().contains("KEYWARDEN_WARM_START_TTL_SECS"));
        settings.warm_start_ttl_secs = 86_400;
        let fleet = settings.fleet().unwrap().expect("configured");
        assert!(!format!("{fleet:?}").contains("hunter2"));
        assert_eq!(Settings::default().fleet().unwrap().map(|_| ()), None, "no Redis by default");
    }

    #[test]
    fn a_redis_ca_file_needs_tls_and_must_be_readable() {
        let mut settings = Settings {
            redis_url: Some("redis://:hunter2@redis:6379".into()),
            fleet_secret: Some("f".repeat(32).into()),
            redis_ca_file: Some("/nonexistent/redis-ca.pem".into()),
            ..Settings::default()
        };
        let plain = settings.fleet().unwrap_err().to_string();
        assert!(plain.contains("KEYWARDEN_REDIS_CA_FILE") && plain.contains("rediss://"), "{plain}");
        assert!(!plain.contains("hunter2"), "{plain}");
        settings.redis_url = Some("rediss://:hunter2@redis:6380".into());
        let unreadable = settings.fleet().unwrap_err().to_string();
        assert!(
            unreadable.contains("/nonexistent/redis-ca.pem") && !unreadable.contains("hunter2"),
            "{unreadable}"
        );
        let dir = tempfile::tempdir().unwrap();
        let pem = dir.path().join("ca.pem");
        std::fs::write(&pem, "-----BEGIN CERTIFICATE-----\n").unwrap();
        settings.redis_ca_file = Some(pem);
        let fleet = settings.fleet().unwrap().expect("configured");
        assert_eq!(fleet.redis_ca_pem.as_deref(), Some(&b"-----BEGIN CERTIFICATE-----\n"[..]));
    }

    #[test]
    fn rate_limits_go_to_redis_by_default_only_when_it_is_configured() {
        let mut settings = Settings::default();
        assert_eq!(settings.rate_limit_mode().unwrap(), RateLimitMode::Local);
        settings.rate_limit_mode = Some(RateLimitMode::Redis);
        assert!(settings.rate_limit_mode().unwrap_err().to_string().contains("KEYWARDEN_RATE_LIMIT_MODE"));
        settings.redis_url = Some("redis://127.0.0.1".into());
        settings.rate_limit_mode = None;
        assert_eq!(settings.rate_limit_mode().unwrap(), RateLimitMode::Redis);
        settings.rate_limit_mode = Some(RateLimitMode::Local);
        assert_eq!(settings.rate_limit_mode().unwrap(), RateLimitMode::Local);
        let parsed: Settings = Figment::new()
            .merge(Toml::string("rate_limit_mode = \"redis\"\nrate_limit_on_redis_failure = \"closed\""))
            .extract()
            .unwrap();
        assert_eq!(
            (parsed.rate_limit_mode, parsed.rate_limit_on_redis_failure),
            (Some(RateLimitMode::Redis), OnRedisFailure::Closed)
        );
    }

    #[test]
    fn peppers_rotate_by_id_with_one_named_current() {
        let b64 = |byte: u8| STANDARD.encode([byte; 32]);
        let load = |toml: &str| {
            let mut settings: Settings = Figment::new().merge(Toml::string(toml)).extract().unwrap();
            settings.database_url = Some("postgres://x@localhost/db".into());
            settings.admin_token = Some(SecretString::from("a-long-enough-admin-token"));
            Secrets::resolve(&settings).map(|s| s.hasher)
        };
        let error = |toml: &str| {
            let e = load(toml).unwrap_err();
            let mut text = e.to_string();
            if let Some(source) = std::error::Error::source(&e) {
                text = format!("{text}: {source}");
            }
            text
        };
        let (one, two) = (b64(1), b64(2));

        // An environment variable's `2` arrives as a number; it is an id.
        let hasher =
            load(&format!("pepper = \"{one}\"\npeppers = {{ 2 = \"{two}\" }}\npepper_current = 2")).unwrap();
        assert_eq!(hasher.current().as_str(), "2");
        assert_eq!(hasher.ids().map(|id| id.as_str().to_owned()).collect::<Vec<_>>(), ["2", "1"]);
        // Generation 1 may be retired.
        let hasher = load(&format!("peppers = {{ 2 = \"{two}\" }}")).unwrap();
        assert_eq!(hasher.ids().count(), 1);

        let several = error(&format!("pepper = \"{one}\"\npeppers = {{ 2 = \"{two}\" }}"));
        assert!(several.contains("KEYWARDEN_PEPPER_CURRENT"), "{several}");
        let twice = error(&format!("pepper = \"{one}\"\npeppers = {{ 1 = \"{two}\" }}"));
        assert!(twice.contains("both generation 1"), "{twice}");
        let unknown = error(&format!("pepper = \"{one}\"\npepper_current = \"3\""));
        assert!(unknown.contains("current pepper 3 is not configured"), "{unknown}");
        let bad_id = error(&format!("peppers = {{ \"a.b\" = \"{two}\" }}"));
        assert!(bad_id.contains("KEYWARDEN_PEPPERS"), "{bad_id}");
        // A malformed secret is named by its generation, never quoted.
        let garbled =
            error(&format!("pepper = \"{one}\"\npeppers = {{ 2 = \"s3cr3t!!\" }}\npepper_current = 2"));
        assert!(garbled.contains("pepper 2 is not valid base64") && !garbled.contains("s3cr3t"), "{garbled}");
        let short = error(&format!("peppers = {{ 2 = \"{}\" }}", STANDARD.encode(b"s3cr3t")));
        assert!(short.contains("pepper 2 must be at least 32 bytes"), "{short}");
    }

    #[test]
    fn short_admin_tokens_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let settings = Settings {
            data_dir: dir.path().to_owned(),
            admin_token: Some(SecretString::from("short")),
            ..Settings::default()
        };
        assert!(Secrets::resolve(&settings).is_err());
    }

    #[test]
    fn transport_settings_are_checked_together() {
        let tls = |cert: bool, key: bool, ca: bool| Settings {
            tls_cert_file: cert.then(|| "c.pem".into()),
            tls_key_file: key.then(|| "k.pem".into()),
            tls_client_ca_file: ca.then(|| "ca.pem".into()),
            ..Settings::default()
        };
        assert!(tls(true, true, true).tls().unwrap().is_some());
        assert!(tls(false, false, false).tls().unwrap().is_none());
        for (c, k, ca) in [(true, false, false), (false, true, false), (false, false, true)] {
            assert!(tls(c, k, ca).tls().is_err(), "{c} {k} {ca}");
        }
        let callers_without_mtls =
            Settings { verify_callers: vec!["spiffe://x".into()], ..tls(true, true, false) };
        assert!(callers_without_mtls.tls().unwrap_err().to_string().contains("KEYWARDEN_VERIFY_CALLERS"));
    }

    #[test]
    fn load_errors_name_the_setting_and_never_quote_its_value() {
        let cases = [
            (r#"admin_tokens = "s3cr3t-token""#, "admin_tokens", "expected a map, found a string"),
            (r#"pepper = ["s3cr3t-pepper"]"#, "pepper", "found a list"),
            (r#"peppers = "s3cr3t-pepper""#, "peppers", "expected a map, found a string"),
            (r#"admin_token = 4711"#, "admin_token", "found an integer"),
            (r#"db_max_connections = "s3cr3t-count""#, "db_max_connections", "found a string"),
            // A parser's message that does not quote the value is kept.
            (r#"listen_addr = "s3cr3t-address""#, "listen_addr", "invalid socket address syntax"),
        ];
        for (toml, setting, what) in cases {
            let figment = Figment::new().merge(Toml::string(toml));
            let e = figment.extract::<Settings>().unwrap_err();
            let described = describe_load_error(e, &figment);
            assert!(!described.contains("s3cr3t") && !described.contains("4711"), "{described}");
            assert!(described.contains(setting) && described.contains(what), "{toml}: {described}");
        }
    }

    #[test]
    fn the_example_settings_file_loads_and_is_consistent() {
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("keywarden.example.toml");
        let settings: Settings = Figment::new().merge(Toml::file(example)).extract().unwrap();
        assert_eq!(settings.operator_identities[0].role, OperatorRole::KeyManager);
        assert!(settings.tls().unwrap().is_some_and(|t| t.client_ca_file.is_some()));
    }

    #[test]
    fn plaintext_beyond_loopback_must_be_asked_for() {
        let open = Settings { listen_addr: "0.0.0.0:50051".parse().unwrap(), ..Settings::default() };
        assert!(open.tls().unwrap_err().to_string().contains("KEYWARDEN_ALLOW_PLAINTEXT"));
        assert!(Settings { allow_plaintext: true, ..open }.tls().is_ok());
        let admin_open =
            Settings { admin_listen_addr: Some("10.0.0.1:50052".parse().unwrap()), ..Settings::default() };
        assert!(admin_open.tls().is_err());
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
