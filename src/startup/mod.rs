//! Assembly: this file builds every part from the settings
//! ([`Application::build`]) and runs them until shutdown, in order: stop
//! taking calls → drain → flush usage and audit → close.
//!
//! Serving (listeners, the tower stack, the drain) is `serve`; the
//! background tasks the parts offer are registered in [`tasks`] and run
//! under [`supervise`]; readiness is `health`. [`tls`] accepts
//! connections, [`exporter`] serves `/metrics`, [`routes`] reloads the
//! gateway's route table.

mod build;
pub mod exporter;
mod health;
pub mod routes;
pub mod secrets;
mod serve;
pub mod supervise;
pub mod tasks;
pub mod tls;

pub use build::secure_embedded_data_dir;

use std::{future::Future, net::SocketAddr, sync::Arc};

use tokio::sync::watch;
use tonic_health::ServingStatus;

use health::{end_health_watches, monitor_database, set_health};

use crate::{
    audit::{rollup::Rollups, writer::AuditQueue},
    cache::{VerifyCache, changes::Freshness},
    clock::DbClock,
    config::Settings,
    metrics::Metrics,
    service::hash_pool::HashPool,
    startup::supervise::Supervisor,
    store::Store,
    throttle::GuessThrottle,
    usage::UsageTracker,
};
use exporter::Exporter;
use serve::{Listeners, Services};
use tasks::Tasks;

/// Names under which grpc.health.v1 reports readiness; "" is the whole
/// server. They follow the database (within the staleness bound) and turn
/// NOT_SERVING on shutdown.
const HEALTH_SERVICES: [&str; 3] = ["", "keywarden.v1.KeyVerify", "keywarden.v1.KeyAdmin"];
/// Liveness: SERVING while the process answers at all, so that a database
/// outage makes replicas unready but never gets them restarted.
const LIVENESS: &str = "liveness";
/// A built, bound, not yet serving keywarden.
pub struct Application {
    settings: Settings,
    listeners: Listeners,
    services: Services,
    metrics_addr: Option<SocketAddr>,
    /// The background tasks the parts offered, started on `run_until_stopped`.
    tasks: Tasks,
    /// Restarts failed background tasks; `stop_tasks` ends them.
    supervisor: Supervisor,
    stop_tasks: watch::Sender<bool>,
    tasks_stopped: watch::Receiver<bool>,
    /// Turns true when the drain starts; long-lived streams end on it.
    draining: watch::Sender<bool>,
    probes: Probes,
}

impl std::fmt::Debug for Application {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Application")
            .field("listen", &self.listeners.main.local_addr().ok())
            .finish_non_exhaustive()
    }
}

/// Handles on a running application, for tests and the benchmark.
#[derive(Debug, Clone)]
pub struct Probes {
    pub store: Store,
    pub pool: HashPool,
    /// KeyAdmin's own scrypt thread.
    pub admin_pool: HashPool,
    pub throttle: Arc<GuessThrottle>,
    pub rollups: Arc<Rollups>,
    pub audit: AuditQueue,
    pub usage: Arc<UsageTracker>,
    pub cache: Option<Arc<VerifyCache>>,
    pub freshness: Arc<Freshness>,
    /// The database's clock as this replica estimates it.
    pub clock: Arc<DbClock>,
    pub metrics: Arc<Metrics>,
    pub exporter: Exporter,
    /// The background tasks' supervisor (tests kill tasks through it).
    pub tasks: Supervisor,
}

impl Application {
    pub fn local_addr(&self) -> SocketAddr {
        self.listeners.main.local_addr().unwrap_or(self.settings.listen_addr)
    }

    /// Where KeyAdmin is served, when it has its own listener.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.listeners.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Where the plaintext health listener is, if configured.
    pub fn health_addr(&self) -> Option<SocketAddr> {
        self.listeners.health.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Where GitHub's leak reports are taken, if configured.
    pub fn leak_report_addr(&self) -> Option<SocketAddr> {
        self.listeners.leaks.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Whether the gRPC listeners serve TLS.
    pub fn serves_tls(&self) -> bool {
        self.listeners.tls.is_some()
    }

    /// Where `/metrics` is served, if enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    pub fn probes(&self) -> Probes {
        self.probes.clone()
    }

    /// Serves until `shutdown` resolves, then drains and flushes.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Self {
            settings,
            listeners,
            services,
            tasks,
            supervisor,
            stop_tasks,
            tasks_stopped,
            draining: draining_tx,
            probes: Probes { store, clock, freshness, metrics, .. },
            ..
        } = self;
        // Every background task runs under the supervisor: restarted when
        // it fails, and the replica not ready while it is down.
        let running = tasks.start(&supervisor, tasks_stopped);

        let (health, health_service) = tonic_health::server::health_reporter();
        set_health(&health, ServingStatus::Serving).await;
        health.set_service_status(LIVENESS, ServingStatus::Serving).await;
        let (stop_monitor, monitor_stopped) = watch::channel(false);
        let monitor = tokio::spawn(monitor_database(
            store.clone(),
            Arc::clone(&clock),
            Arc::clone(&freshness),
            health.clone(),
            supervisor.clone(),
            settings.health_check_interval(),
            stopped(monitor_stopped),
        ));

        // A task the supervisor gave up on stops the process like a signal,
        // and the run then ends in an error (a non-zero exit).
        let gave_up: Arc<std::sync::OnceLock<&'static str>> = Arc::default();
        let signal = {
            let (health, tasks, gave_up) = (health.clone(), supervisor.clone(), Arc::clone(&gave_up));
            let draining_tx = draining_tx.clone();
            async move {
                tokio::select! {
                    () = shutdown => tracing::info!("shutdown requested: no longer serving, draining in-flight calls"),
                    task = tasks.gave_up() => {
                        let _ = gave_up.set(task);
                        tracing::error!(task, "a background task cannot be kept running: draining and exiting");
                    }
                }
                // Stop the monitor first so it cannot report SERVING again.
                let _ = stop_monitor.send(true);
                let _ = monitor.await;
                set_health(&health, ServingStatus::NotServing).await;
                end_health_watches(health).await;
                let _ = draining_tx.send(true);
            }
        };
        tokio::spawn(signal);

        let access = Arc::clone(&services.access);
        serve::serve(&settings, listeners, services, health_service, &metrics, draining_tx.subscribe())
            .await?;
        // Summaries of refusals still being counted go out with the rest.
        access.flush().await;

        tracing::info!("flushing usage counts and audit rows");
        let _ = stop_tasks.send(true);
        let unwritten = running.finish(settings.flush_timeout()).await;
        // Closing waits for connections in use; one may be stuck on a lock.
        if tokio::time::timeout(settings.flush_timeout(), store.close()).await.is_err() {
            tracing::warn!("database connections did not close in time; leaving them to the exit");
        }
        if let Some(task) = gave_up.get() {
            anyhow::bail!("stopped because the background task \"{task}\" kept failing");
        }
        if unwritten.any() {
            anyhow::bail!(
                "stopped with {unwritten} unwritten and not on local disk \
                 (the database stayed unreachable for flush_timeout_ms)"
            );
        }
        tracing::info!("stopped");
        Ok(())
    }
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed before this
/// returns, so a signal sent as soon as the server says it is serving drains
/// it instead of killing the process.
pub fn shutdown_signal() -> std::io::Result<impl Future<Output = ()>> {
    #[cfg(unix)]
    let (mut term, mut int) = {
        use tokio::signal::unix::{SignalKind, signal};
        (signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?)
    };
    Ok(async move {
        #[cfg(unix)]
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    })
}
