//! The audit queue: Verify hands its row to a bounded queue and returns; a
//! writer task inserts rows in multi-row batches.
//!
//! Nothing is dropped silently. When the queue is full, Verify waits a
//! bounded time for room; then it fails closed (`block`, the default: no
//! decision without its audit row) or, if configured to drop, the row is
//! counted and logged. A failed insert keeps its batch and retries, so an outage only
//! delays rows; a batch the database refuses for what it holds is written
//! in halves down to the refused row, which becomes a dead letter (`dead_letter`; table
//! `audit_dead_letters`, or a file if the database refuses that too), so
//! one bad row cannot block every row behind it. With a spool
//! ([`super::spool`]), a write that fails or takes longer than the spill
//! bound puts its batch on local disk instead, and so do the batches after
//! it until the spool has been replayed into the database, in order: an
//! outage fills the spool, not the queue, and Verify does not wait. RecordOutcomes may arrive while an allowed row is still queued
//! or being written; the outcome is held next to the row and applied either
//! way (see [`AuditQueue::record_outcomes`]).

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::sync::mpsc;

mod dead_letter;
mod outcomes;
mod spill;

use spill::{REPLAY_BUDGET, REPLAY_MAX_ROWS};

use super::{AuditRecord, spool::Spool};
use crate::task::Task;
use crate::{
    clock::DbClock,
    config::{AuditSettings, Overflow},
    keys::Decision,
    store::Store,
};

/// First wait before replaying the spool again after a failure (doubling
/// to 5 s).
const REPLAY_RETRY: Duration = Duration::from_millis(100);
/// Reported statuses of allowed rows not yet committed, by row id. `None`
/// until RecordOutcomes reports one.
type Outcomes = Arc<Mutex<HashMap<String, Option<u16>>>>;

/// What [`AuditQueue::record_outcomes`] did with reported statuses.
#[derive(Debug, Default)]
pub struct TakenOutcomes {
    /// Attached to rows still queued here.
    pub held: u64,
    /// Not attached: the queued row had a status already.
    pub ignored: u64,
    /// For the database: rows already written, or not ours.
    pub rest: Vec<(String, u16)>,
}

#[derive(Debug, Default)]
struct Counters {
    written: AtomicU64,
    /// Rows the writer has taken off the queue and not yet committed.
    in_hand: AtomicU64,
    dropped: AtomicU64,
    /// Verify calls refused because the queue stayed full (`block`).
    refused: AtomicU64,
    failed_writes: AtomicU64,
    dead_letters: AtomicU64,
}

/// The sending side, shared by every Verify.
#[derive(Debug, Clone)]
pub struct AuditQueue {
    tx: mpsc::Sender<AuditRecord>,
    outcomes: Outcomes,
    overflow: Overflow,
    wait: Duration,
    counters: Arc<Counters>,
    capacity: usize,
    spool: Option<Arc<Spool>>,
    /// Rows are stamped on it; the spool's oldest age is read on it.
    clock: Arc<DbClock>,
}

/// Why a row was not queued.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QueueError {
    /// The queue was closed for shutdown.
    #[error("the audit queue is closed")]
    Closed,
    /// Full for longer than the wait allowed, under `audit_overflow = "block"`.
    #[error("the audit queue is full")]
    Full,
}

/// The receiving side; [`AuditWriter::run`] is the writer task.
#[derive(Debug)]
pub struct AuditWriter {
    /// The queue's receiving end and the batch in hand. Behind a lock that
    /// a run holds throughout, so that a run aborted or panicking leaves
    /// both to the next run (see `startup::supervise`): nothing in hand is
    /// lost with it.
    state: tokio::sync::Mutex<Pending>,
    outcomes: Outcomes,
    store: Store,
    batch_size: usize,
    linger: Duration,
    counters: Arc<Counters>,
    /// Where a dead letter goes when the database refuses it too.
    dead_letter_file: std::path::PathBuf,
    spool: Option<Arc<Spool>>,
    /// How long a write may take before its batch goes to the spool.
    spill_after: Duration,
    /// Outcomes reported for rows while they were being spooled, applied
    /// to them when they are replayed. (Outcomes reported later find no
    /// row in memory and take RecordOutcomes' database path.)
    late: Mutex<HashMap<String, u16>>,
    /// Rows per replayed insert now.
    replay_rows: std::sync::atomic::AtomicUsize,
    /// Stamps dead letters.
    clock: Arc<DbClock>,
}

#[derive(Debug)]
struct Pending {
    rx: mpsc::Receiver<AuditRecord>,
    batch: Vec<AuditRecord>,
}

/// The queue and its writer; with `spool`, the writer spills to it when
/// the database fails or is slow.
pub fn channel(
    store: Store,
    settings: &AuditSettings,
    spool: Option<Arc<Spool>>,
    clock: Arc<DbClock>,
) -> (AuditQueue, AuditWriter) {
    let capacity = settings.capacity.max(1);
    let (tx, rx) = mpsc::channel(capacity);
    let outcomes = Outcomes::default();
    let counters = Arc::new(Counters::default());
    (
        AuditQueue {
            tx,
            outcomes: Arc::clone(&outcomes),
            overflow: settings.overflow,
            wait: settings.wait,
            counters: Arc::clone(&counters),
            capacity,
            spool: spool.clone(),
            clock: Arc::clone(&clock),
        },
        AuditWriter {
            state: tokio::sync::Mutex::new(Pending { rx, batch: Vec::new() }),
            outcomes,
            store,
            batch_size: settings.batch_size.max(1),
            linger: settings.linger,
            counters,
            dead_letter_file: settings.dead_letter_file.clone(),
            spool,
            spill_after: settings.spill_after,
            late: Mutex::default(),
            replay_rows: std::sync::atomic::AtomicUsize::new(REPLAY_MAX_ROWS),
            clock,
        },
    )
}

impl AuditQueue {
    /// Queues a verification row. The row is offered to the queue when
    /// `push` is called; the future only waits for room if the queue is
    /// full, for at most the configured wait. Not an `async fn`, so that
    /// the row is not carried inside the future: every Verify awaits this,
    /// and its future is copied at each await and spawn.
    pub fn push(&self, record: AuditRecord) -> impl Future<Output = Result<(), QueueError>> + Send + '_ {
        // Boxed: the wait is rare, and `send`'s future is over a kilobyte.
        let waiting = self.offer(record).map(|full| full.map(|record| Box::pin(self.send_waiting(record))));
        async move {
            match waiting? {
                None => Ok(()),
                Some(wait) => wait.await,
            }
        }
    }

    /// Queues a row without making the caller wait: it is in the queue (and
    /// counted by [`Self::unwritten`]) when this returns, unless the queue
    /// is full; only then does a task of its own wait for room.
    pub fn push_detached(&self, record: AuditRecord) {
        if let Ok(Some(record)) = self.offer(record) {
            let queue = self.clone();
            tokio::spawn(async move {
                let _ = queue.send_waiting(record).await;
            });
        }
    }

    /// Offers the row to the queue now; gives it back if the queue is full.
    fn offer(&self, record: AuditRecord) -> Result<Option<AuditRecord>, QueueError> {
        if record.decision == Some(Decision::Allow) {
            self.outcomes.lock().unwrap_or_else(PoisonError::into_inner).insert(record.id.clone(), None);
        }
        // Every path that loses the row gets it back, and forgets its outcome.
        match self.tx.try_send(record) {
            Ok(()) => Ok(None),
            Err(mpsc::error::TrySendError::Closed(record)) => {
                self.forget_outcome(&record);
                Err(QueueError::Closed)
            }
            Err(mpsc::error::TrySendError::Full(record)) => Ok(Some(record)),
        }
    }

    async fn send_waiting(&self, record: AuditRecord) -> Result<(), QueueError> {
        let permit = match tokio::time::timeout(self.wait, self.tx.reserve()).await {
            Ok(Ok(permit)) => permit,
            Ok(Err(_)) => {
                self.forget_outcome(&record);
                return Err(QueueError::Closed);
            }
            Err(_) => {
                self.forget_outcome(&record);
                return match self.overflow {
                    Overflow::Block => {
                        self.counters.refused.fetch_add(1, Ordering::Relaxed);
                        Err(QueueError::Full)
                    }
                    Overflow::Drop => {
                        self.count_dropped(&record);
                        Ok(())
                    }
                };
            }
        };
        permit.send(record);
        Ok(())
    }

    fn count_dropped(&self, record: &AuditRecord) {
        let dropped = self.counters.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        // Every row is counted; the log is thinned to powers of two.
        if dropped.is_power_of_two() {
            tracing::error!(
                audit_event_id = %record.id,
                dropped_total = dropped,
                "audit queue full: dropped an audit row (audit_overflow = \"drop\")"
            );
        }
    }

    /// A row that will never be written takes no outcome.
    fn forget_outcome(&self, record: &AuditRecord) {
        if record.decision == Some(Decision::Allow) {
            self.outcomes.lock().unwrap_or_else(PoisonError::into_inner).remove(&record.id);
        }
    }

    /// Attaches reported statuses to rows that are still queued or being
    /// written, unless a status was reported for them already.
    pub fn record_outcomes(&self, outcomes: Vec<(String, u16)>) -> TakenOutcomes {
        let mut held = self.outcomes.lock().unwrap_or_else(PoisonError::into_inner);
        let mut taken = TakenOutcomes::default();
        for (id, status) in outcomes {
            match held.get_mut(&id) {
                // Written once: by the first report.
                Some(Some(_)) => taken.ignored += 1,
                Some(slot) => {
                    *slot = Some(status);
                    taken.held += 1;
                }
                None => taken.rest.push((id, status)),
            }
        }
        taken
    }

    /// Rows waiting in the queue.
    pub fn depth(&self) -> usize {
        self.capacity - self.tx.capacity()
    }

    /// Rows the queue holds at most.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Rows accepted and not yet committed: queued, or in the writer's
    /// batch (which the queue's depth no longer counts while the batch
    /// lingers or its insert runs).
    pub fn unwritten(&self) -> u64 {
        self.depth() as u64 + self.counters.in_hand.load(Ordering::Relaxed) + self.spooled_rows()
    }

    /// Rows on the spool, not yet replayed into the database.
    pub fn spooled_rows(&self) -> u64 {
        self.spool.as_ref().map_or(0, |s| s.rows())
    }

    /// Bytes on the spool, not yet replayed.
    pub fn spooled_bytes(&self) -> u64 {
        self.spool.as_ref().map_or(0, |s| s.bytes())
    }

    /// Rows replayed from the spool into the database since start.
    pub fn replayed_rows(&self) -> u64 {
        self.spool.as_ref().map_or(0, |s| s.replayed())
    }

    /// Seconds the oldest spooled row has waited.
    pub fn spool_oldest_age(&self) -> f64 {
        self.spool.as_ref().map_or(0.0, |s| s.oldest_age(self.clock.now()))
    }

    /// Spool lines that could not be read back, skipped.
    pub fn spool_unreadable(&self) -> u64 {
        self.spool.as_ref().map_or(0, |s| s.unreadable())
    }

    pub fn dropped(&self) -> u64 {
        self.counters.dropped.load(Ordering::Relaxed)
    }

    /// Verify calls answered UNAVAILABLE because the queue stayed full.
    pub fn refused(&self) -> u64 {
        self.counters.refused.load(Ordering::Relaxed)
    }

    pub fn written(&self) -> u64 {
        self.counters.written.load(Ordering::Relaxed)
    }

    pub fn failed_writes(&self) -> u64 {
        self.counters.failed_writes.load(Ordering::Relaxed)
    }

    /// Rows the database refused for what they hold, kept apart.
    pub fn dead_letters(&self) -> u64 {
        self.counters.dead_letters.load(Ordering::Relaxed)
    }
}

impl AuditWriter {
    /// The writer as a background task ([`AuditWriter::run`]).
    pub fn task(self, final_deadline: Duration) -> Task {
        let writer = Arc::new(self);
        Task::flusher("audit writer", "{n} audit rows", move |stop| {
            Arc::clone(&writer).run(stop, final_deadline)
        })
    }

    /// Writes batches until `stop` resolves, then closes the queue and writes
    /// what is left, retrying failed writes until `final_deadline` passes.
    /// Returns how many rows could not be written (0 is the only good answer).
    /// Restartable: a run picks up the batch a previous run left in hand.
    pub async fn run(self: Arc<Self>, stop: impl Future<Output = ()>, final_deadline: Duration) -> usize {
        tokio::pin!(stop);
        let mut pending = self.state.lock().await;
        let Pending { rx, batch } = &mut *pending;
        // A batch a previous run left in hand goes first.
        let mut stopped = false;
        if !batch.is_empty() {
            self.hold(batch);
            tokio::select! {
                _ = self.write(batch, None) => {}
                () = &mut stop => stopped = true,
            }
        }
        let mut replay_at = tokio::time::Instant::now();
        let mut replay_backoff = REPLAY_RETRY;
        loop {
            if stopped {
                break;
            }
            tokio::select! {
                // Spooled rows go back to the database between batches.
                () = tokio::time::sleep_until(replay_at), if self.spool_has_rows() => {
                    match self.replay(REPLAY_BUDGET).await {
                        Ok(()) => {
                            replay_backoff = REPLAY_RETRY;
                            replay_at = tokio::time::Instant::now();
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, retry_ms = replay_backoff.as_millis() as u64, "replaying the audit spool failed; retrying");
                            replay_at = tokio::time::Instant::now() + replay_backoff;
                            replay_backoff = (replay_backoff * 2).min(Duration::from_secs(5));
                        }
                    }
                }
                received = rx.recv_many(batch, self.batch_size) => {
                    if received == 0 {
                        return 0;
                    }
                    self.hold(batch);
                    // Neither the linger nor a write (which retries for as
                    // long as the database is away) may hold up shutdown.
                    // Both are cancel-safe: rows received or not yet
                    // acknowledged stay in `batch` for the final drain.
                    let linger_then_write = async {
                        self.fill(rx, batch).await;
                        self.write(batch, None).await
                    };
                    tokio::select! {
                        _ = linger_then_write => {}
                        () = &mut stop => break,
                    }
                }
                () = &mut stop => break,
            }
        }
        // Senders now get QueueClosed; everything already queued is drained,
        // starting with a batch whose write shutdown interrupted.
        rx.close();
        let give_up = tokio::time::Instant::now() + final_deadline;
        while !batch.is_empty() || rx.recv_many(batch, self.batch_size).await > 0 {
            self.hold(batch);
            if !self.write(batch, Some(give_up)).await {
                let lost = batch.len() + rx.len();
                tracing::error!(rows = lost, "audit rows could not be written before shutdown");
                return lost;
            }
        }
        // What is spooled is safe on disk; as much as the deadline allows
        // goes to the database now, the rest at the next start.
        while self.spool_has_rows() && tokio::time::Instant::now() < give_up {
            let budget = give_up.saturating_duration_since(tokio::time::Instant::now());
            if let Err(e) = tokio::time::timeout(budget, self.replay(budget)).await.unwrap_or(Ok(())) {
                tracing::warn!(error = %e, "replaying the audit spool at shutdown failed");
                break;
            }
        }
        if let Some(spool) = &self.spool
            && !spool.is_empty()
        {
            tracing::warn!(
                rows = spool.rows(),
                "audit rows remain in the spool; they are replayed at the next start"
            );
        }
        0
    }

    /// Tops `batch` up with rows arriving within the linger time.
    async fn fill(&self, rx: &mut mpsc::Receiver<AuditRecord>, batch: &mut Vec<AuditRecord>) {
        // Tokio rounds a deadline up to its next millisecond tick, so a zero
        // linger given to the timer would still wait and take later rows.
        if self.linger.is_zero() {
            return;
        }
        let until = tokio::time::Instant::now() + self.linger;
        while batch.len() < self.batch_size {
            let room = self.batch_size - batch.len();
            match tokio::time::timeout_at(until, rx.recv_many(batch, room)).await {
                Ok(0) | Err(_) => return,
                Ok(_) => self.hold(batch),
            }
        }
    }

    /// Inserts `batch` (clearing it), retrying with backoff; with a deadline,
    /// gives up when it passes and returns false.
    async fn write(&self, batch: &mut Vec<AuditRecord>, deadline: Option<tokio::time::Instant>) -> bool {
        self.apply_held_outcomes(batch);
        // While rows wait on the spool, new ones join them there, so that
        // rows reach the database in the order they were taken.
        let mut spillable = self.spool.is_some();
        if self.spool_has_rows() {
            if self.spill(batch) {
                return true;
            }
            spillable = false;
        }
        let mut backoff = Duration::from_millis(50);
        loop {
            let attempt = self.store.insert_audit_batch(batch);
            // With a deadline, an attempt stuck on the database (a lock, a
            // half-open connection) is abandoned when it passes too; with a
            // spool that takes batches, when it takes longer than the spill
            // bound (if it commits after all, the replayed rows are
            // upserts). Once the spool has refused the batch, an attempt
            // runs to its end: abandoning it would only start it over, and
            // a database slower than the bound would never be written.
            let spill_at = spillable.then(|| tokio::time::Instant::now() + self.spill_after);
            let give_up = match (deadline, spill_at) {
                (Some(d), Some(s)) => Some(d.min(s)),
                (d, s) => d.or(s),
            };
            let result = match give_up {
                Some(d) => match tokio::time::timeout_at(d, attempt).await {
                    Ok(result) => result,
                    Err(_) if self.spill(batch) => return true,
                    Err(_) if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) => return false,
                    Err(_) => {
                        spillable = false;
                        self.counters.failed_writes.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                },
                None => attempt.await,
            };
            // Refused for what it holds: retrying the batch whole would
            // fail forever, so its rows are written apart.
            let result = match result {
                Err(e) if e.is_permanent() => self.isolate(batch, &e).await,
                other => other,
            };
            match result {
                Ok(()) => break,
                Err(e) => {
                    self.counters.failed_writes.fetch_add(1, Ordering::Relaxed);
                    // The database failing does not hold Verify up.
                    if self.spill(batch) {
                        tracing::warn!(error = %e, "audit insert failed; batch spooled to disk");
                        return true;
                    }
                    spillable = false;
                    tracing::warn!(error = %e, rows = batch.len(), "audit insert failed; retrying");
                    if deadline.is_some_and(|d| tokio::time::Instant::now() + backoff > d) {
                        return false;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    // Outcomes may have arrived while we waited.
                    self.apply_held_outcomes(batch);
                }
            }
        }
        self.counters.written.fetch_add(batch.len() as u64, Ordering::Relaxed);
        let late = self.release_outcomes(batch);
        batch.clear();
        self.hold(batch);
        if !late.is_empty() {
            self.write_late_outcomes(&late, deadline).await;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    // Tests read the real clock to build their inputs.
    #![allow(clippy::disallowed_methods)]

    use chrono::Utc;

    use super::{spill::ReplayError, *};
    use crate::{audit::AuditKind, store::temp_sqlite_store};

    /// A spool that can no longer be read (its directory removed under
    /// it) fails the replay, so the run loop backs off, instead of
    /// answering "nothing to do" and being retried at once, for ever.
    #[tokio::test]
    async fn an_unreadable_spool_fails_the_replay_so_it_is_retried_with_backoff() {
        let (store, dir) = temp_sqlite_store().await;
        let spool_dir = dir.path().join("spool");
        let spool = Arc::new(Spool::open(&spool_dir, 1 << 20).unwrap());
        spool.append(&[AuditRecord::new(AuditKind::Verify, Utc::now(), None)]).unwrap();
        let settings = AuditSettings {
            capacity: 100,
            batch_size: 100,
            linger: Duration::from_millis(10),
            overflow: Overflow::Block,
            wait: Duration::from_millis(100),
            dead_letter_file: dir.path().join("dead-letters.jsonl"),
            spill_after: Duration::from_millis(500),
        };
        let (_queue, writer) = channel(store, &settings, Some(Arc::clone(&spool)), Arc::default());
        std::fs::remove_dir_all(&spool_dir).unwrap();
        let replayed = writer.replay(Duration::from_secs(1)).await;
        assert!(matches!(replayed, Err(ReplayError::Read(_))), "{replayed:?}");
        assert!(!spool.is_empty(), "the row is still owed");
    }

    /// A store whose every audit insert takes far longer than a spill
    /// bound of 1 ms: a trigger counts a 16,777,216-row cross join per row.
    async fn slow_store() -> (Store, tempfile::TempDir) {
        use sea_orm::ConnectionTrait as _;
        let (store, dir) = temp_sqlite_store().await;
        store
            .db()
            .execute_unprepared("CREATE TABLE slow (n INTEGER); INSERT INTO slow VALUES (0)")
            .await
            .unwrap();
        // 32 rows, so each insert counts 32^4 joined rows: tens of
        // milliseconds, far above the 1 ms spill bound and far below the
        // 2 s a replayed insert may run before it is taken for stuck, also
        // on a machine busy with a build.
        for _ in 0..5 {
            store.db().execute_unprepared("INSERT INTO slow SELECT n FROM slow").await.unwrap();
        }
        store
            .db()
            .execute_unprepared(
                "CREATE TRIGGER slow_audit BEFORE INSERT ON audit_events BEGIN \
                 SELECT count(*) FROM slow a, slow b, slow c, slow d; END",
            )
            .await
            .unwrap();
        (store, dir)
    }

    async fn audit_rows(store: &Store) -> i64 {
        use sea_orm::{ConnectionTrait as _, Statement};
        let row = store
            .db()
            .query_one_raw(Statement::from_string(store.db_backend(), "SELECT count(*) FROM audit_events"))
            .await
            .unwrap()
            .unwrap();
        row.try_get_by_index::<i64>(0).unwrap()
    }

    fn slow_settings(dir: &std::path::Path) -> AuditSettings {
        AuditSettings {
            capacity: 100,
            batch_size: 100,
            linger: Duration::from_millis(10),
            overflow: Overflow::Block,
            wait: Duration::from_millis(100),
            dead_letter_file: dir.join("dead-letters.jsonl"),
            spill_after: Duration::from_millis(1),
        }
    }

    /// With the spool full, a batch has nowhere to go but the database: an
    /// insert slower than the spill bound must be waited for, not abandoned
    /// and started over for ever.
    #[tokio::test]
    async fn a_write_slower_than_the_spill_bound_lands_when_the_spool_is_full() {
        let (store, dir) = slow_store().await;
        let spool = Arc::new(Spool::open(&dir.path().join("spool"), 1).unwrap());
        let (queue, writer) =
            channel(store.clone(), &slow_settings(dir.path()), Some(Arc::clone(&spool)), Arc::default());
        let mut batch = vec![AuditRecord::new(AuditKind::Verify, Utc::now(), None)];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        assert!(writer.write(&mut batch, Some(deadline)).await, "written before the deadline");
        assert_eq!(queue.written(), 1);
        assert_eq!(audit_rows(&store).await, 1);
        assert!(spool.is_empty(), "the full spool took nothing");
    }

    /// Spooled rows have nowhere else to go either: a replayed insert
    /// slower than the spill bound lands.
    #[tokio::test]
    async fn a_replayed_insert_slower_than_the_spill_bound_lands() {
        let (store, dir) = slow_store().await;
        let spool = Arc::new(Spool::open(&dir.path().join("spool"), 1 << 20).unwrap());
        let rows: Vec<_> = (0..3).map(|_| AuditRecord::new(AuditKind::Verify, Utc::now(), None)).collect();
        spool.append(&rows).unwrap();
        let (queue, writer) =
            channel(store.clone(), &slow_settings(dir.path()), Some(Arc::clone(&spool)), Arc::default());
        let replayed = writer.replay(Duration::from_secs(20)).await;
        assert!(replayed.is_ok(), "{replayed:?}");
        assert!(spool.is_empty());
        assert_eq!(queue.written(), 3);
        assert_eq!(audit_rows(&store).await, 3);
    }

    /// A running writer holding three queued rows in a batch that lingers;
    /// dropping the sender stops it.
    async fn three_rows_lingering()
    -> (AuditQueue, tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<usize>, tempfile::TempDir) {
        let (store, dir) = temp_sqlite_store().await;
        // A linger far longer than any test waits.
        let settings = AuditSettings {
            capacity: 100,
            batch_size: 100,
            linger: Duration::from_secs(600),
            overflow: Overflow::Block,
            wait: Duration::from_millis(100),
            dead_letter_file: dir.path().join("dead-letters.jsonl"),
            spill_after: Duration::from_millis(500),
        };
        let (queue, writer) = channel(store, &settings, None, Arc::default());
        for _ in 0..3 {
            queue.push(AuditRecord::new(AuditKind::Verify, Utc::now(), None)).await.unwrap();
        }
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let run = tokio::spawn(Arc::new(writer).run(
            async move {
                let _ = stop_rx.await;
            },
            Duration::from_secs(5),
        ));
        for _ in 0..500 {
            if queue.depth() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(queue.depth(), 0, "the writer took the rows");
        (queue, stop_tx, run, dir)
    }

    /// A batch the writer has taken but not committed is out of the queue
    /// yet not written: `unwritten` must still count it.
    /// A row queued without waiting is in the queue when the call returns,
    /// before any other task has run (the runtime here has one thread); a
    /// row that finds the queue full waits for room in a task of its own.
    #[tokio::test(flavor = "current_thread")]
    async fn a_detached_push_is_queued_before_the_caller_goes_on() {
        let (store, dir) = temp_sqlite_store().await;
        let settings = AuditSettings {
            capacity: 1,
            batch_size: 1,
            linger: Duration::from_secs(600),
            overflow: Overflow::Block,
            wait: Duration::from_secs(5),
            dead_letter_file: dir.path().join("dead-letters.jsonl"),
            spill_after: Duration::from_millis(500),
        };
        let (queue, writer) = channel(store, &settings, None, Arc::default());
        queue.push_detached(AuditRecord::new(AuditKind::AccessDenied, Utc::now(), None));
        assert_eq!(queue.unwritten(), 1, "the row is queued at once");
        let second = AuditRecord::new(AuditKind::AccessDenied, Utc::now(), None);
        let second_id = second.id.clone();
        queue.push_detached(second);
        assert_eq!(queue.depth(), 1, "the full queue holds only the first row");
        let mut state = writer.state.lock().await;
        assert!(state.rx.recv().await.is_some());
        let waited = tokio::time::timeout(Duration::from_secs(5), state.rx.recv()).await;
        assert_eq!(waited.ok().flatten().map(|r| r.id), Some(second_id), "the waiting row arrives");
    }

    #[tokio::test]
    async fn rows_the_writer_holds_count_as_unwritten_until_committed() {
        let (queue, stop_tx, run, _dir) = three_rows_lingering().await;
        assert_eq!((queue.unwritten(), queue.written()), (3, 0), "lingering, not written");
        drop(stop_tx);
        let lost = tokio::time::timeout(Duration::from_secs(30), run).await.expect("the writer stops");
        assert_eq!(lost.unwrap(), 0);
        assert_eq!((queue.unwritten(), queue.written()), (0, 3));
    }

    /// An operator may set a long linger; stopping must still write the
    /// lingering batch at once rather than wait the linger out.
    #[tokio::test]
    async fn shutdown_writes_a_lingering_batch_without_waiting_out_the_linger() {
        let (queue, stop_tx, run, _dir) = three_rows_lingering().await;
        drop(stop_tx);
        // 600 s of linger against a 30 s allowance: only a writer that
        // ignores the stop can run out of it.
        let lost =
            tokio::time::timeout(Duration::from_secs(30), run).await.expect("stopped within the allowance");
        assert_eq!(lost.unwrap(), 0);
        assert_eq!(queue.written(), 3);
        assert!(
            queue.push(AuditRecord::new(AuditKind::Verify, Utc::now(), None)).await.is_err(),
            "the queue is closed"
        );
    }
}
