//! A background task as its owner offers it: a name, how to start a run,
//! what going down means for the rest of the replica, and what shutdown
//! does with it. Owners (the usage tracker, the audit writer, the change
//! feed, the refill and retention jobs, ...) build their own [`Task`];
//! `startup` registers them and runs each under its supervisor, which
//! restarts a failed run with backoff.

use std::{future::Future, pin::Pin};

/// Resolves when shutdown begins; every run gets one.
pub type Stop = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A run in progress: resolves to how much it could not write.
pub type Run = Pin<Box<dyn Future<Output = usize> + Send>>;

/// What shutdown does with a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// It holds data (counts, audit rows): shutdown waits for its final
    /// flush, and what it could not write fails the exit, named by this
    /// phrase with `{n}` replaced by the count ("{n} audit rows").
    Flushes(&'static str),
    /// It holds nothing: it gets the flush timeout to finish what it is
    /// doing, then is abandoned, so that a statement stuck on a lock
    /// cannot hold the process.
    Abandoned,
}

/// One background task.
pub struct Task {
    pub name: &'static str,
    pub ending: Ending,
    /// Begins a run; called again for each restart.
    pub start: Box<dyn FnMut(Stop) -> Run + Send>,
    /// Called each time a run fails, before the next one starts.
    pub on_down: Box<dyn Fn() + Send + Sync>,
}

impl std::fmt::Debug for Task {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Task").field("name", &self.name).field("ending", &self.ending).finish_non_exhaustive()
    }
}

impl Task {
    /// A task that holds no data; `start` begins a run that ends on its stop.
    pub fn helper<F, Fut>(name: &'static str, mut start: F) -> Self
    where
        F: FnMut(Stop) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        Self {
            name,
            ending: Ending::Abandoned,
            start: Box::new(move |stop| {
                let run = start(stop);
                Box::pin(async move {
                    run.await;
                    0
                })
            }),
            on_down: Box::new(|| {}),
        }
    }

    /// A task that holds data; its run returns, after its final flush, how
    /// much it could neither write nor keep on local disk, which `unwritten`
    /// names (`{n}` is the count).
    pub fn flusher<F, Fut>(name: &'static str, unwritten: &'static str, mut start: F) -> Self
    where
        F: FnMut(Stop) -> Fut + Send + 'static,
        Fut: Future<Output = usize> + Send + 'static,
    {
        Self {
            name,
            ending: Ending::Flushes(unwritten),
            start: Box::new(move |stop| Box::pin(start(stop))),
            on_down: Box::new(|| {}),
        }
    }

    /// Runs `f` each time a run fails, before the next one starts (e.g. to
    /// stop trusting what the task kept current).
    #[must_use]
    pub fn on_down(mut self, f: impl Fn() + Send + Sync + 'static) -> Self {
        self.on_down = Box::new(f);
        self
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };

    use super::*;

    #[tokio::test]
    async fn a_helper_reports_nothing_unwritten_and_a_flusher_its_own_count() {
        let mut helper = Task::helper("h", |stop: Stop| stop);
        let mut flusher = Task::flusher("f", "{n} rows", |stop: Stop| async move {
            stop.await;
            3
        });
        assert_eq!((helper.ending, flusher.ending), (Ending::Abandoned, Ending::Flushes("{n} rows")));
        assert_eq!((helper.start)(Box::pin(async {})).await, 0);
        assert_eq!((flusher.start)(Box::pin(async {})).await, 3);
    }

    #[test]
    fn going_down_runs_the_owners_hook() {
        let downs = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&downs);
        let task = Task::helper("h", |stop: Stop| stop).on_down(move || {
            counted.fetch_add(1, Ordering::Relaxed);
        });
        (task.on_down)();
        (task.on_down)();
        assert_eq!(downs.load(Ordering::Relaxed), 2);
    }
}
