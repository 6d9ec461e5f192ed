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
//! A batch the database cannot take (an error, or slower than the spill
//! bound) is spilled to local disk ([`spill`]), and so is what accumulates
//! while the outage lasts, merged into one batch never yet attempted. A
//! process killed meanwhile loses nothing spilled: the next one applies the
//! spilled batches under their flush ids before it serves.
//!
//! Credits ride in the same batches (`credits_remaining - spent`), so they
//! are exactly as durable. This replica's view of a balance is the last
//! stored balance it read (from the key's state, or returned by its own
//! flush, whichever was written later by `credits_seq`) minus what it has
//! spent and not yet had confirmed; so its own spending is never counted
//! twice or missed, and other replicas' spending reaches it with each of
//! its flushes.

pub mod spill;

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use chrono::{DateTime, Utc};
use tokio::sync::Mutex as AsyncMutex;

use crate::clock::DbClock;
use crate::keys::credits::Balance;
use crate::store::{
    Store, StoreError,
    usage::{SyncedBalance, UsageApplied, UsageDelta},
};
use crate::task::Task;

use self::spill::Spill;

/// Deltas taken out of the map for one flush, and the id that makes
/// applying them idempotent.
#[derive(Debug)]
struct Flush {
    id: String,
    deltas: HashMap<String, UsageDelta>,
    /// Sent to the database at least once: it may have committed with
    /// only its acknowledgement lost, so it is never merged into again.
    attempted: AtomicBool,
    /// On the spill, as it is now.
    spilled: AtomicBool,
}

impl Flush {
    fn new(id: String, deltas: HashMap<String, UsageDelta>) -> Self {
        Self { id, deltas, attempted: AtomicBool::new(false), spilled: AtomicBool::new(false) }
    }

    fn rows(&self) -> Vec<(&str, UsageDelta)> {
        self.deltas.iter().map(|(k, d)| (k.as_str(), *d)).collect()
    }

    fn attempted(&self) -> bool {
        self.attempted.load(Ordering::Acquire)
    }
}

/// Why spilled usage could not be applied at start.
#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    #[error("reading the usage spill: {0}")]
    Read(std::io::Error),
    #[error("applying spilled usage batch {0}: {1}")]
    Apply(String, StoreError),
    #[error("removing spilled usage batch {0}: {1}")]
    Remove(String, std::io::Error),
}

fn add(total: &mut UsageDelta, delta: &UsageDelta) {
    total.allowed += delta.allowed;
    total.denied += delta.denied;
    total.last_used_at = total.last_used_at.max(delta.last_used_at);
    total.spent += delta.spent;
}

#[derive(Debug)]
pub struct UsageTracker {
    store: Store,
    pending: Mutex<HashMap<String, UsageDelta>>,
    /// Batches taken out of `pending` and not yet known to be written,
    /// oldest first. A batch stays here until the store confirms it, so a
    /// flush that fails or is cancelled mid-write is retried whole, under
    /// its own id. Only the oldest is ever attempted; behind it at most one
    /// more, spilled during an outage and still growing.
    queue: Mutex<VecDeque<Arc<Flush>>>,
    /// Where batches go while the database cannot take them; `None` when
    /// the replica keeps no local state (the spool is off).
    spill: Option<Spill>,
    /// Stamps the flush ids the store remembers.
    clock: Arc<DbClock>,
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
    pub fn new(store: Store, spill: Option<Spill>, clock: Arc<DbClock>) -> Arc<Self> {
        Arc::new(Self {
            store,
            clock,
            pending: Mutex::new(HashMap::new()),
            queue: Mutex::new(VecDeque::new()),
            spill,
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

    /// Whether an attempted batch (possibly committed, unacknowledged)
    /// holds spending of `key_id`.
    fn spending_in_flight(&self, key_id: &str) -> bool {
        self.attempted().is_some_and(|f| f.deltas.get(key_id).is_some_and(|d| d.spent > 0))
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
        let queued: usize = self.lock_queue().iter().map(|f| f.deltas.len()).sum();
        self.pending.lock().unwrap_or_else(PoisonError::into_inner).len() + queued
    }

    /// Keys with unflushed usage held only in memory: neither written nor
    /// spilled, so a kill now would lose it.
    pub fn unsaved_keys(&self) -> usize {
        let queued: usize = self
            .lock_queue()
            .iter()
            .filter(|f| !f.spilled.load(Ordering::Acquire))
            .map(|f| f.deltas.len())
            .sum();
        self.pending.lock().unwrap_or_else(PoisonError::into_inner).len() + queued
    }

    /// Whether a flush is running now (for tests and diagnostics).
    pub fn flush_in_progress(&self) -> bool {
        self.flushing.try_lock().is_err()
    }

    fn lock_queue(&self) -> std::sync::MutexGuard<'_, VecDeque<Arc<Flush>>> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The batch sent to the database and not yet confirmed, if any.
    fn attempted(&self) -> Option<Arc<Flush>> {
        self.lock_queue().front().filter(|f| f.attempted()).cloned()
    }

    /// Takes `flush` off the queue (confirmed) and off the spill.
    fn done(&self, flush: &Flush) {
        self.lock_queue().retain(|f| f.id != flush.id);
        if flush.spilled.load(Ordering::Acquire)
            && let Some(spill) = &self.spill
            && let Err(e) = spill.remove(&flush.id)
        {
            // Harmless: replayed at the next start, it is recognised by id.
            tracing::warn!(error = %e, flush_id = %flush.id, "could not remove a written usage batch from the spill");
        }
    }

    /// Holds off flushes while the guard lives, so a database read plus
    /// [`Self::pending`] counts every use exactly once. A batch left
    /// unconfirmed by a failed or cancelled flush may have been committed
    /// with only its acknowledgement lost; the store is asked first (its
    /// flush id is there or not), and such a batch is confirmed here rather
    /// than shown both in memory and in the database until its retry.
    pub async fn pause_flush(&self) -> Result<tokio::sync::MutexGuard<'_, ()>, StoreError> {
        let guard = self.flushing.lock().await;
        if let Some(flush) = self.attempted()
            && self.store.usage_flush_applied(&flush.id).await?
        {
            tracing::info!(flush_id = %flush.id, keys = flush.deltas.len(), "an unacknowledged usage flush had been applied; confirmed");
            self.confirm_applied(&flush).await?;
            self.done(&flush);
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
        for flush in self.lock_queue().iter() {
            if let Some(delta) = flush.deltas.get(key_id) {
                add(&mut total, delta);
            }
        }
        total
    }

    /// Writes everything accumulated so far: first the batches left over
    /// from failed or cancelled attempts or spilled during an outage (each
    /// under its own id), then what has accumulated since. Returns the
    /// number of key rows written. Safe to cancel: an unconfirmed batch
    /// stays queued for the next call.
    pub async fn flush(&self) -> Result<usize, StoreError> {
        let _flush = self.flushing.lock().await;
        let mut written = 0;
        // The queue holds at most two batches (the attempted one, and one
        // that `spill` grows behind it), so with one fresh batch a flush
        // ends even while uses keep arriving.
        let mut taken_fresh = false;
        while let Some((flush, fresh)) = self.next_batch(!taken_fresh) {
            taken_fresh |= fresh;
            self.write(&flush).await?;
            self.done(&flush);
            written += flush.deltas.len();
        }
        *self.last_flushed.lock().unwrap_or_else(PoisonError::into_inner) = std::time::Instant::now();
        Ok(written)
    }

    async fn write(&self, flush: &Flush) -> Result<(), StoreError> {
        match self.store.apply_usage(&flush.id, self.clock.now(), &flush.rows()).await? {
            UsageApplied::Applied(balances) => self.confirm(flush, &balances),
            UsageApplied::AlreadyApplied => {
                tracing::info!(flush_id = %flush.id, keys = flush.deltas.len(), "usage flush had already been applied; not counted again");
                self.confirm_applied(flush).await?;
            }
        }
        Ok(())
    }

    /// The oldest unconfirmed batch (not fresh), else, if `take_fresh`, what
    /// has accumulated under a new id (fresh); marked attempted either way.
    fn next_batch(&self, take_fresh: bool) -> Option<(Arc<Flush>, bool)> {
        let mut queue = self.lock_queue();
        if let Some(flush) = queue.front() {
            flush.attempted.store(true, Ordering::Release);
            return Some((Arc::clone(flush), false));
        }
        if !take_fresh {
            return None;
        }
        let deltas = std::mem::take(&mut *self.pending.lock().unwrap_or_else(PoisonError::into_inner));
        if deltas.is_empty() {
            return None;
        }
        let flush = Arc::new(Flush::new(uuid::Uuid::now_v7().to_string(), deltas));
        flush.attempted.store(true, Ordering::Release);
        queue.push_back(Arc::clone(&flush));
        Some((flush, true))
    }

    /// Puts everything unwritten on the spill: the unconfirmed batches not
    /// yet there, and what has accumulated, merged into the newest batch if
    /// that was never attempted (so an outage of any length leaves at most
    /// two files), else into a new one. Returns the keys still held only in
    /// memory (0 unless there is no spill or it cannot be written).
    pub fn spill(&self) -> usize {
        let Some(spill) = &self.spill else { return self.unsaved_keys() };
        let to_write: Vec<Arc<Flush>> = {
            let mut queue = self.lock_queue();
            let fresh = std::mem::take(&mut *self.pending.lock().unwrap_or_else(PoisonError::into_inner));
            if !fresh.is_empty() {
                match queue.back_mut() {
                    Some(newest) if !newest.attempted() => {
                        let mut deltas = newest.deltas.clone();
                        for (key_id, delta) in &fresh {
                            add(deltas.entry(key_id.clone()).or_default(), delta);
                        }
                        *newest = Arc::new(Flush::new(newest.id.clone(), deltas));
                    }
                    _ => queue.push_back(Arc::new(Flush::new(uuid::Uuid::now_v7().to_string(), fresh))),
                }
            }
            queue.iter().filter(|f| !f.spilled.load(Ordering::Acquire)).cloned().collect()
        };
        // Written outside the lock (Verify reads the queue for credits); the
        // spill is only ever called from the flusher's own task, so nothing
        // else writes or removes these files meanwhile.
        for flush in to_write {
            match spill.write(&flush.id, &flush.deltas) {
                Ok(()) => flush.spilled.store(true, Ordering::Release),
                Err(e) => {
                    tracing::error!(error = %e, flush_id = %flush.id, keys = flush.deltas.len(), "could not spill usage; it stays in memory only");
                }
            }
        }
        self.unsaved_keys()
    }

    /// Applies every batch a previous process spilled, under its own flush
    /// id (a batch whose commit landed before the kill is recognised), and
    /// removes it. Called before serving, so that balances read afterwards
    /// include what the previous process spent.
    pub async fn recover(&self) -> Result<usize, RecoverError> {
        let Some(spill) = &self.spill else { return Ok(0) };
        let (batches, unreadable) = spill.load().map_err(RecoverError::Read)?;
        for path in unreadable {
            tracing::error!(path = %path.display(), "an unreadable usage spill file was set aside; its counts are not applied");
        }
        let mut keys = 0;
        for batch in batches {
            let batch = Flush::new(batch.id, batch.deltas);
            let applied = self
                .store
                .apply_usage(&batch.id, self.clock.now(), &batch.rows())
                .await
                .map_err(|e| RecoverError::Apply(batch.id.clone(), e))?;
            if matches!(applied, UsageApplied::AlreadyApplied) {
                tracing::info!(flush_id = %batch.id, "a spilled usage batch had already been applied; not counted again");
            }
            spill.remove(&batch.id).map_err(|e| RecoverError::Remove(batch.id.clone(), e))?;
            keys += batch.deltas.len();
        }
        if keys > 0 {
            tracing::info!(keys, "applied usage a previous process had spilled");
        }
        Ok(keys)
    }

    /// The flusher as a background task ([`UsageTracker::run`]).
    pub fn flusher(
        self: &Arc<Self>,
        interval: Duration,
        spill_after: Duration,
        final_deadline: Duration,
    ) -> Task {
        let usage = Arc::clone(self);
        Task::flusher("usage flusher", "usage of {n} keys", move |stop| {
            Arc::clone(&usage).run(interval, spill_after, stop, final_deadline)
        })
    }

    /// Flushes every `interval` until `stop` resolves, then flushes what is
    /// left, retrying until `final_deadline` passes. An attempt that fails
    /// or takes longer than `spill_after` spills what is unwritten (and
    /// spills again each interval while it hangs). Returns how many keys'
    /// counts are neither written nor spilled (0 is the only good answer).
    pub async fn run(
        self: Arc<Self>,
        interval: Duration,
        spill_after: Duration,
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
            let attempt = self.flush();
            tokio::pin!(attempt);
            let mut spill_at = tokio::time::Instant::now() + spill_after;
            // A flush stuck on a lock gives way to shutdown; what it was
            // writing stays unconfirmed and goes into the final flush.
            let result = loop {
                tokio::select! {
                    result = &mut attempt => break Some(result),
                    () = tokio::time::sleep_until(spill_at) => {
                        self.spill();
                        spill_at = tokio::time::Instant::now() + interval.max(spill_after);
                    }
                    () = &mut stop => break None,
                }
            };
            match result {
                None => break,
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    let unsaved = self.spill();
                    tracing::warn!(error = %e, pending_keys = self.pending_keys(), unsaved_keys = unsaved, "usage flush failed; spilled, will retry");
                }
            }
        }
        // Each attempt is cut at the deadline too: one stuck on a lock must
        // not hold shutdown. Its batch stays unconfirmed and is spilled.
        let give_up = tokio::time::Instant::now() + final_deadline;
        loop {
            let error = match tokio::time::timeout_at(give_up, self.flush()).await {
                Ok(Ok(_)) => return 0,
                Ok(Err(e)) => e.to_string(),
                Err(_) => "the final attempt did not finish in time".to_owned(),
            };
            let unsaved = self.spill();
            if tokio::time::Instant::now() < give_up {
                tracing::warn!(error = %error, "final usage flush failed; retrying");
                tokio::time::sleep(Duration::from_millis(250)).await;
            } else if unsaved == 0 {
                tracing::warn!(error = %error, pending_keys = self.pending_keys(), "usage counts could not be written before shutdown; spilled, applied at the next start");
                return 0;
            } else {
                tracing::error!(error = %error, pending_keys = self.pending_keys(), unsaved_keys = unsaved, "usage counts could not be written or spilled before shutdown");
                return unsaved;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    async fn tracker() -> (Arc<UsageTracker>, tempfile::TempDir) {
        let (store, dir) = crate::store::temp_sqlite_store().await;
        (UsageTracker::new(store, None, Arc::default()), dir)
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
        let (flush, fresh) = tracker.next_batch(true).unwrap();
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
            tracker.store.apply_usage(&flush.id, Utc::now(), &flush.rows()).await.unwrap(),
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
        let (flush, _) = tracker.next_batch(true).unwrap();
        // A reading that includes the unconfirmed batch is not taken yet.
        assert_eq!(tracker.spend("k1", Balance { remaining: 70, seq: 1, epoch: 0 }, 5), Ok(65));
        let written = SyncedBalance { key_id: "k1".into(), remaining: Some(70), seq: 1 };
        tracker.confirm(&flush, &[written]);
        tracker.done(&flush);
        assert_eq!(tracker.spend("k1", Balance { remaining: 70, seq: 1, epoch: 0 }, 5), Ok(60));
        assert_eq!(tracker.pending("k1").spent, 10);
        tracker.sync(&[SyncedBalance { key_id: "k1".into(), remaining: Some(500), seq: 3 }]);
        assert_eq!(
            tracker.spend("k1", Balance { remaining: 70, seq: 1, epoch: 0 }, 1),
            Ok(489),
            "500 less 11 unflushed"
        );
    }

    /// Killed during an outage: one batch was attempted (and, unknown to
    /// the process, committed), the rest spilled. The next process applies
    /// the spill, and each use and credit counts exactly once.
    #[tokio::test]
    async fn a_spilled_outage_is_applied_once_by_the_next_process() {
        let (store, _db) = crate::store::temp_sqlite_store().await;
        let dir = tempfile::tempdir().unwrap();
        let tracker =
            UsageTracker::new(store.clone(), Some(Spill::open(dir.path()).unwrap()), Arc::default());
        key_row(&store, "k1").await;
        {
            use sea_orm::ConnectionTrait;
            store
                .db()
                .execute_unprepared("UPDATE api_keys SET credits_remaining = 100 WHERE id = 'k1'")
                .await
                .unwrap();
        }
        let balance = Balance { remaining: 100, seq: 0, epoch: 0 };
        for _ in 0..3 {
            tracker.record_allowed("k1", Utc::now());
        }
        assert_eq!(tracker.spend("k1", balance, 4), Ok(96));
        let (attempted, _) = tracker.next_batch(true).unwrap();
        assert!(matches!(
            store.apply_usage(&attempted.id, Utc::now(), &attempted.rows()).await.unwrap(),
            UsageApplied::Applied(_)
        ));
        // The acknowledgement was lost: the attempt failed as far as the
        // tracker knows, and uses go on arriving through the outage.
        tracker.record_allowed("k1", Utc::now());
        tracker.record_denied("k1");
        assert_eq!(tracker.unsaved_keys(), 2, "the attempted batch and the map");
        assert_eq!(tracker.spill(), 0);
        tracker.record_allowed("k1", Utc::now());
        assert_eq!(tracker.spend("k1", balance, 5), Ok(91));
        assert_eq!(tracker.unsaved_keys(), 1);
        assert_eq!(tracker.spill(), 0);
        let files = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(files, 2, "the attempted batch, and one batch for the rest of the outage");
        drop(tracker);

        let next = UsageTracker::new(store.clone(), Some(Spill::open(dir.path()).unwrap()), Arc::default());
        assert_eq!(next.recover().await.unwrap(), 2);
        assert_eq!(stored_count(&store, "k1").await, 5, "3 + 2, the committed batch once");
        let balances = store.credit_balances(&["k1"]).await.unwrap();
        assert_eq!(balances[0].remaining, Some(91), "4 and 5 spent, each once");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        assert_eq!(next.recover().await.unwrap(), 0, "applied once");
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
