//! The fleet tier: state every replica shares through Redis, at Verify
//! rates. Redis is optional; without it each replica keeps its own.
//!
//! It holds the warm-start map ([`WarmStart`]): a key one replica
//! verified by scrypt is recognised by every other replica with one HMAC
//! and one GET, so a new replica does not pay one scrypt per key the fleet
//! already knows. The connection also carries the leases of fleet-wide
//! rate limits and of shared credit balances ([`crate::limiter`]), as
//! [`Script`]s.
//!
//! A Redis failure is never a wrong answer: each use has a fallback (here,
//! scrypt again), every command is bounded by a timeout, and the transition
//! between reachable and unreachable is logged once each way.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{FromRedisValue, IntoConnectionInfo};
use secrecy::ExposeSecret;

use crate::config::FleetSettings;
use subtle::ConstantTimeEq;

use crate::keys::{
    KeyHash, KeyedMac, PlainKey,
    events::{Delivery, KeyEvent, KeyEventSink},
};
use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// The URL did not parse; the URL itself is never quoted (it may hold a
    /// password).
    #[error("redis_url (KEYWARDEN_REDIS_URL) is not a redis:// or rediss:// URL")]
    BadUrl,
    /// The CA bundle did not parse; the URL is never quoted.
    #[error("redis_ca_file (KEYWARDEN_REDIS_CA_FILE) holds no usable PEM certificate")]
    BadCa,
    #[error("Redis is not connected yet")]
    NotConnected,
    #[error("Redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("Redis: {0}")]
    Command(String),
    /// EVALSHA of a script this server has not cached (a restart, a
    /// failover); not a failure, the script is sent whole.
    #[error("Redis does not know the script")]
    NoScript,
}

#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

// Built once at start and moved into one task: its size does not matter.
#[allow(clippy::large_enum_variant)]
enum Connector {
    Single(redis::Client),
    Cluster(redis::cluster::ClusterClient),
}

/// A shared connection to Redis (or a cluster), opened in the background
/// so that a replica starts while Redis is away. Commands fail fast until
/// it is open; afterwards the client reconnects by itself.
pub struct Redis {
    conn: OnceLock<Conn>,
    timeout: Duration,
    reachable: AtomicBool,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redis")
            .field("connected", &self.conn.get().is_some())
            .field("reachable", &self.reachable.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Redis {
    /// Validates the settings and starts connecting in the background.
    pub fn start(settings: &FleetSettings, metrics: Arc<Metrics>) -> Result<Arc<Self>, FleetError> {
        let mut info =
            settings.redis_url.expose_secret().into_connection_info().map_err(|_| FleetError::BadUrl)?;
        if let Some(password) = &settings.redis_password {
            let redis = info.redis_settings().clone().set_password(password.expose_secret());
            info = info.set_redis_settings(redis);
        }
        // A private CA replaces the system's roots for rediss:// servers.
        let certs = settings
            .redis_ca_pem
            .clone()
            .map(|pem| redis::TlsCertificates { client_tls: None, root_cert: Some(pem) });
        let refused = if certs.is_some() { FleetError::BadCa } else { FleetError::BadUrl };
        let connector = if settings.redis_cluster {
            let mut builder = redis::cluster::ClusterClientBuilder::new([info])
                .connection_timeout(settings.redis_timeout)
                .response_timeout(settings.redis_timeout);
            if let Some(certs) = certs {
                builder = builder.certs(certs);
            }
            Connector::Cluster(builder.build().map_err(|_| refused)?)
        } else {
            let client = match certs {
                Some(certs) => redis::Client::build_with_tls(info, certs),
                None => redis::Client::open(info),
            };
            Connector::Single(client.map_err(|_| refused)?)
        };
        let redis = Arc::new(Self {
            conn: OnceLock::new(),
            timeout: settings.redis_timeout,
            reachable: AtomicBool::new(true),
            metrics,
        });
        tokio::spawn(Arc::clone(&redis).connect(connector));
        Ok(redis)
    }

    /// Opens the connection, retrying with backoff until it opens.
    async fn connect(self: Arc<Self>, connector: Connector) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let opened = match &connector {
                Connector::Single(client) => {
                    let config = ConnectionManagerConfig::new()
                        .set_connection_timeout(Some(self.timeout))
                        .set_response_timeout(Some(self.timeout))
                        .set_max_delay(Duration::from_secs(2))
                        // This loop retries the first connection itself, so
                        // that the first failure is seen (and logged) at once.
                        .set_number_of_retries(1);
                    client.get_connection_manager_with_config(config).await.map(Conn::Single)
                }
                Connector::Cluster(client) => client.get_async_connection().await.map(Conn::Cluster),
            };
            match opened {
                Ok(conn) => {
                    let _ = self.conn.set(conn);
                    self.note(true, None);
                    return;
                }
                Err(e) => {
                    self.note(false, Some(&e.to_string()));
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// The bound on each command.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Whether the connection is open (it may still fail a command).
    pub fn connected(&self) -> bool {
        self.conn.get().is_some()
    }

    /// Runs one command within the timeout, counting errors and latency.
    pub async fn run<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, FleetError> {
        let Some(conn) = self.conn.get() else {
            self.metrics.redis_errors.inc();
            self.note(false, Some("not connected"));
            return Err(FleetError::NotConnected);
        };
        let started = Instant::now();
        let answer = tokio::time::timeout(self.timeout, async {
            match conn.clone() {
                Conn::Single(mut c) => cmd.query_async(&mut c).await,
                Conn::Cluster(mut c) => cmd.query_async(&mut c).await,
            }
        })
        .await;
        self.metrics.redis_duration.observe(started.elapsed().as_secs_f64());
        let result = match answer {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                return Err(FleetError::NoScript);
            }
            Ok(Err(e)) => Err(FleetError::Command(e.to_string())),
            Err(_) => Err(FleetError::Timeout(self.timeout)),
        };
        match &result {
            Ok(_) => self.note(true, None),
            Err(e) => {
                self.metrics.redis_errors.inc();
                self.note(false, Some(&e.to_string()));
            }
        }
        result
    }

    /// Runs a Lua script by its digest, sending it whole only when the
    /// server does not have it cached.
    pub async fn eval<T: FromRedisValue, A: redis::ToRedisArgs>(
        &self,
        script: &Script,
        keys: &[String],
        args: &[A],
    ) -> Result<T, FleetError> {
        let by_digest = redis::cmd("EVALSHA")
            .arg(script.digest.get_hash())
            .arg(keys.len())
            .arg(keys)
            .arg(args)
            .to_owned();
        match self.run(&by_digest).await {
            Err(FleetError::NoScript) => {
                let whole =
                    redis::cmd("EVAL").arg(script.source).arg(keys.len()).arg(keys).arg(args).to_owned();
                self.run(&whole).await
            }
            other => other,
        }
    }

    /// Logs the transitions between reachable and unreachable, once each.
    fn note(&self, reachable: bool, error: Option<&str>) {
        if self.reachable.swap(reachable, Ordering::Relaxed) != reachable {
            if reachable {
                tracing::info!("Redis is reachable again");
            } else {
                tracing::warn!(error = error.unwrap_or(""), "Redis is unreachable; falling back per use");
            }
        }
    }
}

/// A Lua script run atomically on Redis, by digest once it is cached.
pub struct Script {
    source: &'static str,
    digest: redis::Script,
}

impl Script {
    pub fn new(source: &'static str) -> Self {
        Self { source, digest: redis::Script::new(source) }
    }
}

impl std::fmt::Debug for Script {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Script").field(&self.digest.get_hash()).finish()
    }
}

/// `HMAC(fleet secret, key) → key id ‖ tag`, shared by the fleet.
///
/// Redis is trusted for counts, never for identity: whoever can write an
/// entry can name any key id. So an entry vouches for a key only with its
/// tag, an HMAC under a subkey of the fleet secret over the plaintext, the
/// row's id and the row's stored hash, which the replica recomputes and
/// compares in constant time ([`WarmStart::vouches`]). A bare id, or a value
/// copied from another key's entry, fails, and the replica runs scrypt as
/// if Redis were empty. The row's state (revoked, expired, scopes) still
/// comes from the database and the change feed.
pub struct WarmStart {
    redis: Arc<Redis>,
    /// Names entries.
    mac: KeyedMac,
    /// Tags values: a subkey, so that no entry name is ever a valid tag.
    tags: KeyedMac,
    ttl_secs: u64,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for WarmStart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WarmStart").field("ttl_secs", &self.ttl_secs).finish_non_exhaustive()
    }
}

impl WarmStart {
    pub fn new(redis: Arc<Redis>, settings: &FleetSettings, metrics: Arc<Metrics>) -> Self {
        let mac = KeyedMac::new(settings.fleet_secret.expose_secret().as_bytes());
        let tags = KeyedMac::new(&mac.digest(TAG_PURPOSE));
        Self { redis, mac, tags, ttl_secs: settings.warm_start_ttl.as_secs().max(1), metrics }
    }

    /// The Redis key of a plaintext key's entry (hex of its HMAC).
    fn entry(&self, key: &PlainKey) -> String {
        let digest = self.mac.digest(key.expose().as_bytes());
        let mut name = String::with_capacity(ENTRY.len() + 64);
        name.push_str(ENTRY);
        push_hex(&mut name, &digest);
        name
    }

    /// The tag binding `key` to the row `key_id` holding `hash`: each part
    /// length-prefixed, so no two triples share a message.
    fn tag(&self, key: &PlainKey, key_id: &str, hash: &KeyHash) -> [u8; 32] {
        let hash = hash.to_string();
        let mut message = Vec::with_capacity(key.expose().len() + key_id.len() + hash.len() + 24);
        for part in [key.expose().as_bytes(), key_id.as_bytes(), hash.as_bytes()] {
            message.extend_from_slice(&(part.len() as u64).to_be_bytes());
            message.extend_from_slice(part);
        }
        self.tags.digest(&message)
    }

    /// The entry's value for `key` on the row `key_id` holding `hash`.
    fn value(&self, key: &PlainKey, key_id: &str, hash: &KeyHash) -> String {
        let mut value = String::with_capacity(key_id.len() + 1 + 64);
        value.push_str(key_id);
        value.push(SEPARATOR);
        push_hex(&mut value, &self.tag(key, key_id, hash));
        value
    }

    /// Whether the fleet vouches that `key` is the row `key_id` holding
    /// `hash`: true only for an entry whose tag this replica recomputes,
    /// refreshing its TTL; false when unknown, forged, copied, or when
    /// Redis cannot say.
    pub async fn vouches(&self, key: &PlainKey, key_id: &str, hash: &KeyHash) -> bool {
        let cmd = redis::cmd("GETEX").arg(self.entry(key)).arg("EX").arg(self.ttl_secs).to_owned();
        let found = self.redis.run::<Option<String>>(&cmd).await.ok().flatten();
        let vouched = found.is_some_and(|value| {
            let expected = self.value(key, key_id, hash);
            // Lengths are public (an id and 64 hex digits); the content is
            // compared in constant time.
            value.len() == expected.len() && bool::from(value.as_bytes().ct_eq(expected.as_bytes()))
        });
        let counter = if vouched { &self.metrics.warm_start_hits } else { &self.metrics.warm_start_misses };
        counter.inc();
        vouched
    }

    /// Publishes that `key` is the row `key_id` holding `hash`, after a
    /// successful scrypt against that hash in this process. The owner entry
    /// lets a revocation find the digest without the plaintext.
    pub async fn publish(&self, key: &PlainKey, key_id: &str, hash: &KeyHash) {
        let entry = self.entry(key);
        let value = self.value(key, key_id, hash);
        let set_entry = redis::cmd("SET").arg(&entry).arg(value).arg("EX").arg(self.ttl_secs).to_owned();
        let set_owner =
            redis::cmd("SET").arg(owner_entry(key_id)).arg(&entry).arg("EX").arg(self.ttl_secs).to_owned();
        if self.redis.run::<()>(&set_entry).await.is_ok() && self.redis.run::<()>(&set_owner).await.is_ok() {
            self.metrics.warm_start_published.inc();
        }
    }

    /// Deletes a key's entry (revoked or regenerated). A failure leaves an
    /// entry that names a key the database no longer allows: harmless, and
    /// it expires with its TTL.
    pub async fn forget(&self, key_id: &str) -> Result<(), FleetError> {
        let entry: Option<String> = self.redis.run(redis::cmd("GETDEL").arg(owner_entry(key_id))).await?;
        if let Some(entry) = entry.filter(|e| e.starts_with(ENTRY)) {
            self.redis.run::<()>(redis::cmd("DEL").arg(entry)).await?;
        }
        Ok(())
    }
}

/// A revoked or replaced key loses its entry, so that no replica skips
/// scrypt for it again. A failure is logged, not answered: the entry only
/// says which row a plaintext belongs to, and that row's state denies it.
impl KeyEventSink for WarmStart {
    fn deliver<'a>(&'a self, event: &'a KeyEvent) -> Delivery<'a> {
        Box::pin(async move {
            let Some(key) = event.retired() else { return };
            if let Err(e) = self.forget(&key.key_id).await {
                tracing::warn!(key_id = %key.key_id, error = %e, "could not delete the key's warm-start entry; it expires with its TTL");
            }
        })
    }
}

const ENTRY: &str = "keywarden:warm:";
const HEX: &[u8; 16] = b"0123456789abcdef";
/// Between the key id and the tag in an entry's value.
const SEPARATOR: char = '.';
/// What the tag subkey is derived for; a new purpose retires every tag.
const TAG_PURPOSE: &[u8] = b"keywarden warm-start tag v1";

fn push_hex(out: &mut String, bytes: &[u8]) {
    for byte in bytes {
        out.push(char::from(HEX[usize::from(byte >> 4)]));
        out.push(char::from(HEX[usize::from(byte & 15)]));
    }
}

/// The entry naming a key id's warm-start digest.
pub fn owner_entry(key_id: &str) -> String {
    format!("keywarden:warm-owner:{key_id}")
}

/// The Redis key of the warm-start entry named by `key_id`'s owner entry,
/// for tests and operators: `None` when there is none.
pub async fn entry_of(redis: &Redis, key_id: &str) -> Result<Option<String>, FleetError> {
    redis.run(redis::cmd("GET").arg(owner_entry(key_id))).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::KeyPrefix;
    use secrecy::SecretString;

    fn settings(url: &str, secret: &str) -> FleetSettings {
        FleetSettings {
            redis_url: SecretString::from(url),
            redis_password: None,
            redis_cluster: false,
            redis_ca_pem: None,
            redis_timeout: Duration::from_millis(50),
            fleet_secret: SecretString::from(secret.repeat(32)),
            warm_start_ttl: Duration::from_secs(86_400),
        }
    }

    #[tokio::test]
    async fn entries_are_keyed_by_the_fleet_secret_and_never_hold_the_key() {
        let metrics = Arc::new(Metrics::default());
        // Nothing listens on port 1.
        let (sa, sb) = (settings("redis://127.0.0.1:1", "a"), settings("redis://127.0.0.1:1", "b"));
        let redis = Redis::start(&sa, Arc::clone(&metrics)).unwrap();
        let a = WarmStart::new(Arc::clone(&redis), &sa, Arc::clone(&metrics));
        let b = WarmStart::new(Arc::clone(&redis), &sb, Arc::clone(&metrics));
        let key = PlainKey::generate(&KeyPrefix::default()).unwrap();
        assert_eq!(a.entry(&key), a.entry(&key));
        assert_ne!(a.entry(&key), b.entry(&key));
        assert_eq!(a.entry(&key).len(), ENTRY.len() + 64);
        assert!(!a.entry(&key).contains(&key.expose()[8..]));
        // Redis unreachable: a lookup is a miss, not an error.
        let hash = hasher().hash(&key).unwrap();
        assert!(!a.vouches(&key, "id", &hash).await);
        assert_eq!(metrics.warm_start_misses.get(), 1);
        assert!(metrics.redis_errors.get() >= 1);
    }

    fn hasher() -> crate::keys::KeyHasher {
        crate::keys::KeyHasher::from_base64("MTExMTExMTExMTExMTExMTExMTExMTExMTExMTExMTE=").unwrap()
    }

    #[tokio::test]
    async fn a_value_vouches_only_for_its_own_key_row_and_hash() {
        let s = settings("redis://127.0.0.1:1", "a");
        let metrics = Arc::new(Metrics::default());
        let warm = WarmStart::new(Redis::start(&s, Arc::clone(&metrics)).unwrap(), &s, metrics);
        let other_secret = WarmStart::new(
            Redis::start(&settings("redis://127.0.0.1:1", "b"), Arc::new(Metrics::default())).unwrap(),
            &settings("redis://127.0.0.1:1", "b"),
            Arc::new(Metrics::default()),
        );
        let (key, forged) = (
            PlainKey::generate(&KeyPrefix::default()).unwrap(),
            PlainKey::generate(&KeyPrefix::default()).unwrap(),
        );
        let (hash, rehashed) = (hasher().hash(&key).unwrap(), hasher().hash(&key).unwrap());
        let value = warm.value(&key, "k1", &hash);
        assert!(value.starts_with("k1."), "{value}");
        assert_eq!(value.len(), "k1.".len() + 64);
        assert_eq!(value, warm.value(&key, "k1", &hash), "deterministic");
        for (what, other) in [
            ("another plaintext", warm.value(&forged, "k1", &hash)),
            ("another row", warm.value(&key, "k2", &hash)),
            ("another stored hash", warm.value(&key, "k1", &rehashed)),
            ("another fleet secret", other_secret.value(&key, "k1", &hash)),
        ] {
            assert_ne!(value, other, "{what} gives another tag");
        }
        // The tag is not the entry's name under another guise.
        assert!(!warm.entry(&key).ends_with(&value[3..]));
    }

    #[test]
    fn a_url_that_does_not_parse_is_refused_without_quoting_it() {
        let e = Redis::start(&settings("http://user:hunter2@host", "a"), Arc::new(Metrics::default()))
            .unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
        assert!(e.to_string().contains("KEYWARDEN_REDIS_URL"), "{e}");
    }
}
