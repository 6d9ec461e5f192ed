//! Assembly: connect the store, migrate, wire the services, serve, and shut
//! down in order (stop taking calls → drain → flush usage and audit → close).
//!
//! Background tasks, all stopped on shutdown: the usage flusher, the audit
//! writer, the change listener (PostgreSQL), the database health monitor,
//! the audit retention job, the TLS file watcher and the refusal summaries.
//!
//! Listeners: the verify listener (KeyVerify, health, reflection, and
//! KeyAdmin unless it has its own), the optional admin listener, both TLS
//! when configured ([`tls`]), and the optional plaintext health listener.
//! [`exporter`] serves `/metrics`.

pub mod exporter;
mod health;
pub mod routes;
pub mod supervise;
pub mod tls;

use std::{future::Future, net::SocketAddr, pin::Pin, sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tonic::{server::NamedService, transport::Server};
use tonic_health::ServingStatus;

use health::{end_health_watches, monitor_database, read_database_clock, set_health};
use tower::ServiceBuilder;

use crate::{
    api::{
        self,
        access_log::{AccessLogCounters, AccessLogSink},
        auth::AdminAuthLayer,
        callers::Callers,
        ext_authz::CheckService,
        key_admin::KeyAdminService,
        key_verify::KeyVerifyService,
        lifetime::CallLifetimeLayer,
        limits::{MessageLimitLayer, MessageLimits},
        pb::{key_admin_server::KeyAdminServer, key_verify_server::KeyVerifyServer},
    },
    audit::writer::{self, AuditQueue, AuditWriter},
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
use envoy_types::{
    ext_authz::v3::pb::AuthorizationServer,
    pb::envoy::service::accesslog::v3::access_log_service_server::AccessLogServiceServer,
};
use exporter::{Exporter, Sources};
use routes::RouteReloader;
use tls::{ConnLimits, TlsSource};

/// Services every gRPC listener serves and reflection lists.
const REFLECTION_NAMES: [&str; 3] = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// Names under which grpc.health.v1 reports readiness; "" is the whole
/// server. They follow the database (within the staleness bound) and turn
/// NOT_SERVING on shutdown.
const HEALTH_SERVICES: [&str; 3] = ["", "keywarden.v1.KeyVerify", "keywarden.v1.KeyAdmin"];
/// Liveness: SERVING while the process answers at all, so that a database
/// outage makes replicas unready but never gets them restarted.
const LIVENESS: &str = "liveness";
/// How often the summaries of refused KeyAdmin calls are written.
const REFUSAL_SWEEP: Duration = Duration::from_secs(10);
/// The pepper subkey's purpose for operator token digests.
const OPERATOR_DIGEST_PURPOSE: &str = "keywarden operator token v1";
/// Largest health or reflection request (a service name, a symbol).
const HEALTH_MAX_MESSAGE: usize = 4 << 10;
/// scrypt threads reserved for KeyAdmin (create, regenerate).
const ADMIN_HASH_WORKERS: usize = 1;
/// The Verify method's path (for its size limit).
const VERIFY_METHOD: &str = "/keywarden.v1.KeyVerify/Verify";
/// Largest ext_authz CheckRequest: Envoy's default request-header limit
/// (60 KiB) with room for the attributes around it.
const CHECK_MAX_MESSAGE: usize = 128 << 10;
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
    listener: TcpListener,
    admin_listener: Option<TcpListener>,
    health_listener: Option<TcpListener>,
    tls: Option<Arc<TlsSource>>,
    metrics_listener: Option<TcpListener>,
    store: Store,
    usage: Arc<UsageTracker>,
    /// Credits leased from the fleet's balances (Redis mode).
    credits: Option<Arc<LeasedCredits>>,
    audit: AuditQueue,
    audit_writer: AuditWriter,
    pool: HashPool,
    admin_pool: HashPool,
    throttle: Arc<GuessThrottle>,
    rollups: Arc<Rollups>,
    cache: Option<Arc<VerifyCache>>,
    freshness: Arc<Freshness>,
    clock: Arc<DbClock>,
    /// Background tasks, restarted when they fail; `stop_tasks` ends them.
    supervisor: Supervisor,
    stop_tasks: watch::Sender<bool>,
    tasks_stopped: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
    exporter: Exporter,
    admin: KeyAdminService,
    verify: KeyVerifyService,
    /// Envoy's ext_authz Check, on the same engine as Verify.
    check: CheckService,
    /// Envoy's access-log stream, onto the audit rows Check wrote.
    access_log: AccessLogSink,
    routes: Arc<RouteReloader>,
    access: Arc<Access>,
    callers: Callers,
    rehasher: Arc<Rehasher>,
    /// Turns true when the drain starts; long-lived streams end on it.
    draining: watch::Sender<bool>,
}

impl std::fmt::Debug for Application {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Application")
            .field("listen", &self.listener.local_addr().ok())
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
        Ok(Self {
            metrics_listener,
            admin_listener,
            health_listener,
            tls,
            callers: Callers::new(&settings.verify_callers, settings.outcome_reporters.as_deref()),
            draining,
            access,
            admin: KeyAdminService::new(Arc::new(manager), operators, peppers),
            rehasher,
            verify: KeyVerifyService::new(verifier),
            check: CheckService::new(gateway),
            access_log,
            routes,
            settings,
            listener,
            store,
            usage,
            credits,
            audit,
            audit_writer,
            pool,
            admin_pool,
            throttle,
            rollups,
            cache,
            freshness,
            clock,
            supervisor,
            stop_tasks,
            tasks_stopped,
            metrics,
            exporter,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or(self.settings.listen_addr)
    }

    /// Where KeyAdmin is served, when it has its own listener.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Where the plaintext health listener is, if configured.
    pub fn health_addr(&self) -> Option<SocketAddr> {
        self.health_listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Whether the gRPC listeners serve TLS.
    pub fn serves_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Where `/metrics` is served, if enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn probes(&self) -> Probes {
        Probes {
            store: self.store.clone(),
            pool: self.pool.clone(),
            admin_pool: self.admin_pool.clone(),
            throttle: Arc::clone(&self.throttle),
            rollups: Arc::clone(&self.rollups),
            audit: self.audit.clone(),
            usage: Arc::clone(&self.usage),
            cache: self.cache.clone(),
            freshness: Arc::clone(&self.freshness),
            clock: Arc::clone(&self.clock),
            metrics: Arc::clone(&self.metrics),
            exporter: self.exporter.clone(),
            tasks: self.supervisor.clone(),
        }
    }

    /// Serves until `shutdown` resolves, then drains and flushes.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Self {
            settings,
            listener,
            admin_listener,
            health_listener,
            tls,
            metrics_listener,
            store,
            usage,
            credits,
            audit_writer,
            rollups,
            admin,
            verify,
            access,
            callers,
            cache,
            freshness,
            clock,
            supervisor,
            stop_tasks,
            tasks_stopped,
            metrics,
            exporter,
            rehasher,
            check,
            access_log,
            routes,
            draining: draining_tx,
            ..
        } = self;
        // Every background task runs under the supervisor: restarted when
        // it fails, and the replica not ready while it is down.
        let stop = {
            let tasks_stopped = tasks_stopped.clone();
            move || stopped(tasks_stopped.clone())
        };
        let usage_task = {
            let (usage, interval, timeout, stop) =
                (Arc::clone(&usage), settings.usage_flush_interval(), settings.flush_timeout(), stop.clone());
            let spill_after = settings.audit().spill_after;
            supervisor.spawn(
                "usage flusher",
                move || Arc::clone(&usage).run(interval, spill_after, stop(), timeout),
                || {},
            )
        };
        let audit_task = {
            let (writer, timeout, stop) = (Arc::new(audit_writer), settings.flush_timeout(), stop.clone());
            supervisor.spawn("audit writer", move || Arc::clone(&writer).run(stop(), timeout), || {})
        };
        let rollup_task = {
            let (rollups, store, clock, interval, timeout, stop) = (
                Arc::clone(&rollups),
                store.clone(),
                Arc::clone(&clock),
                settings.audit_rollup_interval(),
                settings.flush_timeout(),
                stop.clone(),
            );
            supervisor.spawn(
                "audit rollup writer",
                move || {
                    Arc::clone(&rollups).run(store.clone(), Arc::clone(&clock), interval, stop(), timeout)
                },
                || {},
            )
        };
        let mut helpers: Vec<JoinHandle<Option<()>>> = Vec::new();
        {
            let (routes, every, stop) =
                (Arc::clone(&routes), settings.routes_reload_interval(), stop.clone());
            helpers.push(supervisor.spawn(
                "route table reloader",
                move || Arc::clone(&routes).watch(every, stop()),
                || {},
            ));
        }
        {
            let (rehasher, stop) = (Arc::clone(&rehasher), stop.clone());
            helpers.push(supervisor.spawn("pepper rehash", move || Arc::clone(&rehasher).run(stop()), || {}));
        }
        if let Some(pool) = store.listen_pool().cloned() {
            let (cache, freshness, metrics, store, heartbeat, stop) = (
                cache.clone(),
                Arc::clone(&freshness),
                Arc::clone(&metrics),
                store.clone(),
                settings.feed_heartbeat_interval(),
                stop.clone(),
            );
            let lost = Arc::clone(&freshness);
            helpers.push(supervisor.spawn(
                "change feed",
                move || {
                    ChangeFeed::new(
                        pool.clone(),
                        cache.clone(),
                        Arc::clone(&freshness),
                        Arc::clone(&metrics),
                        store.clone(),
                        heartbeat,
                    )
                    .run(stop())
                },
                // Notices may be missed until it listens again.
                move || lost.listener_lost(),
            ));
        }
        if let Some(listener) = metrics_listener {
            let addr = listener.local_addr().context("the metrics listener's address")?;
            let first = Arc::new(std::sync::Mutex::new(Some(listener)));
            let stop = stop.clone();
            helpers.push(supervisor.spawn(
                "metrics endpoint",
                move || {
                    let (first, exporter, stop) = (Arc::clone(&first), exporter.clone(), stop());
                    async move {
                        // A restart binds the same address again.
                        let taken = first.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
                        let listener = match taken {
                            Some(listener) => listener,
                            None => match tokio::net::TcpListener::bind(addr).await {
                                Ok(listener) => listener,
                                Err(e) => {
                                    return tracing::error!(error = %e, %addr, "metrics endpoint cannot bind");
                                }
                            },
                        };
                        if let Err(e) = exporter::serve(listener, exporter, stop).await {
                            tracing::error!(error = %e, "metrics endpoint failed");
                        }
                    }
                },
                || {},
            ));
        }
        if let Some(tls) = &tls {
            let (tls, stop) = (Arc::clone(tls), stop.clone());
            helpers.push(supervisor.spawn(
                "certificate reloader",
                move || Arc::clone(&tls).watch(stop()),
                || {},
            ));
        }
        {
            let (access, stop) = (Arc::clone(&access), stop.clone());
            helpers.push(supervisor.spawn(
                "refusal summaries",
                move || {
                    let (access, stop) = (Arc::clone(&access), stop());
                    async move {
                        tokio::pin!(stop);
                        let mut ticker = tokio::time::interval(REFUSAL_SWEEP);
                        loop {
                            tokio::select! {
                                () = &mut stop => return,
                                _ = ticker.tick() => access.sweep().await,
                            }
                        }
                    }
                },
                || {},
            ));
        }
        if let Some(credits) = &credits {
            // Credits held unused go back to the fleet, and all at shutdown.
            let (credits, stop) = (Arc::clone(credits), stop.clone());
            helpers.push(supervisor.spawn(
                "credit lease returns",
                move || Arc::clone(&credits).run(stop()),
                || {},
            ));
        }
        {
            let (store, usage, clock, stop) =
                (store.clone(), Arc::clone(&usage), Arc::clone(&clock), stop.clone());
            let offset = chrono::Duration::milliseconds(settings.refill_clock_offset_ms);
            helpers.push(supervisor.spawn(
                "credits refill",
                move || {
                    crate::credits::refill::run(
                        store.clone(),
                        Arc::clone(&usage),
                        Arc::clone(&clock),
                        offset,
                        stop(),
                    )
                },
                || {},
            ));
        }
        {
            let (store, clock, retention, every, stop) = (
                store.clone(),
                Arc::clone(&clock),
                settings.audit_retention(),
                settings.audit_retention_interval(),
                stop.clone(),
            );
            helpers.push(supervisor.spawn(
                "audit retention",
                move || {
                    crate::audit::retention::run(store.clone(), Arc::clone(&clock), retention, every, stop())
                },
                || {},
            ));
        }

        let (health, health_service) = tonic_health::server::health_reporter();
        // tonic reserves a message's declared length before reading it: every
        // service gets a limit, not tonic's 4 MiB default.
        let health_service = health_service.max_decoding_message_size(HEALTH_MAX_MESSAGE);
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

        // Reflection on each listener lists the services that listener
        // serves, and no other. grpcurl 1.8 only speaks v1alpha reflection;
        // newer tools use v1.
        let separate_admin = admin_listener.is_some();
        let verify_names = [
            KeyVerifyServer::<KeyVerifyService>::NAME,
            AuthorizationServer::<CheckService>::NAME,
            AccessLogServiceServer::<AccessLogSink>::NAME,
        ];
        let admin_names = [KeyAdminServer::<KeyAdminService>::NAME];
        let main_names: Vec<&str> =
            verify_names.iter().chain(admin_names.iter().filter(|_| !separate_admin)).copied().collect();
        let reflection = |names: &[&str]| {
            let builder = tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(api::pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(api::pb::ENVOY_FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET);
            REFLECTION_NAMES.iter().chain(names).fold(builder, |b, name| b.with_service_name(*name))
        };
        let reflection_v1 = |names: &[&str]| -> anyhow::Result<_> {
            Ok(reflection(names)
                .build_v1()
                .context("building reflection v1")?
                .max_decoding_message_size(HEALTH_MAX_MESSAGE))
        };
        let reflection_v1alpha = |names: &[&str]| -> anyhow::Result<_> {
            Ok(reflection(names)
                .build_v1alpha()
                .context("building reflection v1alpha")?
                .max_decoding_message_size(HEALTH_MAX_MESSAGE))
        };

        // Verify's limit is tighter than its service's (RecordOutcomes').
        let limits = MessageLimits::default().with(VERIFY_METHOD, settings.max_verify_message_bytes);
        // Layers on every gRPC listener, outermost first.
        let stack = ServiceBuilder::new()
            // Read the caller's W3C trace context before anything runs, so
            // every span and audit row of the call joins its trace.
            .layer(api::trace::TraceContextLayer)
            // Bound what a Verify may send, below its service's limit.
            .layer(MessageLimitLayer::new(limits))
            // Count error answers by code, for the overload and outage alerts.
            .layer(tower::util::MapResponseLayer::new(api::codes::counter(Arc::clone(&metrics))))
            // Under mTLS, only listed identities verify (Verify, Check) and
            // report outcomes (RecordOutcomes, the access-log stream).
            .layer(callers)
            // Bound each call's time, and keep its connection counted busy.
            .layer(CallLifetimeLayer::new(settings.request_timeout()))
            .into_inner();
        // tonic's own per-message limit rejects on the declared length,
        // before buffering.
        let verify_service = KeyVerifyServer::new(verify)
            .max_decoding_message_size(settings.max_record_outcomes_message_bytes);
        // Envoy's Check: a bound on the request headers Envoy forwards.
        let check_service = AuthorizationServer::new(check).max_decoding_message_size(CHECK_MAX_MESSAGE);
        let access_log_service =
            AccessLogServiceServer::new(access_log).max_decoding_message_size(settings.max_message_bytes);
        // KeyAdmin: every call authenticated before its handler runs.
        let admin_service = ServiceBuilder::new()
            .layer(AdminAuthLayer::new(Arc::clone(&access)))
            .service(KeyAdminServer::new(admin).max_decoding_message_size(settings.max_message_bytes));
        // Every gRPC listener's HTTP/2 limits.
        let server = || {
            Server::builder()
                .max_concurrent_streams(settings.max_concurrent_streams)
                .http2_keepalive_interval(settings.http2_keepalive_interval())
                .http2_keepalive_timeout(Some(settings.http2_keepalive_timeout()))
        };

        let draining = draining_tx.subscribe();
        // A task the supervisor gave up on stops the process like a signal,
        // and the run then ends in an error (a non-zero exit).
        let gave_up: Arc<std::sync::OnceLock<&'static str>> = Arc::default();
        let signal = {
            let (health, tasks, gave_up) = (health.clone(), supervisor.clone(), Arc::clone(&gave_up));
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
        let connection_limits = ConnLimits {
            max_connections: settings.max_connections,
            per_address: settings.max_connections_per_ip,
            handshake_timeout: settings.handshake_timeout(),
            idle_timeout: settings.idle_connection_timeout(),
        };
        // A listener's connections, until `stop` (the drain) closes it.
        let incoming = |listener, tls, stop: &watch::Receiver<bool>| {
            tls::incoming(listener, tls, connection_limits, Arc::clone(&metrics), stopped(stop.clone()))
        };
        type Serving = Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>>;
        let main_server: Serving = Box::pin(
            server()
                .layer(stack.clone())
                .add_service(health_service.clone())
                .add_service(reflection_v1(&main_names)?)
                .add_service(reflection_v1alpha(&main_names)?)
                .add_service(verify_service)
                .add_service(check_service)
                .add_service(access_log_service)
                .add_optional_service((!separate_admin).then(|| admin_service.clone()))
                .serve_with_incoming_shutdown(
                    incoming(listener, tls.clone(), &draining),
                    stopped(draining.clone()),
                ),
        );
        let admin_server: Serving = match admin_listener {
            Some(listener) => Box::pin(
                server()
                    .layer(stack.clone())
                    .add_service(health_service.clone())
                    .add_service(reflection_v1(&admin_names)?)
                    .add_service(reflection_v1alpha(&admin_names)?)
                    .add_service(admin_service)
                    .serve_with_incoming_shutdown(
                        incoming(listener, tls.clone(), &draining),
                        stopped(draining.clone()),
                    ),
            ),
            None => Box::pin(async { Ok(()) }),
        };
        // Plaintext by design: kubelet's gRPC probes cannot speak TLS, and
        // health carries no secret. It keeps answering through the drain
        // (readiness NOT_SERVING, liveness SERVING) and closes after it.
        let (health_closing, health_close) = watch::channel(false);
        let health_server = health_listener.map(|listener| {
            tokio::spawn(server().add_service(health_service).serve_with_incoming_shutdown(
                incoming(listener, None, &health_close),
                stopped(health_close.clone()),
            ))
        });
        let servers = async { tokio::try_join!(main_server, admin_server).map(|_| ()) };
        let grace = settings.shutdown_grace();
        let grace_over = {
            let draining = stopped(draining.clone());
            async move {
                draining.await;
                tokio::time::sleep(grace).await;
            }
        };
        tokio::select! {
            served = servers => served.context("serving gRPC")?,
            () = grace_over => tracing::warn!(grace_ms = grace.as_millis() as u64, "drain period over; abandoning calls still in flight"),
        }
        let _ = health_closing.send(true);
        if let Some(health_server) = health_server {
            let abort = health_server.abort_handle();
            if tokio::time::timeout(Duration::from_secs(1), health_server).await.is_err() {
                abort.abort();
            }
        }
        // Summaries of refusals still being counted go out with the rest.
        access.flush().await;

        tracing::info!("flushing usage counts and audit rows");
        let _ = stop_tasks.send(true);
        // The helpers (change feed, health monitor, retention, metrics) hold
        // no data: they get the flush timeout to finish what they are doing
        // and are then abandoned, so that a statement stuck on a lock cannot
        // hold the process. The writers bound their own final flush.
        let helpers_done = tokio::time::Instant::now() + settings.flush_timeout();
        for helper in helpers {
            let abort = helper.abort_handle();
            if tokio::time::timeout_at(helpers_done, helper).await.is_err() {
                abort.abort();
            }
        }
        let unwritten_usage = join("usage flusher", usage_task).await;
        let unwritten_audit =
            join("audit writer", audit_task).await + join("audit rollup writer", rollup_task).await;
        // Closing waits for connections in use; one may be stuck on a lock.
        if tokio::time::timeout(settings.flush_timeout(), store.close()).await.is_err() {
            tracing::warn!("database connections did not close in time; leaving them to the exit");
        }
        if let Some(task) = gave_up.get() {
            anyhow::bail!("stopped because the background task \"{task}\" kept failing");
        }
        if unwritten_usage + unwritten_audit > 0 {
            anyhow::bail!(
                "stopped with {unwritten_audit} audit rows and usage of {unwritten_usage} keys unwritten \
                 and not on local disk (the database stayed unreachable for flush_timeout_ms)"
            );
        }
        tracing::info!("stopped");
        Ok(())
    }
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// Waits for a flusher; returns what it could not write.
async fn join(what: &str, task: JoinHandle<Option<usize>>) -> usize {
    match task.await {
        Ok(Some(unwritten)) => unwritten,
        // Given up on or cut short: what it held is not known to be written.
        Ok(None) => {
            tracing::error!(task = what, "background task did not finish its final flush");
            1
        }
        Err(e) => {
            tracing::error!(task = what, error = %e, "background task failed");
            1
        }
    }
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
