//! The gateway's route table: loaded at start (an invalid file stops the
//! start), then read again every interval and swapped in whole when it
//! changed. A changed file that does not validate keeps the table in use;
//! it is logged and counted once per distinct content.

use std::{
    path::PathBuf,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::Context;
use tokio::sync::watch;

use crate::task::Task;
use crate::{keys::ScopeCatalogue, routes::RouteTable};

/// An empty table that denies everything: what Check serves without a
/// route file.
const DENY_ALL: &str = "unmatched = \"deny\"\n";

#[derive(Debug)]
pub struct RouteReloader {
    path: Option<PathBuf>,
    catalogue: Arc<ScopeCatalogue>,
    table: watch::Sender<Arc<RouteTable>>,
    /// The content last read (valid or not), to act once per change.
    last: Mutex<Vec<u8>>,
    reloads: AtomicU64,
    failures: AtomicU64,
}

impl RouteReloader {
    /// Loads `path` (or the deny-all table without one).
    pub fn load(path: Option<PathBuf>, catalogue: Arc<ScopeCatalogue>) -> anyhow::Result<Arc<Self>> {
        let (text, table) = match &path {
            Some(p) => {
                let text =
                    std::fs::read(p).with_context(|| format!("reading the route file {}", p.display()))?;
                let table = RouteTable::parse(&String::from_utf8_lossy(&text), &catalogue)
                    .with_context(|| format!("the route file {}", p.display()))?;
                tracing::info!(routes = table.len(), file = %p.display(), "route table loaded");
                (text, table)
            }
            None => (Vec::new(), RouteTable::parse(DENY_ALL, &catalogue)?),
        };
        Ok(Arc::new(Self {
            path,
            catalogue,
            table: watch::Sender::new(Arc::new(table)),
            last: Mutex::new(text),
            reloads: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        }))
    }

    /// The current table, kept current.
    pub fn subscribe(&self) -> watch::Receiver<Arc<RouteTable>> {
        self.table.subscribe()
    }

    pub fn routes(&self) -> usize {
        self.table.borrow().len()
    }

    /// New tables put in service.
    pub fn reloads(&self) -> u64 {
        self.reloads.load(Ordering::Relaxed)
    }

    /// Changed files refused (the previous table stayed).
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Reads the file again; swaps the table in if it changed and validates.
    pub fn reload(&self) {
        let Some(path) = &self.path else { return };
        let text = match std::fs::read(path) {
            Ok(text) => text,
            Err(e) => {
                if self.changed_to(Vec::new()) {
                    self.failures.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(error = %e, file = %path.display(), "cannot read the route file; keeping the current table");
                }
                return;
            }
        };
        if !self.changed_to(text.clone()) {
            return;
        }
        match RouteTable::parse(&String::from_utf8_lossy(&text), &self.catalogue) {
            Ok(table) => {
                tracing::info!(routes = table.len(), file = %path.display(), "route table reloaded");
                self.table.send_replace(Arc::new(table));
                self.reloads.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, file = %path.display(), "the changed route file is invalid; keeping the current table");
            }
        }
    }

    /// Records `text` as the last content seen; whether it differs.
    fn changed_to(&self, text: Vec<u8>) -> bool {
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        if *last == text {
            return false;
        }
        *last = text;
        true
    }

    /// The reloader as a background task ([`RouteReloader::watch`]).
    pub fn task(self: &Arc<Self>, interval: Duration) -> Task {
        let routes = Arc::clone(self);
        Task::helper("route table reloader", move |stop| Arc::clone(&routes).watch(interval, stop))
    }

    /// Reloads every `interval` until `stop`.
    pub async fn watch(self: Arc<Self>, interval: Duration, stop: impl Future<Output = ()>) {
        if self.path.is_none() {
            return stop.await;
        }
        tokio::pin!(stop);
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = &mut stop => return,
                _ = ticker.tick() => self.reload(),
            }
        }
    }
}
