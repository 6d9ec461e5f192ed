//! Moving keys to the current pepper, off the Verify path.
//!
//! A key can only be hashed again while its plaintext is at hand, which is
//! during a Verify. So when a check succeeds against a hash made under an
//! older pepper, Verify offers the key here and answers at once; a
//! background task hashes it under the current pepper on the KeyAdmin
//! scrypt thread's later lane (behind CreateKey and RegenerateKey, never in
//! Verify's way) and writes a batch of rewrites in one transaction. Each
//! rewrite applies only if the row still holds the hash that was checked.
//!
//! Nothing here is needed for correctness: a key that is not rewritten
//! still verifies under its old pepper while that pepper is configured, and
//! is offered again after its next first check in a process. So the queue
//! is bounded and a full one drops (counted), and shutdown abandons what is
//! pending.

use std::{
    collections::HashSet,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::sync::mpsc;

use super::hash_pool::{HashPool, Lane, PoolError};
use crate::task::Task;
use crate::{
    keys::{KeyHash, KeyHasher, PlainKey},
    store::{Store, peppers::Rehash},
};

/// Keys waiting to be hashed again: enough for a burst of first checks
/// after a rollout, each holding a plaintext for seconds at most.
const QUEUE: usize = 4_096;
/// Rewrites per transaction.
const BATCH: usize = 64;
/// The wait before a failed write or a busy scrypt thread is tried again.
const RETRY: Duration = Duration::from_millis(500);

/// A key whose check succeeded under an old pepper, with its plaintext.
struct Job {
    key_id: Arc<str>,
    key: PlainKey,
    checked: KeyHash,
}

#[derive(Debug, Default)]
struct Counters {
    rewritten: AtomicU64,
    dropped: AtomicU64,
    failed_writes: AtomicU64,
}

/// The queue Verify offers keys to, and the task that empties it.
pub struct Rehasher {
    tx: mpsc::Sender<Job>,
    rx: tokio::sync::Mutex<mpsc::Receiver<Job>>,
    /// Keys queued or being rewritten: one offer each is enough.
    pending: Mutex<HashSet<Arc<str>>>,
    store: Store,
    hasher: KeyHasher,
    pool: HashPool,
    counters: Counters,
}

impl std::fmt::Debug for Rehasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rehasher").field("counters", &self.counters).finish_non_exhaustive()
    }
}

impl Rehasher {
    /// `pool` runs the new hashes, in its later lane.
    pub fn new(store: Store, hasher: KeyHasher, pool: HashPool) -> Arc<Self> {
        let (tx, rx) = mpsc::channel(QUEUE);
        Arc::new(Self {
            tx,
            rx: tokio::sync::Mutex::new(rx),
            pending: Mutex::default(),
            store,
            hasher,
            pool,
            counters: Counters::default(),
        })
    }

    /// Called after `key` was checked against `checked`, successfully: if
    /// that hash is under an old pepper, queues the key to be hashed again.
    /// Never waits.
    pub fn offer(&self, key_id: &Arc<str>, key: &PlainKey, checked: &KeyHash) {
        if self.hasher.is_current(checked) {
            return;
        }
        if !self.lock_pending().insert(Arc::clone(key_id)) {
            return;
        }
        let job = Job { key_id: Arc::clone(key_id), key: key.clone(), checked: checked.clone() };
        if self.tx.try_send(job).is_err() {
            self.lock_pending().remove(key_id);
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Keys moved to the current pepper by this process.
    pub fn rewritten(&self) -> u64 {
        self.counters.rewritten.load(Ordering::Relaxed)
    }

    /// Offers dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.counters.dropped.load(Ordering::Relaxed)
    }

    /// Batches whose write failed (tried again).
    pub fn failed_writes(&self) -> u64 {
        self.counters.failed_writes.load(Ordering::Relaxed)
    }

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, HashSet<Arc<str>>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The rehash as a background task ([`Rehasher::run`]).
    pub fn task(self: &Arc<Self>) -> Task {
        let rehasher = Arc::clone(self);
        Task::helper("pepper rehash", move |stop| Arc::clone(&rehasher).run(stop))
    }

    /// Empties the queue until `stop`: takes what is waiting (up to a
    /// batch), hashes each key, writes the batch. A restart by the
    /// supervisor picks up the same queue.
    pub async fn run(self: Arc<Self>, stop: impl Future<Output = ()>) {
        tokio::pin!(stop);
        let mut rx = self.rx.lock().await;
        loop {
            let mut jobs = Vec::with_capacity(BATCH);
            tokio::select! {
                () = &mut stop => return,
                n = rx.recv_many(&mut jobs, BATCH) => if n == 0 { return },
            }
            let mut batch = Vec::with_capacity(jobs.len());
            for job in jobs {
                if let Some(rehash) = self.hash_again(&job, &mut stop).await {
                    batch.push(rehash);
                }
            }
            while !batch.is_empty() {
                match self.store.rehash_keys(&batch).await {
                    Ok(n) => {
                        self.counters.rewritten.fetch_add(n, Ordering::Relaxed);
                        break;
                    }
                    Err(e) => {
                        self.counters.failed_writes.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(error = %e, keys = batch.len(), "rehash write failed; retrying");
                        tokio::select! {
                            () = &mut stop => return,
                            () = tokio::time::sleep(RETRY) => {}
                        }
                    }
                }
            }
            let mut pending = self.lock_pending();
            for rehash in &batch {
                pending.remove(rehash.key_id.as_str());
            }
        }
    }

    /// The key's hash under the current pepper, or `None` (shutdown, or no
    /// randomness); waits while the scrypt thread's lane is full.
    async fn hash_again(
        &self,
        job: &Job,
        stop: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> Option<Rehash> {
        loop {
            let (hasher, key) = (self.hasher.clone(), job.key.clone());
            match self.pool.run_in(Lane::Later, move || hasher.hash(&key)).await {
                Ok(Ok(current)) => {
                    return Some(Rehash {
                        key_id: job.key_id.to_string(),
                        checked: job.checked.clone(),
                        current,
                    });
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot rehash a key");
                    self.lock_pending().remove(&job.key_id);
                    return None;
                }
                Err(PoolError::Busy) => tokio::select! {
                    () = stop.as_mut() => return None,
                    () = tokio::time::sleep(RETRY) => {}
                },
                Err(PoolError::Stopped) => return None,
            }
        }
    }
}
