//! Usage counters: request_count, denied_count and last_used_at per key,
//! and the credits each key has spent.
//!
//! Verify only touches an in-memory map; a flusher adds the accumulated
//! deltas to the key rows at least once per interval (`n = n + delta`, so
//! replicas never overwrite each other). Each flush gets an id that the store
//! records in the same transaction, and a flush that failed is retried as the
//! same batch under the same id: an outage delays counts but loses none, and
//! a commit whose acknowledgement was lost is not counted twice.
//!
//! Credits ride in the same batches (`credits_remaining - spent`), so they
//! are exactly as durable. This replica's view of a balance is the last
//! stored balance it read (from the key's state, or returned by its own
//! flush, whichever was written later by `credits_seq`) minus what it has
//! spent and not yet had confirmed; so its own spending is never counted
//! twice or missed, and other replicas' spending reaches it with each of
//! its flushes.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use chrono::{DateTime, Utc};
use tokio::sync::Mutex as AsyncMutex;

use crate::keys::credits::Balance;
use crate::store::{
    Store, StoreError,
    keys::{SyncedBalance, UsageApplied, UsageDelta},
};

/// Deltas taken out of the map for one flush, and the id that makes
/// applying them idempotent.
#[derive(Debug)]
struct Flush {
    id: String,
    deltas: HashMap<String, UsageDelta>,
}

impl Flush {
    fn rows(&self) -> Vec<(&str, UsageDelta)> {
        self.deltas.iter().map(|(k, d)| (k.as_str(), *d)).collect()
    }
}

#[derive(Debug)]
pub struct UsageTracker {
    store: Store,
    pending: Mutex<HashMap<String, UsageDelta>>,
    /// The batch being written, or not yet known to be written. It stays
    /// here until the store confirms it, so a flush that fails or is
    /// cancelled mid-write is retried whole, under its own id.
    in_flight: Mutex<Option<Arc<Flush>>>,
    /// Held while a flush is in flight, so readers never see a delta both in
    /// memory and in the database, or in neither.
    flushing: AsyncMutex<()>,
    last_flushed: Mutex<std::time::Instant>,
    /// This replica's view of the balances of keys with credits it spent.
    credits: Mutex<HashMap<String, Ledger>>,
}

/// A balance as last read, and what this replica has spent from it since
/// that is not yet confirmed written.
#[derive(Debug, Clone, Copy)]
struct Ledger {
    known: i64,
    seq: i64,
    unconfirmed: i64,
}

impl UsageTracker {
    pub fn new(store: Store) -> Arc<Self> {
        Arc::new(Self {
            store,
            pending: Mutex::new(HashMap::new()),
            in_flight: Mutex::new(None),
            flushing: AsyncMutex::new(()),
            last_flushed: Mutex::new(std::time::Instant::now()),
            credits: Mutex::new(HashMap::new()),
        })
    }

    /// Takes `cost` credits from `key_id`, whose state says `balance`, or
    /// nothing if what is left cannot pay it. `Ok` is the balance after,
    /// `Err` the balance that could not pay (never below 0).
    pub fn spend(&self, key_id: &str, balance: Balance, cost: i64) -> Result<i64, i64> {
        self.with_ledger(key_id, balance, |ledger| {
            let available = ledger.known - ledger.unconfirmed;
            if available < cost {
                return Err(available.max(0));
            }
            ledger.unconfirmed += cost;
            Ok(available - cost)
        })
        .inspect(|_| self.with_delta(key_id, |d| d.spent += cost))
    }

    /// Records `cost` credits spent that something else (a lease of the
    /// fleet's shared balance) already decided `key_id` could pay.
    pub fn record_spent(&self, key_id: &str, balance: Balance, cost: i64) {
        self.with_ledger(key_id, balance, |ledger| ledger.unconfirmed += cost);
        self.with_delta(key_id, |d| d.spent += cost);
    }

    fn with_ledger<T>(&self, key_id: &str, balance: Balance, f: impl FnOnce(&mut Ledger) -> T) -> T {
        let mut ledgers = self.credits.lock().unwrap_or_else(PoisonError::into_inner);
        let ledger = match ledgers.get_mut(key_id) {
            Some(ledger) => ledger,
            None => ledgers.entry(key_id.to_owned()).or_insert(Ledger {
                known: balance.remaining,
                seq: balance.seq,
                unconfirmed: 0,
            }),
        };
        // While a batch with this key's spending is unconfirmed, a newer
        // reading may or may not include it: the batch's confirmation
        // brings the balance instead.
        if balance.seq > ledger.seq && !self.spending_in_flight(key_id) {
            ledger.known = balance.remaining;
            ledger.seq = balance.seq;
        }
        f(ledger)
    }

    fn spending_in_flight(&self, key_id: &str) -> bool {
        self.in_flight().is_some_and(|f| f.deltas.get(key_id).is_some_and(|d| d.spent > 0))
    }

    /// A written batch's spending is no longer unconfirmed, and the
    /// balances read back replace older readings.
    fn confirm(&self, flush: &Flush, balances: &[SyncedBalance]) {
        {
            let mut ledgers = self.credits.lock().unwrap_or_else(PoisonError::into_inner);
            for (key_id, delta) in flush.deltas.iter().filter(|(_, d)| d.spent > 0) {
                if let Some(ledger) = ledgers.get_mut(key_id) {
                    ledger.unconfirmed -= delta.spent;
                }
            }
        }
        self.sync(balances);
    }

    /// Balances as a write left them (a flush, a refill) replace older
    /// readings of keys this replica has spent from.
    pub fn sync(&self, balances: &[SyncedBalance]) {
        let mut ledgers = self.credits.lock().unwrap_or_else(PoisonError::into_inner);
        for b in balances {
            if let (Some(ledger), Some(remaining)) = (ledgers.get_mut(&b.key_id), b.remaining)
                && b.seq > ledger.seq
            {
                ledger.known = remaining;
                ledger.seq = b.seq;
            }
        }
    }

    /// Confirms a batch found already written (its acknowledgement was
    /// lost), reading back the balances it touched.
    async fn confirm_applied(&self, flush: &Flush) -> Result<(), StoreError> {
        let spent: Vec<&str> =
            flush.deltas.iter().filter(|(_, d)| d.spent > 0).map(|(k, _)| k.as_str()).collect();
        let balances = if spent.is_empty() { Vec::new() } else { self.store.credit_balances(&spent).await? };
        self.confirm(flush, &balances);
        Ok(())
    }

    fn with_delta(&self, key_id: &str, f: impl FnOnce(&mut UsageDelta)) {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        match pending.get_mut(key_id) {
            Some(delta) => f(delta),
            None => f(pending.entry(key_id.to_owned()).or_default()),
        }
    }

    pub fn record_allowed(&self, key_id: &str, at: DateTime<Utc>) {
        self.with_delta(key_id, |d| {
            d.allowed += 1;
            d.last_used_at = d.last_used_at.max(Some(at));
        });
    }

    pub fn record_denied(&self, key_id: &str) {
        self.with_delta(key_id, |d| d.denied += 1);
    }

    /// Time since everything in memory was last written.
    pub fn since_last_flush(&self) -> Duration {
        self.last_flushed.lock().unwrap_or_else(PoisonError::into_inner).elapsed()
    }

    /// Keys with unflushed usage (a key both in the map and in a batch not
    /// yet confirmed counts twice).
    pub fn pending_keys(&self) -> usize {
        let in_flight = self.in_flight().map_or(0, |f| f.deltas.len());
        self.pending.lock().unwrap_or_else(PoisonError::into_inner).len() + in_flight
    }

    /// Whether a flush is running now (for tests and diagnostics).
    pub fn flush_in_progress(&self) -> bool {
        self.flushing.try_lock().is_err()
    }

    fn in_flight(&self) -> Option<Arc<Flush>> {
        self.in_flight.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Holds off flushes while the guard lives, so a database read plus
    /// [`Self::pending`] counts every use exactly once. A batch left
    /// unconfirmed by a failed or cancelled flush may have been committed
    /// with only its acknowledgement lost; the store is asked first (its
    /// flush id is there or not), and such a batch is confirmed here rather
    /// than shown both in memory and in the database until its retry.
    pub async fn pause_flush(&self) -> Result<tokio::sync::MutexGuard<'_, ()>, StoreError> {
        let guard = self.flushing.lock().await;
        if let Some(flush) = self.in_flight()
            && self.store.usage_flush_applied(&flush.id).await?
        {
            tracing::info!(flush_id = %flush.id, keys = flush.deltas.len(), "an unacknowledged usage flush had been applied; confirmed");
            self.confirm_applied(&flush).await?;
            *self.in_flight.lock().unwrap_or_else(PoisonError::into_inner) = None;
        }
        Ok(guard)
    }

    /// Usage of `key_id` not yet confirmed written to the database.
    pub fn pending(&self, key_id: &str) -> UsageDelta {
        let mut total = self
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key_id)
            .copied()
            .unwrap_or_default();
        if let Some(delta) = self.in_flight().and_then(|f| f.deltas.get(key_id).copied()) {
            total.allowed += delta.allowed;
            total.denied += delta.denied;
            total.last_used_at = total.last_used_at.max(delta.last_used_at);
            total.spent += delta.spent;
        }
        total
    }

    /// Writes everything accumulated so far: first a batch left over from a
    /// failed or cancelled attempt (under its original id), then what has
    /// accumulated since. Returns the number of key rows written. Safe to
    /// cancel: an unconfirmed batch stays queued for the next call.
    pub async fn flush(&self) -> Result<usize, StoreError> {
        let _flush = self.flushing.lock().await;
        let mut written = 0;
        // At most one left-over batch and one fresh one, so a flush ends
        // even while uses keep arriving.
        while let Some((flush, fresh)) = self.next_batch() {
            match self.store.apply_usage(&flush.id, &flush.rows()).await? {
                UsageApplied::Applied(balances) => self.confirm(&flush, &balances),
                UsageApplied::AlreadyApplied => {
                    tracing::info!(flush_id = %flush.id, keys = flush.deltas.len(), "usage flush had already been applied; not counted again");
                    self.confirm_applied(&flush).await?;
                }
            }
            *self.in_flight.lock().unwrap_or_else(PoisonError::into_inner) = None;
            written += flush.deltas.len();
            if fresh {
                break;
            }
        }
        *self.last_flushed.lock().unwrap_or_else(PoisonError::into_inner) = std::time::Instant::now();
        Ok(written)
    }

    /// The unconfirmed batch if there is one (not fresh), else what has
    /// accumulated, moved into the in-flight slot under a new id (fresh).
    fn next_batch(&self) -> Option<(Arc<Flush>, bool)> {
        let mut slot = self.in_flight.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(flush) = &*slot {
            return Some((Arc::clone(flush), false));
        }
        let deltas = std::mem::take(&mut *self.pending.lock().unwrap_or_else(PoisonError::into_inner));
        if deltas.is_empty() {
            return None;
        }
        let flush = Arc::new(Flush { id: uuid::Uuid::now_v7().to_string(), deltas });
        *slot = Some(Arc::clone(&flush));
        Some((flush, true))
    }

    /// Flushes every `interval` until `stop` resolves, then flushes what is
    /// left, retrying until `final_deadline` passes. Returns how many keys'
    /// counts could not be written (0 is the only good answer).
    pub async fn run(
        self: Arc<Self>,
        interval: Duration,
        stop: impl Future<Output = ()>,
        final_deadline: Duration,
    ) -> usize {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                () = &mut stop => break,
            }
            // A flush stuck on a lock gives way to shutdown; what it was
            // writing stays unconfirmed and goes into the final flush.
            tokio::select! {
                result = self.flush() => if let Err(e) = result {
                    tracing::warn!(error = %e, pending_keys = self.pending_keys(), "usage flush failed; will retry");
                },
                () = &mut stop => break,
            }
        }
        // Each attempt is cut at the deadline too: one stuck on a lock must
        // not hold shutdown. Its batch stays unconfirmed and is reported.
        let give_up = tokio::time::Instant::now() + final_deadline;
        loop {
            let error = match tokio::time::timeout_at(give_up, self.flush()).await {
                Ok(Ok(_)) => return 0,
                Ok(Err(e)) => e.to_string(),
                Err(_) => "the final attempt did not finish in time".to_owned(),
            };
            if tokio::time::Instant::now() < give_up {
                tracing::warn!(error = %error, "final usage flush failed; retrying");
                tokio::time::sleep(Duration::from_millis(250)).await;
            } else {
                let lost = self.pending_keys();
                tracing::error!(error = %error, pending_keys = lost, "usage counts could not be written before shutdown");
                return lost;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    async fn tracker() -> (Arc<UsageTracker>, tempfile::TempDir) {
        let (store, dir) = crate::store::temp_sqlite_store().await;
        (UsageTracker::new(store), dir)
    }

    async fn key_row(store: &Store, id: &str) {
        use sea_orm::ConnectionTrait;
        store
            .db()
            .execute_unprepared(&format!(
                "INSERT INTO api_keys (id, merchant_id, name, prefix, key_hash, scopes, allowed_cidrs, \
                 created_at, created_by, updated_at) VALUES ('{id}', 'm', 'n', 'sntr_{id}', 'v1$s$h', '', '', \
                 '2026-11-28T00:00:00Z', 'test', '2026-11-28T00:00:00Z')"
            ))
            .await
            .unwrap();
    }

    async fn stored_count(store: &Store, id: &str) -> i64 {
        use sea_orm::{ConnectionTrait, Statement};
        let sql = format!("SELECT request_count FROM api_keys WHERE id = '{id}'");
        let row = store.db().query_one_raw(Statement::from_string(store.db_backend(), sql)).await.unwrap();
        row.unwrap().try_get("", "request_count").unwrap()
    }

    /// Three uses taken into a batch, as a flush does before writing it.
    async fn batch_of_three(tracker: &UsageTracker) -> Arc<Flush> {
        key_row(&tracker.store, "k1").await;
        for _ in 0..3 {
            tracker.record_allowed("k1", Utc::now());
        }
        let (flush, fresh) = tracker.next_batch().unwrap();
        assert!(fresh);
        flush
    }

    /// The commit landed but its acknowledgement was lost: the next reader
    /// finds the flush id in the store, so the uses are shown once (from
    /// the database) and never written a second time.
    #[tokio::test]
    async fn a_batch_committed_without_acknowledgement_is_shown_and_counted_once() {
        let (tracker, _dir) = tracker().await;
        let flush = batch_of_three(&tracker).await;
        assert!(matches!(
            tracker.store.apply_usage(&flush.id, &flush.rows()).await.unwrap(),
            UsageApplied::Applied(_)
        ));
        assert_eq!(tracker.pending("k1").allowed, 3, "still unconfirmed in memory");

        let pause = tracker.pause_flush().await.unwrap();
        assert_eq!(stored_count(&tracker.store, "k1").await + tracker.pending("k1").allowed, 3);
        drop(pause);
        assert_eq!(tracker.flush().await.unwrap(), 0, "nothing left to write");
        assert_eq!(stored_count(&tracker.store, "k1").await, 3);
    }

    /// The write never committed: the uses stay in memory, shown once,
    /// until the next flush writes them.
    #[tokio::test]
    async fn a_batch_that_never_committed_stays_pending_until_written() {
        let (tracker, _dir) = tracker().await;
        let _flush = batch_of_three(&tracker).await;

        let pause = tracker.pause_flush().await.unwrap();
        assert_eq!(stored_count(&tracker.store, "k1").await, 0);
        assert_eq!(tracker.pending("k1").allowed, 3);
        drop(pause);
        assert_eq!(tracker.flush().await.unwrap(), 1);
        assert_eq!(stored_count(&tracker.store, "k1").await, 3);
        assert_eq!(tracker.pending("k1").allowed, 0);
    }

    /// A batch whose commit may have landed unacknowledged is in some
    /// readings of the balance and not in others: until it is confirmed,
    /// readings are not taken, so its spending is never subtracted twice.
    #[test]
    fn spending_in_an_unconfirmed_batch_is_counted_once_and_a_refill_replaces_the_balance() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let (tracker, _dir) = rt.block_on(tracker());
        assert_eq!(tracker.spend("k1", Balance { remaining: 100, seq: 0, epoch: 0 }, 30), Ok(70));
        assert_eq!(
            tracker.spend("k1", Balance { remaining: 100, seq: 0, epoch: 0 }, 71),
            Err(70),
            "nothing taken"
        );
        let (flush, _) = tracker.next_batch().unwrap();
        // A reading that includes the unconfirmed batch is not taken yet.
        assert_eq!(tracker.spend("k1", Balance { remaining: 70, seq: 1, epoch: 0 }, 5), Ok(65));
        let written = SyncedBalance { key_id: "k1".into(), remaining: Some(70), seq: 1 };
        tracker.confirm(&flush, &[written]);
        *tracker.in_flight.lock().unwrap() = None;
        assert_eq!(tracker.spend("k1", Balance { remaining: 70, seq: 1, epoch: 0 }, 5), Ok(60));
        assert_eq!(tracker.pending("k1").spent, 10);
        tracker.sync(&[SyncedBalance { key_id: "k1".into(), remaining: Some(500), seq: 3 }]);
        assert_eq!(
            tracker.spend("k1", Balance { remaining: 70, seq: 1, epoch: 0 }, 1),
            Ok(489),
            "500 less 11 unflushed"
        );
    }

    /// Uses recorded without pause (far faster than any write) must not keep
    /// one flush going for ever: it writes what it found and returns.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flush_ends_while_uses_keep_arriving() {
        let (tracker, _dir) = tracker().await;
        let stop = Arc::new(AtomicBool::new(false));
        let load = tokio::spawn({
            let (tracker, stop) = (tracker.clone(), stop.clone());
            async move {
                while !stop.load(Ordering::Relaxed) {
                    for _ in 0..100 {
                        tracker.record_allowed("k1", Utc::now());
                    }
                    tokio::task::yield_now().await;
                }
            }
        });
        while tracker.pending_keys() == 0 {
            tokio::task::yield_now().await;
        }
        let flushed = tokio::time::timeout(Duration::from_secs(10), tracker.flush()).await;
        stop.store(true, Ordering::Relaxed);
        load.await.unwrap();
        assert_eq!(flushed.expect("the flush ended").unwrap(), 1);
    }
}
