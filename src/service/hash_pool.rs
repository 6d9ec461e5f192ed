//! A bounded pool of threads for scrypt, off the async runtime.
//!
//! scrypt is deliberately slow (tens of milliseconds and 32 MiB per hash),
//! so it must never run on a runtime worker, and cold work must not queue
//! without bound: when the queue is full, submissions fail fast and the
//! caller answers RESOURCE_EXHAUSTED. Jobs wait in one of two lanes, each
//! bounded: keys under suspicion (recent wrong secrets on their prefix) wait
//! behind everything else, so guessing cannot delay a legitimate first
//! verification. The threads also run at the lowest
//! scheduling priority (nice 19), so a storm of cold keys cannot take the CPU
//! from the cached path: scrypt gets what the runtime leaves idle, and only a
//! sliver when both want the CPU.

use std::{
    collections::VecDeque,
    panic::{AssertUnwindSafe, catch_unwind},
    sync::{
        Arc, Condvar, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, Ordering},
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

/// Which queue a job waits in. Workers always take a [`Lane::First`] job
/// before a [`Lane::Later`] one, and each lane has its own bound, so jobs
/// in the later lane can neither delay nor crowd out the first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    First,
    Later,
}

#[derive(Default)]
struct Queues {
    first: VecDeque<Job>,
    later: VecDeque<Job>,
    closed: bool,
}

impl Queues {
    fn lane(&mut self, lane: Lane) -> &mut VecDeque<Job> {
        match lane {
            Lane::First => &mut self.first,
            Lane::Later => &mut self.later,
        }
    }
}

struct Shared {
    queues: Mutex<Queues>,
    ready: Condvar,
    runs: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queues> {
        self.queues.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Closes the queues when the last handle goes, so the workers exit.
struct Handle(Arc<Shared>);

impl Drop for Handle {
    fn drop(&mut self) {
        self.0.lock().closed = true;
        self.0.ready.notify_all();
    }
}

#[derive(Clone)]
pub struct HashPool {
    handle: Arc<Handle>,
    workers: usize,
    /// Room per lane.
    queue: usize,
}

impl std::fmt::Debug for HashPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HashPool").field("workers", &self.workers).field("queue", &self.queue).finish()
    }
}

impl HashPool {
    /// `workers` threads with room for `queue` waiting jobs in each lane.
    pub fn new(workers: usize, queue: usize) -> std::io::Result<Self> {
        Self::named("keywarden-scrypt", workers, queue)
    }

    /// As [`HashPool::new`], with threads named `{name}-{i}`.
    pub fn named(name: &str, workers: usize, queue: usize) -> std::io::Result<Self> {
        let workers = workers.max(1);
        let shared =
            Arc::new(Shared { queues: Mutex::default(), ready: Condvar::new(), runs: AtomicU64::new(0) });
        for i in 0..workers {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new().name(format!("{name}-{i}")).spawn(move || worker(&shared))?;
        }
        Ok(Self { handle: Arc::new(Handle(shared)), workers, queue })
    }

    /// Runs `f` on the pool in the first lane, or fails at once if it is full.
    pub async fn run<T, F>(&self, f: F) -> Result<T, PoolError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        self.run_in(Lane::First, f).await
    }

    /// Runs `f` on the pool in `lane`, or fails at once if that lane is full.
    pub async fn run_in<T, F>(&self, lane: Lane, f: F) -> Result<T, PoolError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        {
            let shared = &self.handle.0;
            let mut queues = shared.lock();
            if queues.closed {
                return Err(PoolError::Stopped);
            }
            let waiting = queues.lane(lane);
            if waiting.len() >= self.queue {
                return Err(PoolError::Busy);
            }
            waiting.push_back(job);
            shared.ready.notify_one();
        }
        rx.await.map_err(|_| PoolError::Stopped)
    }

    /// Jobs submitted and not yet started, in both lanes.
    pub fn queued(&self) -> usize {
        let queues = self.handle.0.lock();
        queues.first.len() + queues.later.len()
    }

    /// Jobs run since start (each is one scrypt).
    pub fn runs(&self) -> u64 {
        self.handle.0.runs.load(Ordering::Relaxed)
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

fn worker(shared: &Shared) {
    lower_priority();
    loop {
        let job = {
            let mut queues = shared.lock();
            loop {
                if let Some(job) = queues.first.pop_front().or_else(|| queues.later.pop_front()) {
                    break job;
                }
                if queues.closed {
                    return;
                }
                queues = shared.ready.wait(queues).unwrap_or_else(PoisonError::into_inner);
            }
        };
        shared.runs.fetch_add(1, Ordering::Relaxed);
        // A panicking job drops its result sender (the caller sees Stopped)
        // but must not take the worker thread down with it.
        let _ = catch_unwind(AssertUnwindSafe(job));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A job holding a one-thread pool's worker until `release` is sent,
    /// returned once the worker has picked it up.
    async fn occupy(
        pool: &HashPool,
    ) -> (std::sync::mpsc::Sender<()>, tokio::task::JoinHandle<Result<Option<()>, PoolError>>) {
        let (release, gate) = std::sync::mpsc::channel::<()>();
        let blocker = {
            let pool = pool.clone();
            tokio::spawn(async move { pool.run(move || gate.recv().ok()).await })
        };
        while pool.runs() == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        (release, blocker)
    }

    #[tokio::test]
    async fn runs_jobs_and_counts_them() {
        let pool = HashPool::new(2, 4).unwrap();
        assert_eq!(pool.run(|| 21 * 2).await, Ok(42));
        assert_eq!(pool.runs(), 1);
    }

    #[tokio::test]
    async fn a_full_queue_fails_fast() {
        let pool = HashPool::new(1, 1).unwrap();
        let (release, blocker) = occupy(&pool).await;
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
    async fn the_first_lane_goes_first_and_a_full_later_lane_does_not_block_it() {
        let pool = HashPool::new(1, 2).unwrap();
        let (release, blocker) = occupy(&pool).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let submit = |lane: Lane, tag: &'static str| {
            let (pool, order) = (pool.clone(), Arc::clone(&order));
            tokio::spawn(async move { pool.run_in(lane, move || order.lock().unwrap().push(tag)).await })
        };
        let later = [submit(Lane::Later, "later 1"), submit(Lane::Later, "later 2")];
        while pool.queued() < 2 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(pool.run_in(Lane::Later, || ()).await, Err(PoolError::Busy), "the later lane is full");
        let first = submit(Lane::First, "first");
        while pool.queued() < 3 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        release.send(()).unwrap();
        assert!(blocker.await.unwrap().is_ok());
        assert_eq!(first.await.unwrap(), Ok(()));
        for job in later {
            assert_eq!(job.await.unwrap(), Ok(()));
        }
        assert_eq!(*order.lock().unwrap(), ["first", "later 1", "later 2"]);
    }

    #[tokio::test]
    async fn a_panicking_job_does_not_kill_the_worker() {
        let pool = HashPool::new(1, 2).unwrap();
        assert_eq!(pool.run(|| -> u8 { panic!("boom") }).await, Err(PoolError::Stopped));
        assert_eq!(pool.run(|| 7).await, Ok(7));
    }
}
