//! Building: every part made from the settings and wired together, the
//! sockets bound and the background tasks collected, in the order their
//! dependencies need (the spool's lock before anything reads it, usage
//! spilled by an earlier process applied before any balance is read, the
//! database's clock read before serving).

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::{net::TcpListener, sync::watch};

use super::{
    Application, Probes,
    exporter::{self, Exporter, Sources},
    health::read_database_clock,
    routes::RouteReloader,
    secrets::{Secrets, secure_data_dir},
    serve::{Listeners, Services},
    supervise::{RestartPolicy, Supervisor},
    tasks::Tasks,
    tls::TlsSource,
};
use crate::{
    api::{
        access_log::{AccessLogCounters, AccessLogSink},
        callers::Callers,
        ext_authz::CheckService,
        key_admin::KeyAdminService,
        key_verify::KeyVerifyService,
        leak_reports::LeakReportApi,
    },
    audit::{rollup::Rollups, spool::Spool, writer},
    cache::{
        VerifyCache,
        changes::{ChangeFeed, Freshness},
    },
    clock::DbClock,
    config::{RateLimitMode, Settings},
    credits::{Credits, LeasedCredits},
    events::{
        Outbox,
        expiry::ExpiryScan,
        relay::{EventStats, Relay},
    },
    fleet::{Redis, WarmStart},
    keys::{EventIds, events::KeyEventSink, operator::TokenDigester},
    limiter::{LeasedLimiter, Limiter, LocalLimiter},
    metrics::Metrics,
    service::{
        Deps,
        access::Access,
        admin::{KeyManager, Webhooks},
        events::KeyEvents,
        gateway::Gateway,
        hash_pool::HashPool,
        leaks::{LeakParts, Leaks, github::GithubKeys},
        operators::OperatorTokens,
        peppers::Peppers,
        rehash::Rehasher,
        verify::{Verifier, VerifyParts},
    },
    store::{Store, StoreOptions, lane::DbLane},
    throttle::GuessThrottle,
    usage::UsageTracker,
};

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
                tracing::error!(%pepper, live, "live keys, operator tokens or webhook secrets depend on a pepper that is not configured; they cannot verify (or sign) until it is");
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot count keys by pepper generation"),
    }
}

/// On the embedded default, makes the data directory and its private files
/// readable by this user only, warning of each it had to tighten. `serve`
/// and `migrate` both start here.
pub fn secure_embedded_data_dir(settings: &Settings) -> anyhow::Result<()> {
    if settings.database_url.is_some() {
        return Ok(());
    }
    let tightened = secure_data_dir(&settings.data_dir)
        .with_context(|| format!("securing data directory {}", settings.data_dir.display()))?;
    for path in tightened {
        tracing::warn!(path = %path.display(), "was readable by other users; tightened to owner-only");
    }
    Ok(())
}

impl Application {
    /// Builds and binds everything; nothing serves until `run_until_stopped`.
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
        let event_settings = settings.events()?;
        let outbox = Outbox::new(&event_settings.source);
        let event_stats = Arc::new(EventStats::default());
        // Webhook signing secrets are sealed under a pepper subkey.
        let webhook_macs = secrets.hasher.subkey_macs(crate::events::webhook::SEAL_PURPOSE);
        let relay = Relay::new(
            store.counted_apart(),
            Arc::clone(&clock),
            event_settings.clone(),
            webhook_macs.clone(),
            Arc::clone(&event_stats),
        );
        let expiry = Arc::new(ExpiryScan::new(
            store.counted_apart(),
            Arc::clone(&clock),
            outbox.clone(),
            event_settings.reminder_leads.clone(),
            event_settings.scan_interval,
        ));
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
                events: Arc::clone(&event_stats),
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
        let leaks = Arc::new(Leaks::new(LeakParts {
            store: store.clone(),
            hasher: deps.hasher.clone(),
            pool: pool.clone(),
            prefix: deps.prefix.clone(),
            cache: cache.clone(),
            access: Arc::clone(&access),
            clock: Arc::clone(&clock),
            outbox: outbox.clone(),
            events: KeyEvents::new(sinks.clone()),
            metrics: Arc::clone(&metrics),
        }));
        let leak_reports = match settings.leak_reports()? {
            Some(s) => Some(LeakReportApi {
                leaks: Arc::clone(&leaks),
                keys: Arc::new(
                    GithubKeys::new(s.keys_file, s.keys_url.as_deref(), crate::events::webhook::client_tls())
                        .map_err(|e| anyhow::anyhow!("leak_report_keys_url: {e}"))?,
                ),
                metrics: Arc::clone(&metrics),
            }),
            None => None,
        };
        let manager = KeyManager::new(
            Deps { pool: admin_pool.clone(), ..deps.clone() },
            KeyEvents::new(sinks),
            Arc::clone(&access),
            outbox,
            Webhooks::new(event_settings.webhook_allow_http, webhook_macs),
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
        let (listeners, metrics_listener) = bind(&settings, tls).await?;
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
        if let Some(tls) = &listeners.tls {
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
        tasks.add(relay.task());
        tasks.add(expiry.task());
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
            listeners,
            services: Services {
                admin: KeyAdminService::new(Arc::new(manager), operators, peppers, Arc::clone(&leaks)),
                verify: KeyVerifyService::new(verifier),
                check: CheckService::new(gateway),
                access_log,
                access,
                callers: Callers::new(&settings.verify_callers, settings.outcome_reporters.as_deref()),
                leak_reports,
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
}

/// Binds the gRPC listeners (with their TLS source) and the metrics
/// endpoint's, before anything serves, so that a port in use fails the start.
async fn bind(
    settings: &Settings,
    tls: Option<Arc<TlsSource>>,
) -> anyhow::Result<(Listeners, Option<TcpListener>)> {
    let bind = |addr, what: &'static str| async move {
        TcpListener::bind(addr).await.with_context(|| format!("binding {what} {addr}"))
    };
    let main = bind(settings.listen_addr, "the listener").await?;
    let admin = match settings.admin_listen_addr {
        Some(addr) => Some(bind(addr, "the admin listener").await?),
        None => None,
    };
    let health = match settings.health_listen_addr {
        Some(addr) => Some(bind(addr, "the health listener").await?),
        None => None,
    };
    if tls.is_none() {
        for addr in [Some(settings.listen_addr), settings.admin_listen_addr].into_iter().flatten() {
            if !addr.ip().is_loopback() {
                tracing::warn!(%addr, "serving plaintext gRPC beyond loopback (allow_plaintext): keys and tokens cross the network in clear");
            }
        }
    }
    let metrics = match settings.metrics_enabled {
        true => Some(bind(settings.metrics_addr, "the metrics endpoint").await?),
        false => None,
    };
    let leaks = match settings.leak_reports()? {
        Some(leaks) => Some(bind(leaks.listen_addr, "the leak-report listener").await?),
        None => None,
    };
    Ok((Listeners { main, admin, health, leaks, tls }, metrics))
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
