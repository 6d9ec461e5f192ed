//! The verification cache: what lets a warm Verify skip scrypt and the
//! database.
//!
//! Three bounded maps:
//! - identity: HMAC-SHA256(process secret, full key) → key id, filled after one
//!   successful scrypt check. Never the plaintext; the secret is random per
//!   process, so the digests are worthless outside it. A key's identity never
//!   changes, so this map needs no invalidation.
//! - state: key id → the key's current policy (revocation, expiry, scopes,
//!   CIDRs). Dropped whenever the key changes, so the next Verify re-reads it
//!   (one indexed read) and obeys the change.
//! - negative: digests of keys that were not found (unknown prefix or wrong
//!   secret), for a short TTL, so a storm of one wrong key costs one scrypt.
//!
//! A state fill that began before a change must not land after it: every
//! invalidation bumps an epoch, and a fill that sees the epoch move after
//! inserting removes what it inserted.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use moka::{future::Cache as AsyncCache, sync::Cache};

use crate::{
    keys::{PlainKey, hash::hmac_sha256},
    service::{ServiceError, admin::KeyChangeListener, verify::KeyState},
};

/// A presented key as the cache knows it.
pub type Digest = [u8; 32];

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

/// Hit and miss counts, for metrics and tests.
#[derive(Debug, Default)]
pub struct CacheCounters {
    pub identity_hits: AtomicU64,
    pub identity_misses: AtomicU64,
    pub state_hits: AtomicU64,
    pub state_misses: AtomicU64,
    pub negative_hits: AtomicU64,
}

#[derive(Debug)]
pub struct VerifyCache {
    secret: [u8; 32],
    identities: AsyncCache<Digest, Arc<str>>,
    states: Cache<Arc<str>, Arc<KeyState>>,
    negative: Cache<Digest, ()>,
    epoch: AtomicU64,
    pub counters: CacheCounters,
}

/// Position in the invalidation sequence, taken before a state read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Epoch(u64);

impl VerifyCache {
    pub fn new(settings: &CacheSettings) -> Result<Self, crate::keys::format::RandomnessUnavailable> {
        let mut secret = [0u8; 32];
        crate::keys::format::fill_random(&mut secret)?;
        Ok(Self {
            secret,
            identities: AsyncCache::builder().max_capacity(settings.max_keys).build(),
            states: Cache::builder().max_capacity(settings.max_keys).time_to_live(settings.state_ttl).build(),
            negative: Cache::builder()
                .max_capacity(settings.negative_max)
                .time_to_live(settings.negative_ttl)
                .build(),
            epoch: AtomicU64::new(0),
            counters: CacheCounters::default(),
        })
    }

    pub fn digest(&self, key: &PlainKey) -> Digest {
        hmac_sha256(&self.secret, key.expose().as_bytes())
    }

    pub async fn identity(&self, digest: &Digest) -> Option<Arc<str>> {
        let found = self.identities.get(digest).await;
        let counter =
            if found.is_some() { &self.counters.identity_hits } else { &self.counters.identity_misses };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// Runs `identify` for a digest not yet known, once however many callers
    /// ask for it at the same time; they all get its result.
    pub async fn identify_once<F>(&self, digest: Digest, identify: F) -> Result<Arc<str>, ServiceError>
    where
        F: Future<Output = Result<Arc<str>, ServiceError>>,
    {
        self.identities.try_get_with(digest, identify).await.map_err(|e| (*e).clone())
    }

    pub fn known_bad(&self, digest: &Digest) -> bool {
        let bad = self.negative.contains_key(digest);
        if bad {
            self.counters.negative_hits.fetch_add(1, Ordering::Relaxed);
        }
        bad
    }

    pub fn remember_bad(&self, digest: Digest) {
        self.negative.insert(digest, ());
    }

    pub fn state(&self, key_id: &str) -> Option<Arc<KeyState>> {
        let found = self.states.get(key_id);
        let counter = if found.is_some() { &self.counters.state_hits } else { &self.counters.state_misses };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// Take this before reading a key's state from the store.
    pub fn epoch(&self) -> Epoch {
        Epoch(self.epoch.load(Ordering::Acquire))
    }

    /// Caches state read at `since`, unless a change was announced meanwhile.
    pub fn fill_state(&self, since: Epoch, state: Arc<KeyState>) {
        let key_id = Arc::clone(&state.key_id);
        self.states.insert(Arc::clone(&key_id), state);
        // Re-check after inserting: an invalidation that ran before the insert
        // moved the epoch, so take the possibly stale entry back out. One that
        // runs after the insert removes it itself.
        if self.epoch() != since {
            self.states.invalidate(&key_id);
        }
    }

    /// Forgets a key's state: the next Verify re-reads it.
    pub fn invalidate(&self, key_id: &str) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.states.invalidate(key_id);
    }

    /// Forgets every key's state, e.g. after missing change notices.
    pub fn invalidate_all(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.states.invalidate_all();
    }

    /// Entries held (approximate until pending maintenance runs).
    pub fn sizes(&self) -> (u64, u64, u64) {
        (self.identities.entry_count(), self.states.entry_count(), self.negative.entry_count())
    }

    /// Runs moka's deferred maintenance so that sizes are exact (tests, benchmarks).
    pub async fn sync(&self) {
        self.identities.run_pending_tasks().await;
        self.states.run_pending_tasks();
        self.negative.run_pending_tasks();
    }
}

impl KeyChangeListener for VerifyCache {
    fn key_changed(&self, key_id: &str) {
        self.invalidate(key_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{AllowList, KeyPrefix, Policy, ScopeSet};

    fn state(id: &str) -> Arc<KeyState> {
        Arc::new(KeyState {
            key_id: Arc::from(id),
            merchant_id: "m".into(),
            name: "n".into(),
            policy: Policy {
                revoked_at: None,
                expires_at: None,
                allowed: AllowList::default(),
                scopes: ScopeSet::default(),
            },
            version: 1,
        })
    }

    fn cache() -> VerifyCache {
        VerifyCache::new(&CacheSettings::default()).unwrap()
    }

    #[test]
    fn digests_depend_on_the_process_secret_not_just_the_key() {
        let key = PlainKey::generate(&KeyPrefix::default()).unwrap();
        let (a, b) = (cache(), cache());
        assert_eq!(a.digest(&key), a.digest(&key));
        assert_ne!(a.digest(&key), b.digest(&key));
        assert_ne!(a.digest(&key)[..], *key.expose().as_bytes().get(..32).unwrap());
    }

    #[test]
    fn a_fill_that_races_an_invalidation_does_not_stick() {
        let c = cache();
        let before = c.epoch();
        c.invalidate("k1");
        c.fill_state(before, state("k1"));
        assert!(c.state("k1").is_none());
        let now = c.epoch();
        c.fill_state(now, state("k1"));
        assert!(c.state("k1").is_some());
        c.invalidate("k1");
        assert!(c.state("k1").is_none());
    }

    #[test]
    fn invalidate_all_forgets_every_state() {
        let c = cache();
        for i in 0..10 {
            c.fill_state(c.epoch(), state(&format!("k{i}")));
        }
        c.invalidate_all();
        assert!((0..10).all(|i| c.state(&format!("k{i}")).is_none()));
    }

    #[tokio::test]
    async fn concurrent_misses_run_one_identification() {
        let c = Arc::new(cache());
        let runs = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..100 {
            let (c, runs) = (Arc::clone(&c), Arc::clone(&runs));
            tasks.push(tokio::spawn(async move {
                c.identify_once([7u8; 32], async {
                    runs.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Ok::<_, ServiceError>(Arc::from("k"))
                })
                .await
            }));
        }
        for t in tasks {
            assert_eq!(&*t.await.unwrap().unwrap(), "k");
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn the_negative_cache_stays_bounded_under_a_million_distinct_keys() {
        let c =
            VerifyCache::new(&CacheSettings { negative_max: 10_000, ..CacheSettings::default() }).unwrap();
        for i in 0u32..1_000_000 {
            let mut digest = [0u8; 32];
            digest[..4].copy_from_slice(&i.to_le_bytes());
            c.remember_bad(digest);
        }
        c.sync().await;
        let (_, _, negative) = c.sizes();
        assert!(negative <= 10_000, "{negative} entries");
    }
}
