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
//!
//! [`changes`] keeps the state current across replicas.

pub mod changes;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use quick_cache::{
    DefaultHashBuilder, OptionsBuilder, UnitWeighter,
    sync::{Cache as QuickCache, DefaultLifecycle},
};

use crate::{
    config::CacheSettings,
    keys::{
        KeyState, PlainKey,
        events::{Delivery, KeyEvent, KeyEventSink},
        hash::KeyedMac,
    },
};

/// The error of an identification that [`VerifyCache::identify_once`] runs:
/// the cache needs to tell "no such key" (remembered in the negative cache)
/// from every other failure (not remembered).
pub trait IdentifyError {
    /// The error for a key known not to exist; `owner` is the key whose
    /// prefix it has, when only its secret was wrong.
    fn unknown_key(owner: Owner) -> Self;
    /// `Some(owner)` when this error says the key does not exist.
    fn unknown_owner(&self) -> Option<Owner>;
}

/// The id of the key whose prefix a wrong secret was presented with; `None`
/// for a prefix no key has.
pub type Owner = Option<Arc<str>>;

/// A presented key as the cache knows it.
pub type Digest = [u8; 32];

type Cache<K, V> = QuickCache<K, V, UnitWeighter, DefaultHashBuilder, DefaultLifecycle<K, V>>;

/// A bounded map that grows its table as it fills rather than reserving
/// room for `max` entries up front (an idle server stays small).
fn bounded<K: Eq + std::hash::Hash, V: Clone>(max: u64) -> Cache<K, V> {
    let max = max.max(1);
    let mut options = OptionsBuilder::new();
    options.weight_capacity(max).estimated_items_capacity(usize::try_from(max.min(16_384)).unwrap_or(16_384));
    match options.build() {
        Ok(options) => QuickCache::with_options(
            options,
            UnitWeighter,
            DefaultHashBuilder::default(),
            DefaultLifecycle::default(),
        ),
        // Only a zero capacity is refused, and max ≥ 1.
        Err(_) => {
            QuickCache::with(1, 1, UnitWeighter, DefaultHashBuilder::default(), DefaultLifecycle::default())
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
    /// Keys forgotten one at a time: an admin change on this replica, or a
    /// change notice from any (tests wait on it to know a notice landed).
    pub invalidations: AtomicU64,
}

/// A key's state and when it was read.
#[derive(Debug, Clone)]
struct Loaded {
    state: Arc<KeyState>,
    at: Instant,
}

pub struct VerifyCache {
    /// Keyed with a random per-process secret.
    mac: KeyedMac,
    identities: Cache<Digest, Arc<str>>,
    states: Cache<Arc<str>, Loaded>,
    /// Digest → when the entry stops counting.
    negative: Cache<Digest, (Instant, Owner)>,
    state_ttl: Duration,
    negative_ttl: Duration,
    epoch: AtomicU64,
    pub counters: CacheCounters,
}

impl std::fmt::Debug for VerifyCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyCache").field("sizes", &self.sizes()).finish_non_exhaustive()
    }
}

/// Position in the invalidation sequence, taken before a state read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Epoch(u64);

impl VerifyCache {
    pub fn new(settings: &CacheSettings) -> Result<Self, crate::keys::format::RandomnessUnavailable> {
        let mut secret = [0u8; 32];
        crate::keys::format::fill_random(&mut secret)?;
        Ok(Self {
            mac: KeyedMac::new(&secret),
            identities: bounded(settings.max_keys),
            states: bounded(settings.max_keys),
            negative: bounded(settings.negative_max),
            state_ttl: settings.state_ttl,
            negative_ttl: settings.negative_ttl,
            epoch: AtomicU64::new(0),
            counters: CacheCounters::default(),
        })
    }

    pub fn digest(&self, key: &PlainKey) -> Digest {
        self.mac.digest(key.expose().as_bytes())
    }

    pub fn identity(&self, digest: &Digest) -> Option<Arc<str>> {
        let found = self.identities.get(digest);
        let counter =
            if found.is_some() { &self.counters.identity_hits } else { &self.counters.identity_misses };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// Runs `identify` for a digest not yet known, once however many callers
    /// ask at the same time: the others wait and take its answer. A key found
    /// not to exist is marked bad before the waiters are released, so they
    /// answer from the negative cache instead of repeating the scrypt.
    pub async fn identify_once<F, E>(&self, digest: Digest, identify: F) -> Result<Arc<str>, E>
    where
        F: Future<Output = Result<Arc<str>, E>>,
        E: IdentifyError,
    {
        let guard = match self.identities.get_value_or_guard_async(&digest).await {
            Ok(id) => return Ok(id),
            Err(guard) => guard,
        };
        if let Some(owner) = self.known_bad(&digest) {
            return Err(E::unknown_key(owner));
        }
        let result = identify.await;
        match &result {
            Ok(id) => {
                let _ = guard.insert(Arc::clone(id));
            }
            Err(e) => {
                if let Some(owner) = e.unknown_owner() {
                    self.remember_bad(digest, owner);
                }
                drop(guard);
            }
        }
        result
    }

    /// `Some(owner)` if the digest is a key found not to exist lately.
    pub fn known_bad(&self, digest: &Digest) -> Option<Owner> {
        match self.negative.get(digest) {
            Some((until, owner)) if Instant::now() < until => {
                self.counters.negative_hits.fetch_add(1, Ordering::Relaxed);
                Some(owner)
            }
            Some(_) => {
                self.negative.remove(digest);
                None
            }
            None => None,
        }
    }

    pub fn remember_bad(&self, digest: Digest, owner: Owner) {
        self.negative.insert(digest, (Instant::now() + self.negative_ttl, owner));
    }

    pub fn state(&self, key_id: &str) -> Option<Arc<KeyState>> {
        let found = self.states.get(key_id).filter(|loaded| loaded.at.elapsed() < self.state_ttl);
        let counter = if found.is_some() { &self.counters.state_hits } else { &self.counters.state_misses };
        counter.fetch_add(1, Ordering::Relaxed);
        found.map(|loaded| loaded.state)
    }

    /// Take this before reading a key's state from the store.
    pub fn epoch(&self) -> Epoch {
        Epoch(self.epoch.load(Ordering::Acquire))
    }

    /// Caches state read at `since`, unless a change was announced meanwhile.
    pub fn fill_state(&self, since: Epoch, state: Arc<KeyState>) {
        let key_id = Arc::clone(&state.key_id);
        self.states.insert(Arc::clone(&key_id), Loaded { state, at: Instant::now() });
        // Re-check after inserting: an invalidation that ran before the insert
        // moved the epoch, so take the possibly stale entry back out. One that
        // runs after the insert removes it itself.
        if self.epoch() != since {
            self.states.remove(&key_id);
        }
    }

    /// Forgets a key's state: the next Verify re-reads it.
    pub fn invalidate(&self, key_id: &str) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.states.remove(key_id);
        self.counters.invalidations.fetch_add(1, Ordering::Relaxed);
    }

    /// Forgets every key's state, e.g. after missing change notices.
    pub fn invalidate_all(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.states.clear();
    }

    /// Entries held: (identities, states, negative).
    pub fn sizes(&self) -> (usize, usize, usize) {
        (self.identities.len(), self.states.len(), self.negative.len())
    }
}

/// This replica's own changes reach its cache at once; other replicas'
/// through the change feed ([`changes`]).
impl KeyEventSink for VerifyCache {
    fn deliver<'a>(&'a self, event: &'a KeyEvent) -> Delivery<'a> {
        if let Some(key) = event.altered() {
            self.invalidate(&key.key_id);
        }
        Box::pin(std::future::ready(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{AllowList, KeyPrefix, Policy, ScopeSet};

    #[derive(Debug, PartialEq)]
    enum TestError {
        Unknown,
    }

    impl IdentifyError for TestError {
        fn unknown_key(_: Owner) -> Self {
            Self::Unknown
        }
        fn unknown_owner(&self) -> Option<Owner> {
            (*self == Self::Unknown).then_some(None)
        }
    }

    fn state(id: &str) -> Arc<KeyState> {
        Arc::new(KeyState {
            key_id: Arc::from(id),
            merchant_id: "m".into(),
            name: "n".into(),
            policy: Policy {
                revoked_at: None,
                expires_at: None,
                disabled: false,
                allowed: AllowList::default(),
                scopes: ScopeSet::default(),
            },
            rate_limits: Default::default(),
            credits: None,
            metadata: Default::default(),
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
        assert!(format!("{a:?}").contains("sizes"));
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
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
                    Ok::<_, TestError>(Arc::from("k"))
                })
                .await
            }));
        }
        for t in tasks {
            assert_eq!(&*t.await.unwrap().unwrap(), "k");
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_misses_for_a_missing_key_share_one_failure() {
        let c = Arc::new(cache());
        let runs = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let (c, runs) = (Arc::clone(&c), Arc::clone(&runs));
            tasks.push(tokio::spawn(async move {
                c.identify_once([9u8; 32], async {
                    runs.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Err::<Arc<str>, _>(TestError::Unknown)
                })
                .await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), Err(TestError::Unknown));
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(c.known_bad(&[9u8; 32]), Some(None));
    }

    #[test]
    fn negative_entries_expire() {
        let c = VerifyCache::new(&CacheSettings {
            negative_ttl: Duration::from_millis(30),
            ..CacheSettings::default()
        })
        .unwrap();
        c.remember_bad([1u8; 32], Some(Arc::from("k")));
        assert_eq!(c.known_bad(&[1u8; 32]), Some(Some(Arc::from("k"))));
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(c.known_bad(&[1u8; 32]), None);
    }

    #[test]
    fn state_older_than_its_ttl_is_a_miss() {
        let c = VerifyCache::new(&CacheSettings {
            state_ttl: Duration::from_millis(30),
            ..CacheSettings::default()
        })
        .unwrap();
        c.fill_state(c.epoch(), state("k"));
        assert!(c.state("k").is_some());
        std::thread::sleep(Duration::from_millis(40));
        assert!(c.state("k").is_none());
    }

    #[test]
    fn the_negative_cache_stays_bounded_under_a_million_distinct_keys() {
        let c =
            VerifyCache::new(&CacheSettings { negative_max: 10_000, ..CacheSettings::default() }).unwrap();
        for i in 0u32..1_000_000 {
            let mut digest = [0u8; 32];
            digest[..4].copy_from_slice(&i.to_le_bytes());
            c.remember_bad(digest, None);
        }
        let (_, _, negative) = c.sizes();
        assert!(negative <= 10_000, "{negative} entries");
        assert!(negative > 1_000, "the cache still works: {negative} entries");
    }
}
