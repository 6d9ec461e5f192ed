//! Credits shared by the fleet (`rate_limit_mode = "redis"`): Redis holds
//! the part of each key's balance that no replica has leased; a replica
//! leases a few credits at a time and spends them in memory, as rate limits
//! do, so a call does not wait on Redis in the steady state (ADR 40).
//!
//! The database stays the durable record: every credit spent is written by
//! the usage flush as before. Redis's copy is seeded from the database when
//! the key's credits epoch moves (an update of its credits, a refill) or
//! when Redis has lost it, and at no other time.
//!
//! A lease is carved out of the shared balance, so within one epoch the
//! fleet spends at most that balance. The ways it can be wrong are bounded:
//! - credits leased before a refill or update and spent before the replica
//!   hears of it: at most what the replicas held, N × [`MAX_LEASE`];
//! - Redis losing the entry: it is seeded again from the database, which
//!   lacks the credits replicas hold and the spending they have not flushed
//!   (their held credits are dropped when they next lease);
//! - a replica that dies holding credits: those are lost until the next
//!   epoch (an undershoot).
//!
//! Credits unused for [`IDLE_US`] go back to Redis, and all of them at
//! shutdown, so a key whose calls move to other replicas loses nothing.
//! When Redis cannot answer, Verify decides on the replica's own view of the
//! balance (`usage`), as it does without Redis.

use std::{
    collections::HashMap,
    hash::{BuildHasher, RandomState},
    sync::{Arc, LazyLock, Mutex, PoisonError},
};

use crate::{
    fleet::{FleetError, Redis, Script},
    limiter::backoff::{Backoff, RETRY_US},
    metrics::Metrics,
    store::{Store, lane::DbLane},
    task::Task,
};

/// The most credits one replica leases of one key at a time; a lease is
/// otherwise a sixteenth of what the fleet has left (rounded up), and at
/// least what the call needs.
pub const MAX_LEASE: i64 = 1_000;
/// Credits held this long without a call go back to the fleet (µs).
pub const IDLE_US: u128 = 2_000_000;
/// Redis forgets a balance no replica has leased from for this long; a
/// later call seeds it again from the database, by then fully flushed.
const LIFETIME_MS: i64 = 86_400_000;
const SHARDS: usize = 16;

static SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("credits.lua")));
const LEASE: i64 = 0;
const RETURN: i64 = 1;

/// What the fleet's balance said of one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spend {
    /// Paid; about this many credits are left fleet-wide.
    Paid(i64),
    /// The balance cannot pay; about this many are left.
    Refused(i64),
    /// Redis cannot say; decide on this replica's own view.
    Unavailable,
}

pub struct LeasedCredits {
    redis: Arc<Redis>,
    /// Where a balance is read to seed Redis with, through Verify's share
    /// of database connections (a seed is read on the Verify path).
    store: Store,
    lane: DbLane,
    hasher: RandomState,
    shards: [Mutex<HashMap<Arc<str>, Arc<Wallet>>>; SHARDS],
    backoff: Backoff,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for LeasedCredits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeasedCredits").field("degraded", &self.degraded()).finish_non_exhaustive()
    }
}

/// One key's leased credits.
struct Wallet {
    held: Mutex<Held>,
    /// Held while a lease is asked for: one request per key in flight.
    asking: tokio::sync::Mutex<()>,
}

/// What this replica holds of one key's balance, and from which entry.
#[derive(Debug, Default, Clone, Copy)]
struct Held {
    /// The epoch and seeding of the Redis entry the credits came from.
    epoch: i64,
    born: i64,
    credits: i64,
    /// What the fleet had left, unleased, after the last lease.
    left: i64,
    /// Credits held after the last lease: below half of it, top up.
    lease: i64,
    used_at: u128,
    /// The fleet could not pay before this time (µs), unless it is asked
    /// for less than `left`.
    refused_until: u128,
    topping_up: bool,
}

impl Held {
    /// Pays `cost` from held credits, or refuses on a recent answer, or
    /// neither (a lease is needed).
    fn take(&mut self, epoch: i64, cost: i64, now: u128) -> Option<Result<i64, i64>> {
        if epoch > self.epoch {
            // Set outright since the lease: what is held belongs to the
            // old balance.
            *self = Self { epoch, topping_up: self.topping_up, ..Self::default() };
        }
        if self.credits >= cost {
            self.credits -= cost;
            self.used_at = now;
            return Some(Ok(self.credits + self.left));
        }
        if self.refused_until > now && cost - self.credits > self.left {
            return Some(Err(self.credits + self.left));
        }
        None
    }
}

/// Why a lease was not had.
#[derive(Debug)]
enum LeaseError {
    /// Redis failed or answered nonsense: backed off from, decided locally.
    Redis(FleetError),
    /// The stored balance could not be read (the database, or Verify's
    /// lane to it, is busy or away): this call is decided locally.
    Seed(String),
}

impl From<FleetError> for LeaseError {
    fn from(e: FleetError) -> Self {
        Self::Redis(e)
    }
}

fn entry_key(key_id: &str) -> String {
    format!("keywarden:cr:{{{key_id}}}")
}

/// Microseconds on a monotonic clock local to this process: leases,
/// refusals and idle returns are timed here only, never compared across
/// replicas, so a wall clock stepped by NTP cannot stretch or cut them.
fn now_us() -> u128 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START.get_or_init(std::time::Instant::now).elapsed().as_micros()
}

impl LeasedCredits {
    pub fn new(redis: Arc<Redis>, store: Store, lane: DbLane, metrics: Arc<Metrics>) -> Self {
        Self {
            redis,
            store,
            lane,
            hasher: RandomState::new(),
            shards: std::array::from_fn(|_| Mutex::new(HashMap::new())),
            backoff: Backoff::new(
                "credits cannot lease from Redis; each replica decides on its own view of the balance".into(),
                "credits lease from Redis again: shared by the fleet",
            ),
            metrics,
        }
    }

    /// Takes `cost` credits of `key_id`, whose state has `epoch`, from
    /// what this replica holds or from a new lease.
    pub async fn spend(self: &Arc<Self>, key_id: &Arc<str>, epoch: i64, cost: i64) -> Spend {
        let now = now_us();
        let wallet = self.wallet(key_id);
        if let Some(decided) = self.settle(&wallet, key_id, epoch, cost, now) {
            return decided;
        }
        if self.backoff.skipping(now) {
            self.metrics.credit_fallback_decisions.inc();
            return Spend::Unavailable;
        }
        let _asking = wallet.asking.lock().await;
        // Another call's lease may have arrived while this one waited.
        if let Some(decided) = self.settle(&wallet, key_id, epoch, cost, now) {
            return decided;
        }
        // The call is paid under the same lock as the grant; calls paying
        // from held credits meanwhile may still leave it short, so it asks
        // again, a few times at most.
        for _ in 0..3 {
            let held = wallet.held.lock().unwrap_or_else(PoisonError::into_inner).credits;
            match self.lease(&wallet, key_id, epoch, cost - held.min(cost), cost, now).await {
                Ok(Some(Ok(left))) => {
                    let mut held = wallet.held.lock().unwrap_or_else(PoisonError::into_inner);
                    self.top_up_if_low(&mut held, &wallet, key_id, epoch, now);
                    return Spend::Paid(left);
                }
                Ok(Some(Err(left))) => return Spend::Refused(left),
                Ok(None) => {}
                Err(LeaseError::Redis(e)) => {
                    self.backoff.failed(now, &e);
                    break;
                }
                // The database, not Redis, could not say: this call is
                // decided locally, and Redis is not backed off from.
                Err(LeaseError::Seed(why)) => {
                    tracing::debug!(key_id = %key_id, error = %why, "no seed for the fleet's balance");
                    break;
                }
            }
        }
        self.metrics.credit_fallback_decisions.inc();
        Spend::Unavailable
    }

    /// The decision held credits allow, if any; starts a top-up when they
    /// run below half of the last lease.
    fn settle(
        self: &Arc<Self>,
        wallet: &Arc<Wallet>,
        key_id: &Arc<str>,
        epoch: i64,
        cost: i64,
        now: u128,
    ) -> Option<Spend> {
        let mut held = wallet.held.lock().unwrap_or_else(PoisonError::into_inner);
        match held.take(epoch, cost, now)? {
            Err(left) => Some(Spend::Refused(left)),
            Ok(left) => {
                self.top_up_if_low(&mut held, wallet, key_id, epoch, now);
                Some(Spend::Paid(left))
            }
        }
    }

    /// Starts one background lease when held credits fall below half of
    /// the last lease and the fleet has more.
    fn top_up_if_low(
        self: &Arc<Self>,
        held: &mut Held,
        wallet: &Arc<Wallet>,
        key_id: &Arc<str>,
        epoch: i64,
        now: u128,
    ) {
        if held.credits * 2 >= held.lease || held.left == 0 || held.topping_up {
            return;
        }
        held.topping_up = true;
        let (me, wallet, key_id) = (Arc::clone(self), Arc::clone(wallet), Arc::clone(key_id));
        tokio::spawn(async move {
            {
                let _asking = wallet.asking.lock().await;
                if !me.backoff.skipping(now)
                    && let Err(LeaseError::Redis(e)) = me.lease(&wallet, &key_id, epoch, 0, 0, now).await
                {
                    me.backoff.failed(now, &e);
                }
            }
            wallet.held.lock().unwrap_or_else(PoisonError::into_inner).topping_up = false;
        });
    }

    /// Leases at least `need` credits (0: a top-up of whatever size the
    /// fleet's balance allows), seeding Redis from the database if it has
    /// no entry of this epoch, then pays `cost` from what is held. `Some`
    /// is the call's decision; `None` is none: a top-up, or what is held
    /// fell short or changed meanwhile.
    async fn lease(
        &self,
        wallet: &Wallet,
        key_id: &str,
        epoch: i64,
        need: i64,
        cost: i64,
        now: u128,
    ) -> Result<Option<Result<i64, i64>>, LeaseError> {
        let keys = [entry_key(key_id)];
        let (mut epoch, mut seed) = (epoch, -1);
        let answer = loop {
            let args = [LEASE, epoch, seed, need, MAX_LEASE, LIFETIME_MS];
            let answer: Vec<i64> = self.redis.eval(&SCRIPT, &keys, &args).await?;
            let [wants_seed, granted, left, at_epoch, born] = answer[..] else {
                return Err(LeaseError::Redis(FleetError::Command(format!(
                    "the credits script answered {} numbers, not 5",
                    answer.len()
                ))));
            };
            if wants_seed == 0 {
                break (granted, left, at_epoch, born);
            }
            if seed >= 0 {
                return Err(LeaseError::Redis(FleetError::Command(
                    "the credits script refused its seed".into(),
                )));
            }
            // Absent or older in Redis: seed it with the balance as stored now.
            match self.seed(key_id).await? {
                Some((remaining, stored_epoch)) => (seed, epoch) = (remaining.max(0), stored_epoch),
                // The key lost its credits since its state was read.
                None => return Ok(None),
            }
        };
        let (granted, left, at_epoch, born) = answer;
        let mut held = wallet.held.lock().unwrap_or_else(PoisonError::into_inner);
        if at_epoch < held.epoch {
            // A newer balance was set while asking: these credits belong to
            // the old one.
            return Ok(None);
        }
        if (at_epoch, born) != (held.epoch, held.born) {
            // Set outright, or lost and seeded again: what is held belongs
            // to the old entry.
            held.credits = 0;
        }
        held.epoch = at_epoch;
        held.born = born;
        held.credits += granted;
        held.left = left;
        held.lease = held.credits;
        let refused = need > 0 && granted == 0;
        held.refused_until = if refused { now + RETRY_US } else { 0 };
        self.metrics.credit_lease_refills.inc();
        self.metrics.credits_leased.inc_by(u64::try_from(granted).unwrap_or(0));
        self.backoff.recovered();
        if cost == 0 {
            return Ok(None);
        }
        if held.credits < cost {
            return Ok(refused.then_some(Err(held.credits + held.left)));
        }
        held.credits -= cost;
        held.used_at = now;
        Ok(Some(Ok(held.credits + held.left)))
    }

    /// The stored balance and epoch to seed Redis with, read through
    /// Verify's database lane.
    async fn seed(&self, key_id: &str) -> Result<Option<(i64, i64)>, LeaseError> {
        let lane = self.lane.acquire().await.map_err(|e| LeaseError::Seed(e.to_string()))?;
        let stored = self.store.credit_epoch(key_id).await;
        drop(lane);
        stored.map_err(|e| LeaseError::Seed(format!("reading the balance to seed Redis with: {e}")))
    }

    /// Gives credits unused for [`IDLE_US`] (all of them if `all`) back to
    /// the fleet, and forgets keys that hold nothing. Credits that cannot
    /// be returned stay held (their wallet is kept: it was in use).
    pub async fn return_idle(&self, all: bool) -> usize {
        let now = now_us();
        let mut idle = Vec::new();
        for shard in &self.shards {
            let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            shard.retain(|key_id, wallet| {
                let mut held = wallet.held.lock().unwrap_or_else(PoisonError::into_inner);
                let unused = all || held.used_at + IDLE_US <= now;
                if held.credits > 0 && unused {
                    idle.push((Arc::clone(key_id), Arc::clone(wallet), *held));
                    held.credits = 0;
                    held.lease = 0;
                }
                held.credits > 0 || !unused || held.topping_up || Arc::strong_count(wallet) > 1
            });
        }
        let mut returned = 0;
        for (key_id, wallet, was) in idle {
            let args = [RETURN, was.epoch, was.born, was.credits];
            match self.redis.eval::<i64, _>(&SCRIPT, &[entry_key(&key_id)], &args).await {
                Ok(_) => {
                    returned += 1;
                    self.metrics.credits_returned.inc_by(u64::try_from(was.credits).unwrap_or(0));
                }
                Err(e) => {
                    tracing::debug!(error = %e, "could not return idle credits; holding them");
                    let mut held = wallet.held.lock().unwrap_or_else(PoisonError::into_inner);
                    if (held.epoch, held.born) == (was.epoch, was.born) {
                        held.credits += was.credits;
                    }
                }
            }
        }
        returned
    }

    /// The lease returns as a background task ([`LeasedCredits::run`]).
    pub fn task(self: &Arc<Self>) -> Task {
        let credits = Arc::clone(self);
        Task::helper("credit lease returns", move |stop| Arc::clone(&credits).run(stop))
    }

    /// Returns idle credits every second until `stop`, then all of them.
    pub async fn run(self: Arc<Self>, stop: impl Future<Output = ()>) {
        tokio::pin!(stop);
        let mut ticker = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tokio::select! {
                () = &mut stop => break,
                _ = ticker.tick() => { self.return_idle(false).await; }
            }
        }
        let keys = self.return_idle(true).await;
        tracing::info!(keys, "returned held credits to the fleet");
    }

    /// Whether calls decide on the replica's own view because Redis cannot
    /// grant leases.
    pub fn degraded(&self) -> bool {
        self.backoff.degraded()
    }

    fn wallet(&self, key_id: &Arc<str>) -> Arc<Wallet> {
        let shard = &self.shards[self.hasher.hash_one(key_id) as usize % SHARDS];
        let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
        let wallet = shard.entry(Arc::clone(key_id)).or_insert_with(|| {
            Arc::new(Wallet { held: Mutex::new(Held::default()), asking: tokio::sync::Mutex::new(()) })
        });
        Arc::clone(wallet)
    }
}

#[cfg(test)]
mod tests {
    // Tests read the real clock to build their inputs.
    #![allow(clippy::disallowed_methods)]

    use super::*;
    use crate::{
        config::FleetSettings,
        keys::{Credits, KeyHasher, KeyPrefix, PlainKey},
        store::{audit::tests::TestRow, keys::NewKey},
    };
    use secrecy::SecretString;

    /// The seed is read on the Verify path, so it waits for Verify's
    /// database lane like any other read there; a lane that stays busy
    /// decides the call locally, and Redis, which did nothing wrong, is not
    /// backed off from. (Before, the seed went to the pool directly, and a
    /// failed read backed the whole fleet tier off.)
    #[tokio::test]
    async fn the_seed_read_waits_for_verifys_lane_and_a_busy_lane_is_not_a_redis_failure() {
        let (store, _dir) = crate::store::temp_sqlite_store().await;
        let key_id = uuid::Uuid::now_v7().to_string();
        let hasher = KeyHasher::from_base64("MTExMTExMTExMTExMTExMTExMTExMTExMTExMTExMTE=").unwrap();
        let plain = PlainKey::generate(&KeyPrefix::default()).unwrap();
        let now = chrono::Utc::now();
        let new = NewKey {
            id: key_id.clone(),
            merchant_id: "m1".into(),
            name: "metered".into(),
            prefix: plain.lookup_prefix().as_str().to_owned(),
            hash: hasher.hash(&plain).unwrap(),
            scopes: vec!["sales:read".into()],
            allowed_cidrs: Vec::new(),
            rate_limits: Default::default(),
            credits: Some(Credits { remaining: 100, refill: None }),
            metadata: Default::default(),
            expires_at: None,
            created_at: now,
            created_by: "test".into(),
        };
        let event = crate::store::events::NewEvent {
            id: uuid::Uuid::now_v7().to_string(),
            kind: "key.created",
            merchant_id: "m1".into(),
            key_id: key_id.clone(),
            time: now,
            occasion: None,
            body: "{}".into(),
        };
        let stored = store.insert_key(new, TestRow::at("created", now), event).await.unwrap();
        let url =
            std::env::var("KEYWARDEN_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let settings = FleetSettings {
            redis_url: SecretString::from(url),
            redis_password: None,
            redis_cluster: false,
            redis_ca_pem: None,
            redis_timeout: std::time::Duration::from_secs(2),
            fleet_secret: SecretString::from("s".repeat(32)),
            warm_start_ttl: std::time::Duration::from_secs(60),
        };
        let metrics = Arc::new(Metrics::default());
        let redis = Redis::start(&settings, Arc::clone(&metrics)).unwrap();
        // It connects in the background; a call before then is a Redis failure.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !redis.connected() {
            assert!(std::time::Instant::now() < deadline, "Redis at the test URL did not connect");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let lane = DbLane::new(1, std::time::Duration::from_millis(20));
        let credits = Arc::new(LeasedCredits::new(Arc::clone(&redis), store, lane.clone(), metrics));
        let key: Arc<str> = key_id.as_str().into();

        let busy = lane.acquire().await.unwrap();
        assert_eq!(credits.spend(&key, stored.credits_epoch, 1).await, Spend::Unavailable);
        assert!(!credits.degraded(), "a busy database lane is not Redis failing");
        drop(busy);
        assert_eq!(credits.spend(&key, stored.credits_epoch, 1).await, Spend::Paid(99));
        redis.run::<()>(redis::cmd("DEL").arg(entry_key(&key_id))).await.unwrap();
    }

    #[test]
    fn held_credits_pay_until_short_then_a_new_epoch_drops_them() {
        let mut held = Held { epoch: 3, credits: 5, left: 90, lease: 5, ..Held::default() };
        assert_eq!(held.take(3, 2, 10), Some(Ok(93)));
        assert_eq!(held.take(3, 4, 10), None, "3 held cannot pay 4: lease");
        assert_eq!(held.take(2, 3, 10), Some(Ok(90)), "an older epoch in the caller's state still pays");
        held.credits = 6;
        assert_eq!(held.take(4, 1, 10), None, "set outright since: held credits are dropped");
        assert_eq!((held.epoch, held.credits), (4, 0));
    }

    #[test]
    fn a_recent_refusal_answers_without_asking_unless_less_is_asked() {
        let mut held = Held { epoch: 1, credits: 1, left: 2, refused_until: 1_000, ..Held::default() };
        assert_eq!(held.take(1, 5, 500), Some(Err(3)), "4 more than held, 2 left: refused");
        assert_eq!(held.take(1, 3, 500), None, "2 more than held, 2 left: ask");
        assert_eq!(held.take(1, 5, 1_000), None, "the refusal is old: ask");
    }
}
