//! The retention job: what the audit trail and the writers around it keep,
//! and for how long. Every interval it deletes audit rows past the
//! configured retention in bounded batches (one replica at a time, under a
//! lock), outcomes held for rows that never appeared, and the ids of usage
//! flushes old enough that no retry can come.

use std::{future::Future, sync::Arc, time::Duration};

use crate::{clock::DbClock, store::Store, task::Task};

/// Rows deleted per retention statement: small enough not to hold locks long.
const RETENTION_BATCH: u64 = 5_000;

/// How long applied usage flush ids are remembered. A flush is retried every
/// interval until it is confirmed, so a retry of a committed flush comes as
/// soon as the database answers again; a week covers any outage survived.
const USAGE_FLUSH_MEMORY: chrono::Duration = chrono::Duration::days(7);

/// Retention as a background task ([`run`]).
pub fn task(store: Store, clock: Arc<DbClock>, retention: Option<chrono::Duration>, every: Duration) -> Task {
    Task::helper("audit retention", move |stop| {
        run(store.clone(), Arc::clone(&clock), retention, every, stop)
    })
}

/// Every `every`: deletes audit rows older than `retention` (if set) in
/// bounded batches, outcomes held for rows that never appeared, and usage
/// flush ids older than a week (`USAGE_FLUSH_MEMORY`).
pub async fn run(
    store: Store,
    clock: Arc<DbClock>,
    retention: Option<chrono::Duration>,
    every: Duration,
    stop: impl Future<Output = ()>,
) {
    tokio::pin!(stop);
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = &mut stop => return,
            _ = ticker.tick() => {}
        }
        // Rows and flush ids were stamped on the database's clock.
        let now = clock.now();
        if let Err(e) = store.expire_held_outcomes(now - super::QUEUE_HORIZON * 6).await {
            tracing::warn!(error = %e, "expiring held outcomes failed; will retry");
        }
        if let Err(e) = store.delete_usage_flushes_before(now - USAGE_FLUSH_MEMORY).await {
            tracing::warn!(error = %e, "forgetting old usage flush ids failed; will retry");
        }
        let Some(retention) = retention else { continue };
        let cutoff = now - retention;
        let mut deleted = 0;
        loop {
            match store.delete_audit_before(cutoff, RETENTION_BATCH).await {
                Ok(Some(n)) => {
                    deleted += n;
                    if n < RETENTION_BATCH {
                        break;
                    }
                }
                // Another replica holds the retention lock this round.
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "audit retention failed; will retry");
                    break;
                }
            }
        }
        if deleted > 0 {
            tracing::info!(deleted, cutoff = %cutoff.to_rfc3339(), "pruned audit rows past retention");
        }
    }
}
