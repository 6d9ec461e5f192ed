//! Readiness: the gRPC health statuses this replica reports, the monitor
//! that pings the database (reading its clock) and follows the background
//! tasks, and the end of health watches at drain.

use std::{future::Future, sync::Arc, time::Duration};

use tonic_health::{ServingStatus, server::HealthReporter};

use super::{HEALTH_SERVICES, supervise::Supervisor};
use crate::{cache::changes::Freshness, clock::DbClock, store::Store};

pub(super) async fn set_health(health: &HealthReporter, status: ServingStatus) {
    for service in HEALTH_SERVICES {
        health.set_service_status(service, status).await;
    }
}

/// Ends every open Watch stream once it has NOT_SERVING to deliver: an open
/// stream keeps its connection, and so the drain, busy until the grace
/// period runs out. Clearing a service closes its watchers' channel (they
/// still receive the last status first); setting it again keeps Check
/// answering NOT_SERVING rather than NOT_FOUND for the rest of the drain.
pub(super) async fn end_health_watches(mut health: HealthReporter) {
    for service in HEALTH_SERVICES {
        health.clear_service_status(service).await;
        health.set_service_status(service, ServingStatus::NotServing).await;
    }
}

/// Reads the database's clock into `clock`, and says when this replica's
/// own clock is far from it.
pub(super) async fn read_database_clock(
    store: &Store,
    clock: &DbClock,
) -> Result<(), crate::store::StoreError> {
    let sent = clock.local();
    let db = store.database_time().await?;
    match store.backend() {
        // An embedded database's clock is this machine's, which a reading
        // (to milliseconds) would only blur.
        crate::store::Backend::Sqlite => clock.same_machine(),
        crate::store::Backend::Postgres => clock.observe(db, sent, clock.local()),
    }
    let offset = clock.offset();
    if offset.num_milliseconds().abs() > CLOCK_OFFSET_WARNING_MS {
        tracing::warn!(
            offset_ms = offset.num_milliseconds(),
            "this replica's clock is off from the database's; decisions use the database's"
        );
    }
    Ok(())
}

/// An offset from the database's clock worth a warning (NTP keeps
/// clocks within milliseconds).
const CLOCK_OFFSET_WARNING_MS: i64 = 1_000;

/// Pings the database every `interval`; health follows [`Freshness::serving`]
/// (SERVING while the database answers or within the staleness bound after
/// it stopped) and the background tasks (NOT_SERVING while one is down).
pub(super) async fn monitor_database(
    store: Store,
    clock: Arc<DbClock>,
    freshness: Arc<Freshness>,
    health: HealthReporter,
    tasks: Supervisor,
    interval: Duration,
    stop: impl Future<Output = ()>,
) {
    tokio::pin!(stop);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut serving = true;
    loop {
        // A background task going down or up changes readiness at once;
        // the database is pinged on the ticker.
        let tick = tokio::select! {
            () = &mut stop => return,
            _ = ticker.tick() => true,
            () = tasks.changed() => false,
        };
        if tick {
            ping_database(&store, &clock, &freshness, interval).await;
        }
        let now_serving = freshness.serving() && tasks.ready();
        if now_serving != serving {
            serving = now_serving;
            let status = if serving { ServingStatus::Serving } else { ServingStatus::NotServing };
            tracing::warn!(?status, tasks_down = tasks.down(), "health changed");
            set_health(&health, status).await;
        }
    }
}

/// Reads the database's clock as the health ping and records whether the
/// database answered.
async fn ping_database(store: &Store, clock: &DbClock, freshness: &Freshness, interval: Duration) {
    let reading =
        tokio::time::timeout(interval.max(Duration::from_millis(500)), read_database_clock(store, clock));
    if matches!(reading.await, Ok(Ok(()))) {
        if !freshness.database_reachable() {
            tracing::info!("database reachable again");
        }
        freshness.database_up();
    } else {
        if freshness.database_reachable() {
            tracing::warn!("database unreachable: cached keys keep verifying within the staleness bound");
        }
        freshness.database_down();
    }
}
