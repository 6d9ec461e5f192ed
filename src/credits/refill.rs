//! The refill job: at every UTC day boundary (month boundaries are day
//! boundaries) each balance whose refill is due is set back to its amount,
//! on whichever replica takes the lock, and this replica's view of the
//! balances follows what was written.

use std::{future::Future, sync::Arc, time::Duration};

use crate::{clock::DbClock, keys::RefillInterval, store::Store, task::Task, usage::UsageTracker};

/// Longest sleep between refill checks, so that a clock that jumps (or a
/// boundary missed while the database was away) is noticed soon.
const REFILL_CHECK: Duration = Duration::from_secs(60);

/// The refill as a background task ([`run`]).
pub fn task(store: Store, usage: Arc<UsageTracker>, clock: Arc<DbClock>, offset: chrono::Duration) -> Task {
    Task::helper("credits refill", move |stop| {
        run(store.clone(), Arc::clone(&usage), Arc::clone(&clock), offset, stop)
    })
}

/// Refills credits at every UTC day boundary (month boundaries are day
/// boundaries), on whichever replica takes the lock; at start too, to catch
/// up on boundaries passed while no replica ran.
pub async fn run(
    store: Store,
    usage: Arc<UsageTracker>,
    clock: Arc<DbClock>,
    offset: chrono::Duration,
    stop: impl Future<Output = ()>,
) {
    tokio::pin!(stop);
    loop {
        let now = clock.now() + offset;
        match store.refill_credits(now).await {
            Ok(Some(refilled)) if !refilled.is_empty() => {
                tracing::info!(keys = refilled.len(), "credits refilled");
                usage.sync(&refilled);
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "refilling credits failed; will retry"),
        }
        let next = RefillInterval::Daily.next_boundary(now);
        let wait = (next - now).to_std().unwrap_or_default().min(REFILL_CHECK);
        tokio::select! {
            () = &mut stop => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}
