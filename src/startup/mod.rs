//! Assembly: this file builds every part from the settings
//! ([`Application::build`]) and runs them until shutdown, in order: stop
//! taking calls → drain → flush usage and audit → close.
//!
//! Serving (listeners, the tower stack, the drain) is `serve`; the
//! background tasks the parts offer are registered in [`tasks`] and run
//! under [`supervise`]; readiness is `health`. [`tls`] accepts
//! connections, [`exporter`] serves `/metrics`, [`routes`] reloads the
//! gateway's route table.

pub mod exporter;
mod health;
pub mod routes;
mod serve;
pub mod supervise;
pub mod tasks;
pub mod tls;

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::{net::TcpListener, sync::watch};
use tonic_health::ServingStatus;

use health::{end_health_watches, monitor_database, read_database_clock, set_health};

use crate::{
    api::{
        access_log::{AccessLogCounters, AccessLogSink},
        callers::Callers,
        ext_authz::CheckService,
        key_admin::KeyAdminService,
        key_verify::KeyVerifyService,
    },
    audit::writer::{self, AuditQueue},
    audit::{rollup::Rollups, spool::Spool},
    cache::{
        VerifyCache,
        changes::{ChangeFeed, Freshness},
    },
    clock::DbClock,
    config::{RateLimitMode, Secrets, Settings},
    credits::{Credits, LeasedCredits},
    fleet::{Redis, WarmStart},
    keys::{EventIds, events::KeyEventSink, operator::TokenDigester},
    limiter::{LeasedLimiter, Limiter, LocalLimiter},
    metrics::Metrics,
    service::{
        Deps,
        access::Access,
        admin::KeyManager,
        events::KeyEvents,
        gateway::Gateway,
        hash_pool::HashPool,
        operators::OperatorTokens,
        peppers::Peppers,
        rehash::Rehasher,
        verify::{Verifier, VerifyParts},
    },
    startup::supervise::{RestartPolicy, Supervisor},
    store::{Store, StoreOptions, lane::DbLane},
    throttle::GuessThrottle,
    usage::UsageTracker,
};
use exporter::{Exporter, Sources};
use routes::RouteReloader;
use serve::{Listeners, Services};
use tasks::Tasks;
use tls::TlsSource;

/// Names under which grpc.health.v1 reports readiness; "" is the whole
/// server. They follow the database (within the staleness bound) and turn
/// NOT_SERVING on shutdown.
const HEALTH_SERVICES: [&str; 3] = ["", "keywarden.v1.KeyVerify", "keywarden.v1.KeyAdmin"];
/// Liveness: SERVING while the process answers at all, so that a database
/// outage makes replicas unready but never gets them restarted.
const LIVENESS: &str = "liveness";
/// The pepper subkey's purpose for operator token digests.
const OPERATOR_DIGEST_PURPOSE: &str = "keywarden operator token v1";
/// scrypt threads reserved for KeyAdmin (create, regenerate).
const ADMIN_HASH_WORKERS: usize = 1;
/// Says at start when live keys or operator tokens are stored under a
/// pepper this replica was not given: they cannot verify or authenticate
/// here. Serving goes on (retiring a pepper early may be deliberate), and a
/// failed count only means the warning is skipped.
async fn warn_of_missing_peppers(peppers: &Peppers, clock: &DbClock) {
    match peppers.missing(clock.now()).await {
        Ok(missing) => {
            for (pepper, live) in missing {
                tracing::error!(%pepper, live, "live keys or operator tokens are hashed under a pepper that is not configured; they cannot verify until it is");
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot count keys by pepper generation"),
    }
}

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

/// On the embedded default, makes the data directory and its private files
/// readable by this user only, warning of each it had to tighten. `serve`
/// and `migrate` both start here.
pub fn secure_embedded_data_dir(settings: &Settings) -> anyhow::Result<()> {
    if settings.database_url.is_some() {
        return Ok(());
    }
    let tightened = crate::config::secure_data_dir(&settings.data_dir)
        .with_context(|| format!("securing data directory {}", settings.data_dir.display()))?;
    for path in tightened {
        tracing::warn!(path = %path.display(), "was readable by other users; tightened to owner-only");
    }
    Ok(())
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        secure_embedded_data_dir(&settings)?;
        let tls_settings = settings.tls()?;
        let secrets = Secrets::resolve(&settings)?;
        let catalogue = Arc::new(settings.catalogue()?);
        let routes = RouteReloader::load(settings.routes_file.clone(), Arc::clone(&catalogue))?;
        let prefix = settings.key_prefix()?;
        let options = StoreOptions {
            max_connections: settings.db_max_connections,
            acquire_timeout: settings.db_acquire_timeout(),
        };
        let store = Store::connect(&settings.database_url(), &options).await.with_context(|| {
            format!("connecting to {}", crate::store::redact_url(&settings.database_url()))
        })?;
        let schema = store.prepare_schema(settings.migrate_on_start).await.context("checking the schema")?;
        if !schema.unknown.is_empty() {
            tracing::warn!(
                migrations = ?schema.unknown,
                "the database has migrations of a newer release; serving on it (releases are N-1 compatible)"
            );
        }
        // Revocation and expiry are decided on the database's clock, read
        // before serving and at every health check.
        let clock = Arc::new(DbClock::skewed(chrono::Duration::milliseconds(settings.clock_skew_ms)));
        read_database_clock(&store, &clock).await.context("reading the database's clock")?;

        let pool =
            HashPool::new(settings.hash_workers(), settings.hash_queue).context("starting scrypt threads")?;
        // CreateKey and RegenerateKey hash on their own thread, so that an
        // emergency rotation never waits behind Verify's cold keys.
        let admin_pool = HashPool::named("keywarden-scrypt-admin", ADMIN_HASH_WORKERS, settings.hash_queue)
            .context("starting the admin scrypt thread")?;
        let throttle = Arc::new(GuessThrottle::new(settings.throttle()));
        let rollups = Arc::new(Rollups::default());
        // First, so that the spool's lock makes this process the only one
        // on the directory before it reads what an earlier one left.
        let spool = match settings.audit_spool_dir() {
            Some(dir) => Some(Arc::new(
                Spool::open(&dir, settings.audit_spool_max_bytes)
                    .with_context(|| format!("opening the audit spool in {}", dir.display()))?,
            )),
            None => None,
        };
        // Usage spilled during an outage goes beside the audit rows spooled
        // in it, and is applied before this process reads any balance.
        let usage_spill = match settings.audit_spool_dir() {
            Some(dir) => Some(
                crate::usage::spill::Spill::open(&dir.join("usage"))
                    .with_context(|| format!("opening the usage spill in {}", dir.display()))?,
            ),
            None => None,
        };
        let usage = UsageTracker::new(store.clone(), usage_spill, Arc::clone(&clock));
        usage.recover().await.context("applying usage spilled by an earlier process")?;
        let (audit, audit_writer) =
            writer::channel(store.clone(), &settings.audit(), spool, Arc::clone(&clock));
        let cache = if settings.cache_enabled {
            Some(Arc::new(VerifyCache::new(&settings.cache()).context("seeding the cache secret")?))
        } else {
            tracing::warn!("verification cache disabled: every Verify runs scrypt");
            None
        };
        let freshness = match store.listen_pool() {
            Some(_) => Freshness::awaiting_listener(settings.staleness_bound()),
            None => Freshness::in_process(settings.staleness_bound()),
        };
        let metrics = Arc::new(Metrics::default());
        // Redis is optional, and its absence at start is not fatal: the
        // connection opens in the background and every use falls back.
        let redis = match settings.fleet()? {
            Some(fleet) => Some((Redis::start(&fleet, Arc::clone(&metrics))?, fleet)),
            None => None,
        };
        let warm = redis
            .as_ref()
            .map(|(redis, fleet)| Arc::new(WarmStart::new(Arc::clone(redis), fleet, Arc::clone(&metrics))));
        // Verify's share of database connections: identification's reads,
        // RecordOutcomes and the fleet credits' seed reads.
        let verify_lane = DbLane::new(settings.db_verify_connections(), settings.db_acquire_timeout());
        let (limiter, credits) = match (settings.rate_limit_mode()?, &redis) {
            (RateLimitMode::Redis, Some((redis, _))) => {
                let local = Arc::new(LocalLimiter::default());
                let leased = LeasedLimiter::new(
                    Arc::clone(redis),
                    Arc::clone(&local),
                    settings.rate_limit_on_redis_failure,
                    Arc::clone(&metrics),
                );
                let credits = LeasedCredits::new(
                    Arc::clone(redis),
                    store.clone(),
                    verify_lane.clone(),
                    Arc::clone(&metrics),
                );
                (Limiter::leased(local, Arc::new(leased)), Some(Arc::new(credits)))
            }
            _ => (Limiter::local(), None),
        };
        let limiter = Arc::new(limiter);
        let (stop_tasks, tasks_stopped) = watch::channel(false);
        let supervisor =
            Supervisor::new(restart_policy(&settings), tasks_stopped.clone(), Arc::clone(&metrics));
        let tls = match tls_settings {
            Some(t) => Some(TlsSource::load(t, Arc::clone(&metrics)).context("loading the TLS certificate")?),
            None => None,
        };
        // Keys checked under an old pepper are hashed again on KeyAdmin's
        // scrypt thread, behind its own work.
        let rehasher = Rehasher::new(store.clone(), secrets.hasher.clone(), admin_pool.clone());
        let access_log_counters = Arc::new(AccessLogCounters::default());
        let exporter = Exporter::new(
            &metrics,
            Sources {
                pool: pool.clone(),
                admin_pool: admin_pool.clone(),
                throttle: Arc::clone(&throttle),
                limiter: Arc::clone(&limiter),
                credits: credits.clone(),
                audit: audit.clone(),
                usage: Arc::clone(&usage),
                cache: cache.clone(),
                freshness: Arc::clone(&freshness),
                tasks: supervisor.clone(),
                rehasher: Arc::clone(&rehasher),
                routes: Arc::clone(&routes),
                access_log: Arc::clone(&access_log_counters),
            },
        );
        let access = Arc::new(
            Access::new(
                store.clone(),
                TokenDigester::new(secrets.hasher.subkey_macs(OPERATOR_DIGEST_PURPOSE)),
                &secrets.admin_tokens,
                settings.operator_identities.clone(),
                audit.clone(),
                Arc::clone(&metrics),
                Arc::clone(&clock),
            )
            .throttling(GuessThrottle::new(settings.throttle())),
        );
        let operators = Arc::new(OperatorTokens::new(store.clone(), Arc::clone(&access)));
        let event_ids = EventIds::new(secrets.hasher.subkey_macs(crate::keys::event_id::PURPOSE));
        let peppers = Arc::new(Peppers::new(store.clone(), secrets.hasher.clone(), Arc::clone(&access)));
        warn_of_missing_peppers(&peppers, &clock).await;
        let deps = Deps {
            store: store.clone(),
            hasher: secrets.hasher,
            pool: pool.clone(),
            catalogue,
            prefix,
            usage: Arc::clone(&usage),
            clock: Arc::clone(&clock),
        };
        // This replica's sinks hear of its own changes once they commit;
        // other replicas hear through the change feed.
        let mut sinks: Vec<Arc<dyn KeyEventSink>> = Vec::new();
        if let Some(cache) = &cache {
            sinks.push(Arc::clone(cache) as Arc<dyn KeyEventSink>);
        }
        if let Some(warm) = &warm {
            sinks.push(Arc::clone(warm) as Arc<dyn KeyEventSink>);
        }
        let manager = KeyManager::new(
            Deps { pool: admin_pool.clone(), ..deps.clone() },
            KeyEvents::new(sinks),
            Arc::clone(&access),
        );
        let verifier = Arc::new(Verifier::new(
            deps,
            VerifyParts {
                audit: audit.clone(),
                ids: event_ids,
                rollups: Arc::clone(&rollups),
                throttle: Arc::clone(&throttle),
                limiter: Arc::clone(&limiter),
                lane: verify_lane,
                credits: Arc::new(match &credits {
                    Some(leased) => Credits::shared(Arc::clone(leased), Arc::clone(&usage)),
                    None => Credits::local(Arc::clone(&usage)),
                }),
                cache: cache.clone(),
                freshness: Arc::clone(&freshness),
                metrics: Arc::clone(&metrics),
                rehasher: Arc::clone(&rehasher),
                warm,
            },
        ));
        let gateway =
            Arc::new(Gateway::new(Arc::clone(&verifier), routes.subscribe(), settings.trusted_proxy_hops));
        let (draining, draining_rx) = watch::channel(false);
        let access_log = AccessLogSink::new(
            Arc::clone(&verifier),
            access_log_counters,
            settings.access_log_stream_max_age(),
            draining_rx,
        );
        let listener = TcpListener::bind(settings.listen_addr)
            .await
            .with_context(|| format!("binding {}", settings.listen_addr))?;
        let admin_listener = match settings.admin_listen_addr {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding the admin listener {addr}"))?,
            ),
            None => None,
        };
        let health_listener = match settings.health_listen_addr {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding the health listener {addr}"))?,
            ),
            None => None,
        };
        if tls.is_none() {
            for addr in [Some(settings.listen_addr), settings.admin_listen_addr].into_iter().flatten() {
                if !addr.ip().is_loopback() {
                    tracing::warn!(%addr, "serving plaintext gRPC beyond loopback (allow_plaintext): keys and tokens cross the network in clear");
                }
            }
        }
        let metrics_listener = if settings.metrics_enabled {
            Some(
                TcpListener::bind(settings.metrics_addr)
                    .await
                    .with_context(|| format!("binding the metrics endpoint {}", settings.metrics_addr))?,
            )
        } else {
            None
        };
        let metrics_addr = metrics_listener.as_ref().and_then(|l| l.local_addr().ok());

        // The background tasks, as their owners offer them. The flushers
        // first, in the order the exit error names what they left.
        let mut tasks = Tasks::default();
        tasks.add(audit_writer.task(settings.flush_timeout()));
        tasks.add(rollups.task(
            store.clone(),
            Arc::clone(&clock),
            settings.audit_rollup_interval(),
            settings.flush_timeout(),
        ));
        tasks.add(usage.flusher(
            settings.usage_flush_interval(),
            settings.audit().spill_after,
            settings.flush_timeout(),
        ));
        tasks.add(routes.task(settings.routes_reload_interval()));
        tasks.add(rehasher.task());
        if let Some(pool) = store.listen_pool() {
            tasks.add(ChangeFeed::task(
                pool.clone(),
                cache.clone(),
                Arc::clone(&freshness),
                Arc::clone(&metrics),
                store.clone(),
                settings.feed_heartbeat_interval(),
            ));
        }
        if let Some(listener) = metrics_listener {
            tasks.add(exporter::task(listener, exporter.clone()).context("the metrics listener's address")?);
        }
        if let Some(tls) = &tls {
            tasks.add(tls.task());
        }
        tasks.add(access.summaries());
        if let Some(credits) = &credits {
            // Credits held unused go back to the fleet, and all at shutdown.
            tasks.add(credits.task());
        }
        tasks.add(crate::credits::refill::task(
            store.clone(),
            Arc::clone(&usage),
            Arc::clone(&clock),
            chrono::Duration::milliseconds(settings.refill_clock_offset_ms),
        ));
        tasks.add(crate::audit::retention::task(
            store.clone(),
            Arc::clone(&clock),
            settings.audit_retention(),
            settings.audit_retention_interval(),
        ));

        let probes = Probes {
            store,
            pool,
            admin_pool,
            throttle,
            rollups,
            audit,
            usage,
            cache,
            freshness,
            clock,
            metrics,
            exporter,
            tasks: supervisor.clone(),
        };
        Ok(Self {
            listeners: Listeners { main: listener, admin: admin_listener, health: health_listener, tls },
            services: Services {
                admin: KeyAdminService::new(Arc::new(manager), operators, peppers),
                verify: KeyVerifyService::new(verifier),
                check: CheckService::new(gateway),
                access_log,
                access,
                callers: Callers::new(&settings.verify_callers, settings.outcome_reporters.as_deref()),
            },
            settings,
            metrics_addr,
            tasks,
            supervisor,
            stop_tasks,
            tasks_stopped,
            draining,
            probes,
        })
    }

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

fn restart_policy(settings: &Settings) -> RestartPolicy {
    let backoff = Duration::from_millis(settings.task_restart_backoff_ms.max(1));
    RestartPolicy {
        backoff,
        max_backoff: backoff.max(Duration::from_secs(5)),
        max_failures: settings.task_restart_limit,
        window: Duration::from_secs(60),
    }
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
