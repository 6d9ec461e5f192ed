//! A bounded pool of threads for scrypt, off the async runtime.
//!
//! scrypt is deliberately slow (tens of milliseconds and 32 MiB per hash),
//! so it must never run on a runtime worker, and cold work must not queue
//! without bound: when the queue is full, submissions fail fast and the
//! caller answers RESOURCE_EXHAUSTED. The threads also run at the lowest
//! scheduling priority (nice 19), so a storm of cold keys cannot take the CPU
//! from the cached path: scrypt gets what the runtime leaves idle, and only a
//! sliver when both want the CPU.

use std::{
    panic::{AssertUnwindSafe, catch_unwind},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, AtomicUsize, Ordering},
        mpsc::{Receiver, SyncSender, TrySendError, sync_channel},
    },
};

use thiserror::Error;
use tokio::sync::oneshot;

type Job = Box<dyn FnOnce() + Send>;

#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum PoolError {
    #[error("the hashing queue is full")]
    Busy,
    #[error("the hashing pool has stopped")]
    Stopped,
}

#[derive(Debug, Default)]
struct Counters {
    queued: AtomicUsize,
    runs: AtomicU64,
}

#[derive(Debug, Clone)]
pub struct HashPool {
    jobs: SyncSender<Job>,
    counters: Arc<Counters>,
    workers: usize,
}

impl HashPool {
    /// `workers` threads with room for `queue` waiting jobs.
    pub fn new(workers: usize, queue: usize) -> std::io::Result<Self> {
        let workers = workers.max(1);
        let (jobs, rx) = sync_channel::<Job>(queue);
        let rx = Arc::new(Mutex::new(rx));
        let counters = Arc::new(Counters::default());
        for i in 0..workers {
            let rx = Arc::clone(&rx);
            let counters = Arc::clone(&counters);
            std::thread::Builder::new()
                .name(format!("keywarden-scrypt-{i}"))
                .spawn(move || worker(&rx, &counters))?;
        }
        Ok(Self { jobs, counters, workers })
    }

    /// Runs `f` on the pool, or fails at once if the queue is full.
    pub async fn run<T, F>(&self, f: F) -> Result<T, PoolError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        self.counters.queued.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.jobs.try_send(job) {
            self.counters.queued.fetch_sub(1, Ordering::Relaxed);
            return Err(match e {
                TrySendError::Full(_) => PoolError::Busy,
                TrySendError::Disconnected(_) => PoolError::Stopped,
            });
        }
        rx.await.map_err(|_| PoolError::Stopped)
    }

    /// Jobs submitted and not yet started.
    pub fn queued(&self) -> usize {
        self.counters.queued.load(Ordering::Relaxed)
    }

    /// Jobs run since start (each is one scrypt).
    pub fn runs(&self) -> u64 {
        self.counters.runs.load(Ordering::Relaxed)
    }

    pub fn workers(&self) -> usize {
        self.workers
    }
}

fn lower_priority() {
    if let Err(e) = thread_priority::set_current_thread_priority(thread_priority::ThreadPriority::Min) {
        tracing::warn!(error = ?e, "could not lower the scrypt threads' priority; cold keys may slow warm ones");
    }
}

fn worker(rx: &Mutex<Receiver<Job>>, counters: &Counters) {
    lower_priority();
    loop {
        let job = match rx.lock().unwrap_or_else(PoisonError::into_inner).recv() {
            Ok(job) => job,
            Err(_) => return,
        };
        counters.queued.fetch_sub(1, Ordering::Relaxed);
        counters.runs.fetch_add(1, Ordering::Relaxed);
        // A panicking job drops its result sender (the caller sees Stopped)
        // but must not take the worker thread down with it.
        let _ = catch_unwind(AssertUnwindSafe(job));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn runs_jobs_and_counts_them() {
        let pool = HashPool::new(2, 4).unwrap();
        assert_eq!(pool.run(|| 21 * 2).await, Ok(42));
        assert_eq!(pool.runs(), 1);
    }

    #[tokio::test]
    async fn a_full_queue_fails_fast() {
        let pool = HashPool::new(1, 1).unwrap();
        let (release, gate) = std::sync::mpsc::channel::<()>();
        let gate = Arc::new(Mutex::new(gate));
        let blocker = {
            let pool = pool.clone();
            let gate = Arc::clone(&gate);
            tokio::spawn(async move { pool.run(move || gate.lock().unwrap().recv().ok()).await })
        };
        // Wait until the worker has picked the blocker up.
        while pool.runs() == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let queued = {
            let pool = pool.clone();
            tokio::spawn(async move { pool.run(|| 1).await })
        };
        while pool.queued() == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(pool.run(|| 2).await, Err(PoolError::Busy));
        release.send(()).unwrap();
        assert!(blocker.await.unwrap().is_ok());
        assert_eq!(queued.await.unwrap(), Ok(1));
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn workers_run_below_normal_priority() {
        let pool = HashPool::new(1, 1).unwrap();
        let nice = pool
            .run(|| {
                std::fs::read_to_string("/proc/thread-self/stat").ok().and_then(|s| {
                    s.rsplit(')').next().and_then(|rest| rest.split_whitespace().nth(16)?.parse::<i32>().ok())
                })
            })
            .await
            .unwrap();
        assert!(nice.is_some_and(|n| n > 0), "nice value {nice:?}");
    }

    #[tokio::test]
    async fn a_panicking_job_does_not_kill_the_worker() {
        let pool = HashPool::new(1, 2).unwrap();
        assert_eq!(pool.run(|| -> u8 { panic!("boom") }).await, Err(PoolError::Stopped));
        assert_eq!(pool.run(|| 7).await, Ok(7));
    }
}
