//! Supervision of the background tasks (writers, change feed, retention,
//! metrics endpoint): a task that panics, is aborted, or returns before
//! shutdown is restarted with backoff. While any task is down the replica
//! is not ready (health NOT_SERVING); a task that keeps failing makes the
//! supervisor give up, and the process drains and exits non-zero so that
//! its orchestrator restarts it.

use std::{
    collections::{HashMap, VecDeque},
    future::Future,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{
    sync::{Notify, watch},
    task::{AbortHandle, JoinHandle, JoinSet},
    time::Instant,
};

use crate::metrics::{Metrics, TaskLabels};

/// How restarts are paced, and when they stop.
#[derive(Debug, Clone, Copy)]
pub struct RestartPolicy {
    /// The first wait before a restart; it doubles up to `max_backoff`.
    pub backoff: Duration,
    pub max_backoff: Duration,
    /// More failures than this within `window` and the supervisor gives up.
    pub max_failures: usize,
    pub window: Duration,
}

/// Starts, watches and restarts the background tasks. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Supervisor {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    policy: RestartPolicy,
    /// Tasks failed and not yet running again.
    down: AtomicUsize,
    /// Readiness may have changed.
    changed: Notify,
    running: Mutex<HashMap<&'static str, AbortHandle>>,
    /// The task that failed too often, once one has.
    gave_up: watch::Sender<Option<&'static str>>,
    /// Set when shutdown begins: a task returning from then on is done,
    /// not failed.
    stopping: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
}

impl Supervisor {
    /// `stopping` turns true when shutdown begins.
    pub fn new(policy: RestartPolicy, stopping: watch::Receiver<bool>, metrics: Arc<Metrics>) -> Self {
        Self {
            inner: Arc::new(Inner {
                policy,
                down: AtomicUsize::new(0),
                changed: Notify::new(),
                running: Mutex::default(),
                gave_up: watch::Sender::new(None),
                stopping,
                metrics,
            }),
        }
    }

    /// Runs an owner's task, each run with a fresh `stop()`. Resolves to
    /// what its last run could not write, or `None` if the supervisor gave
    /// up on it (or shutdown cut the run short).
    pub fn run(
        &self,
        task: crate::task::Task,
        stop: impl Fn() -> crate::task::Stop + Send + 'static,
    ) -> JoinHandle<Option<usize>> {
        let crate::task::Task { name, mut start, on_down, .. } = task;
        self.spawn(name, move || start(stop()), on_down)
    }

    /// Runs `start()`'s future as the task `name`, starting it again
    /// whenever it fails; `on_down` runs each time it does (e.g. to stop
    /// trusting what the task kept current). Resolves to the task's output
    /// once it returns during shutdown, or `None` if the supervisor gave up
    /// on it.
    pub fn spawn<T, F, Fut>(
        &self,
        name: &'static str,
        mut start: F,
        on_down: impl Fn() + Send + 'static,
    ) -> JoinHandle<Option<T>>
    where
        T: Send + 'static,
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = T> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        // Exported at zero from the start.
        inner.metrics.task_restarts.get_or_create(&TaskLabels { task: name }).inc_by(0);
        tokio::spawn(async move {
            let mut failures: VecDeque<Instant> = VecDeque::new();
            let mut backoff = inner.policy.backoff;
            loop {
                // In a set of its own: aborting the supervisor (shutdown
                // abandoning a stuck helper) aborts the run with it.
                let mut run = JoinSet::new();
                inner.lock_running().insert(name, run.spawn(start()));
                let why = match run.join_next().await {
                    Some(Ok(output)) if *inner.stopping.borrow() => return Some(output),
                    Some(Ok(_)) => "returned before shutdown",
                    Some(Err(e)) if e.is_panic() => "panicked",
                    _ => "was aborted",
                };
                inner.lock_running().remove(name);
                if *inner.stopping.borrow() {
                    // A run cut short by shutdown has nothing to hand back.
                    return None;
                }
                on_down();
                inner.metrics.task_restarts.get_or_create(&TaskLabels { task: name }).inc();
                let now = Instant::now();
                failures.push_back(now);
                while failures.front().is_some_and(|t| now.duration_since(*t) > inner.policy.window) {
                    failures.pop_front();
                }
                if failures.len() > inner.policy.max_failures {
                    tracing::error!(
                        task = name,
                        why,
                        failures = failures.len(),
                        "background task keeps failing; giving up"
                    );
                    inner.gave_up.send_replace(Some(name));
                    inner.went_down();
                    return None;
                }
                tracing::error!(
                    task = name,
                    why,
                    retry_ms = backoff.as_millis() as u64,
                    "background task failed; restarting"
                );
                inner.went_down();
                let mut stopping = inner.stopping.clone();
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    _ = stopping.wait_for(|s| *s) => {
                        inner.came_up();
                        return None;
                    }
                }
                backoff = (backoff * 2).min(inner.policy.max_backoff);
                inner.came_up();
            }
        })
    }

    /// Whether every task is running.
    pub fn ready(&self) -> bool {
        self.inner.down.load(Ordering::Relaxed) == 0
    }

    /// Tasks failed and not running now.
    pub fn down(&self) -> usize {
        self.inner.down.load(Ordering::Relaxed)
    }

    /// Resolves when readiness may have changed.
    pub async fn changed(&self) {
        self.inner.changed.notified().await;
    }

    /// Resolves with the task's name once the supervisor gives up on one.
    pub async fn gave_up(&self) -> &'static str {
        let mut gave_up = self.inner.gave_up.subscribe();
        let name = gave_up.wait_for(Option::is_some).await.ok().and_then(|name| *name);
        match name {
            Some(name) => name,
            // The sender lives in `inner`, which this holds: not reached.
            None => std::future::pending().await,
        }
    }

    /// Aborts the current run of `name` (it is restarted like any failed
    /// run); false if it is not running. For fault-injection tests.
    pub fn kill(&self, name: &str) -> bool {
        // Taken out, so that a second kill waits for the next run.
        match self.inner.lock_running().remove(name) {
            Some(run) => {
                run.abort();
                true
            }
            None => false,
        }
    }
}

impl Inner {
    fn lock_running(&self) -> std::sync::MutexGuard<'_, HashMap<&'static str, AbortHandle>> {
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn went_down(&self) {
        self.down.fetch_add(1, Ordering::Relaxed);
        // One waiter (the health monitor); a permit is kept if it is busy.
        self.changed.notify_one();
    }

    fn came_up(&self) {
        self.down.fetch_sub(1, Ordering::Relaxed);
        self.changed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU32;

    use super::*;

    fn policy(max_failures: usize) -> RestartPolicy {
        RestartPolicy {
            backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(40),
            max_failures,
            window: Duration::from_secs(60),
        }
    }

    #[tokio::test]
    async fn a_panicking_task_is_restarted_and_hands_back_its_output_at_shutdown() {
        let (stop, stopping) = watch::channel(false);
        let supervisor = Supervisor::new(policy(5), stopping.clone(), Arc::new(Metrics::default()));
        let starts = Arc::new(AtomicU32::new(0));
        let downs = Arc::new(AtomicU32::new(0));
        let (s, d) = (Arc::clone(&starts), Arc::clone(&downs));
        let task = supervisor.spawn(
            "flaky",
            move || {
                let n = s.fetch_add(1, Ordering::SeqCst);
                let mut stopping = stopping.clone();
                async move {
                    assert!(n > 0, "the first run fails");
                    let _ = stopping.wait_for(|s| *s).await;
                    7
                }
            },
            move || {
                d.fetch_add(1, Ordering::SeqCst);
            },
        );
        while starts.load(Ordering::SeqCst) < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(supervisor.ready());
        assert_eq!(downs.load(Ordering::SeqCst), 1);
        stop.send_replace(true);
        assert_eq!(task.await.unwrap(), Some(7));
    }

    #[tokio::test]
    async fn a_task_that_keeps_failing_is_given_up_on() {
        let (_stop, stopping) = watch::channel(false);
        let supervisor = Supervisor::new(policy(2), stopping, Arc::new(Metrics::default()));
        let task = supervisor.spawn("doomed", || async {}, || {});
        assert_eq!(supervisor.gave_up().await, "doomed");
        assert_eq!(task.await.unwrap(), None);
        assert!(!supervisor.ready());
    }
}
