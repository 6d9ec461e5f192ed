//! The task registry: the background tasks the parts offer ([`Task`]),
//! each started under the supervisor, and ended at shutdown by what it
//! holds: helpers get the flush timeout and are abandoned, flushers are
//! waited for and report what they could not write.

use std::{fmt, time::Duration};

use tokio::{sync::watch, task::JoinHandle};

use super::supervise::Supervisor;
use crate::task::{Ending, Stop, Task};

/// The tasks to start, in the order they were offered.
#[derive(Debug, Default)]
pub struct Tasks {
    tasks: Vec<Task>,
}

impl Tasks {
    pub fn add(&mut self, task: Task) {
        self.tasks.push(task);
    }

    /// Starts every task under `supervisor`; each run's stop resolves when
    /// `stopping` turns true.
    pub fn start(self, supervisor: &Supervisor, stopping: watch::Receiver<bool>) -> Running {
        let started = self
            .tasks
            .into_iter()
            .map(|task| {
                let (name, ending) = (task.name, task.ending);
                let stopping = stopping.clone();
                let stop = move || -> Stop { Box::pin(super::stopped(stopping.clone())) };
                (name, ending, supervisor.run(task, stop))
            })
            .collect();
        Running { started }
    }
}

/// The started tasks.
#[derive(Debug)]
pub struct Running {
    started: Vec<(&'static str, Ending, JoinHandle<Option<usize>>)>,
}

impl Running {
    /// Once shutdown has told the tasks to stop: gives the helpers until
    /// `timeout` and abandons them, then waits for each flusher (they
    /// bound their own final flush) and sums what they could not write.
    pub async fn finish(self, timeout: Duration) -> Unwritten {
        let (helpers, flushers): (Vec<_>, Vec<_>) =
            self.started.into_iter().partition(|(_, ending, _)| *ending == Ending::Abandoned);
        let deadline = tokio::time::Instant::now() + timeout;
        for (_, _, helper) in helpers {
            let abort = helper.abort_handle();
            if tokio::time::timeout_at(deadline, helper).await.is_err() {
                abort.abort();
            }
        }
        let mut unwritten = Unwritten::default();
        for (name, ending, flusher) in flushers {
            let Ending::Flushes(phrase) = ending else { continue };
            let count = match flusher.await {
                Ok(Some(count)) => count,
                // Given up on or cut short: what it held is not known to be written.
                Ok(None) => {
                    tracing::error!(task = name, "background task did not finish its final flush");
                    1
                }
                Err(e) => {
                    tracing::error!(task = name, error = %e, "background task failed");
                    1
                }
            };
            unwritten.add(phrase, count);
        }
        unwritten
    }
}

/// What the flushers could not write, summed by what they count.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Unwritten(Vec<(&'static str, usize)>);

impl Unwritten {
    fn add(&mut self, phrase: &'static str, count: usize) {
        match self.0.iter_mut().find(|(p, _)| *p == phrase) {
            Some((_, total)) => *total += count,
            None => self.0.push((phrase, count)),
        }
    }

    pub fn any(&self) -> bool {
        self.0.iter().any(|(_, count)| *count > 0)
    }
}

/// "3 audit rows and usage of 1 keys", in the order the tasks were offered.
impl fmt::Display for Unwritten {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> =
            self.0.iter().map(|(phrase, count)| phrase.replace("{n}", &count.to_string())).collect();
        f.write_str(&parts.join(" and "))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{metrics::Metrics, startup::supervise::RestartPolicy};

    fn supervisor(stopping: watch::Receiver<bool>) -> Supervisor {
        let policy = RestartPolicy {
            backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(1),
            max_failures: 3,
            window: Duration::from_secs(60),
        };
        Supervisor::new(policy, stopping, Arc::new(Metrics::default()))
    }

    /// A helper stuck past the timeout does not hold shutdown, and the
    /// flushers' counts are summed by what they count, in offer order.
    #[tokio::test]
    async fn shutdown_abandons_stuck_helpers_and_sums_what_flushers_left() {
        let (stop, stopping) = watch::channel(false);
        let mut tasks = Tasks::default();
        tasks.add(Task::flusher("audit", "{n} audit rows", |stop: Stop| async move {
            stop.await;
            2
        }));
        tasks.add(Task::helper("stuck", |_stop: Stop| std::future::pending::<()>()));
        tasks.add(Task::flusher("usage", "usage of {n} keys", |stop: Stop| async move {
            stop.await;
            0
        }));
        tasks.add(Task::flusher("rollups", "{n} audit rows", |stop: Stop| async move {
            stop.await;
            1
        }));
        let running = tasks.start(&supervisor(stopping.clone()), stopping);
        stop.send(true).unwrap();
        let unwritten =
            tokio::time::timeout(Duration::from_secs(5), running.finish(Duration::from_millis(50)))
                .await
                .expect("a stuck helper is abandoned");
        assert!(unwritten.any());
        assert_eq!(unwritten.to_string(), "3 audit rows and usage of 0 keys");
    }

    #[tokio::test]
    async fn nothing_unwritten_when_every_flusher_wrote_everything() {
        let (stop, stopping) = watch::channel(false);
        let mut tasks = Tasks::default();
        tasks.add(Task::flusher("usage", "usage of {n} keys", |stop: Stop| async move {
            stop.await;
            0
        }));
        let running = tasks.start(&supervisor(stopping.clone()), stopping);
        stop.send(true).unwrap();
        assert!(!running.finish(Duration::from_millis(50)).await.any());
    }
}
