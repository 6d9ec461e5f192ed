//! The scrape side of the metrics: `GET /metrics` renders [`Metrics`] and a
//! `Snapshot` of the counters other components keep, read at scrape time so
//! that the hot path pays nothing extra for them.

mod events;

use std::sync::Arc;

use crate::task::Task;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
    registry::{Registry, Unit},
};

use crate::{
    audit::writer::AuditQueue,
    cache::{VerifyCache, changes::Freshness},
    credits::LeasedCredits,
    limiter::Limiter,
    metrics::Metrics,
    service::{hash_pool::HashPool, rehash::Rehasher},
    throttle::GuessThrottle,
    usage::UsageTracker,
};

/// Components whose own counters are exported at scrape time.
#[derive(Debug, Clone)]
pub struct Sources {
    pub pool: HashPool,
    pub admin_pool: HashPool,
    pub throttle: Arc<GuessThrottle>,
    pub limiter: Arc<Limiter>,
    /// The fleet's credit leases (Redis mode).
    pub credits: Option<Arc<LeasedCredits>>,
    pub audit: AuditQueue,
    pub usage: Arc<UsageTracker>,
    pub cache: Option<Arc<VerifyCache>>,
    pub freshness: Arc<Freshness>,
    pub tasks: super::supervise::Supervisor,
    pub rehasher: Arc<Rehasher>,
    pub routes: Arc<super::routes::RouteReloader>,
    pub access_log: Arc<crate::api::access_log::AccessLogCounters>,
    /// The lifecycle-event relay: backlog per sink, deliveries.
    pub events: Arc<crate::events::relay::EventStats>,
}

/// The scrape-time view of [`Sources`].
#[derive(Debug)]
struct Snapshot(Sources);

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let metric = ConstCounter::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    value: f64,
) -> Result<(), std::fmt::Error> {
    let metric = ConstGauge::new(value);
    metric.encode(encoder.encode_descriptor(name, help, unit, metric.metric_type())?)
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use std::sync::atomic::Ordering::Relaxed;
        let s = &self.0;
        gauge(
            &mut encoder,
            "scrypt_queue_depth",
            "scrypt jobs waiting for a thread",
            None,
            s.pool.queued() as f64,
        )?;
        counter(&mut encoder, "scrypt_runs", "scrypt hashes computed for Verify", s.pool.runs())?;
        counter(
            &mut encoder,
            "scrypt_admin_runs",
            "scrypt hashes computed for KeyAdmin (create, regenerate)",
            s.admin_pool.runs(),
        )?;
        let (prefixes, ips) = s.throttle.over_limit();
        gauge(
            &mut encoder,
            "throttled_prefixes",
            "key prefixes over their limit of wrong secrets now",
            None,
            prefixes as f64,
        )?;
        gauge(
            &mut encoder,
            "throttled_ips",
            "client IPs over their limit of wrong secrets now",
            None,
            ips as f64,
        )?;
        let (by_prefix, by_ip) = s.throttle.refused();
        counter(
            &mut encoder,
            "throttled_checks_prefix",
            "uncached checks refused because their prefix was over its limit",
            by_prefix,
        )?;
        counter(
            &mut encoder,
            "throttled_checks_ip",
            "uncached checks refused because their client IP was over its limit",
            by_ip,
        )?;
        counter(
            &mut encoder,
            "rate_limit_allowed",
            "calls of keys with rate limits that every limit admitted",
            s.limiter.allowed(),
        )?;
        counter(
            &mut encoder,
            "rate_limit_limited",
            "calls of keys with rate limits refused as RATE_LIMITED",
            s.limiter.limited(),
        )?;
        gauge(
            &mut encoder,
            "rate_limit_keys",
            "keys whose rate limits are below full on this replica (state held)",
            None,
            s.limiter.tracked() as f64,
        )?;
        gauge(
            &mut encoder,
            "rate_limit_degraded",
            "1 while Redis-mode rate limits cannot lease from Redis and follow rate_limit_on_redis_failure",
            None,
            if s.limiter.degraded() { 1.0 } else { 0.0 },
        )?;
        gauge(
            &mut encoder,
            "credits_degraded",
            "1 while Redis-mode credits cannot lease from Redis and each replica decides on its own view",
            None,
            if s.credits.as_ref().is_some_and(|c| c.degraded()) { 1.0 } else { 0.0 },
        )?;
        gauge(
            &mut encoder,
            "audit_queue_depth",
            "audit rows waiting to be written",
            None,
            s.audit.depth() as f64,
        )?;
        gauge(
            &mut encoder,
            "audit_spool",
            "bytes of audit rows on the local spool, waiting for the database",
            Some(&Unit::Bytes),
            s.audit.spooled_bytes() as f64,
        )?;
        gauge(
            &mut encoder,
            "audit_spool_rows",
            "audit rows on the local spool, waiting for the database",
            None,
            s.audit.spooled_rows() as f64,
        )?;
        gauge(
            &mut encoder,
            "audit_spool_oldest_row_age",
            "how long the oldest spooled audit row has waited",
            Some(&Unit::Seconds),
            s.audit.spool_oldest_age(),
        )?;
        counter(
            &mut encoder,
            "audit_spool_replayed_rows",
            "audit rows replayed from the spool into the database",
            s.audit.replayed_rows(),
        )?;
        counter(
            &mut encoder,
            "audit_spool_unreadable_lines",
            "spool lines that could not be read back (a torn line after a machine crash), skipped",
            s.audit.spool_unreadable(),
        )?;
        gauge(
            &mut encoder,
            "audit_queue_capacity",
            "audit rows the queue holds at most (audit_queue_capacity)",
            None,
            s.audit.capacity() as f64,
        )?;
        counter(&mut encoder, "audit_rows_written", "audit rows written to the database", s.audit.written())?;
        counter(
            &mut encoder,
            "audit_rows_dropped",
            "audit rows dropped because the queue was full",
            s.audit.dropped(),
        )?;
        counter(
            &mut encoder,
            "audit_queue_refusals",
            "Verify calls answered UNAVAILABLE because the audit queue stayed full",
            s.audit.refused(),
        )?;
        counter(
            &mut encoder,
            "audit_write_failures",
            "failed audit batch inserts (retried)",
            s.audit.failed_writes(),
        )?;
        gauge(
            &mut encoder,
            "tasks_down",
            "background tasks failed and not running (the replica is not ready meanwhile)",
            None,
            s.tasks.down() as f64,
        )?;
        gauge(
            &mut encoder,
            "gateway_routes",
            "routes in the gateway's table in use",
            None,
            s.routes.routes() as f64,
        )?;
        counter(
            &mut encoder,
            "gateway_route_reloads",
            "changed route files put in service",
            s.routes.reloads(),
        )?;
        counter(
            &mut encoder,
            "gateway_route_reload_failures",
            "changed route files refused (the previous table stays in use)",
            s.routes.failures(),
        )?;
        counter(
            &mut encoder,
            "access_log_outcomes_recorded",
            "statuses from Envoy's access-log stream handed to the audit trail",
            s.access_log.recorded.load(Relaxed),
        )?;
        counter(
            &mut encoder,
            "access_log_entries_skipped",
            "access-log entries without an x-keywarden-audit-id or a usable status",
            s.access_log.skipped.load(Relaxed),
        )?;
        counter(
            &mut encoder,
            "access_log_outcomes_failed",
            "access-log statuses lost because their batch could not be written",
            s.access_log.failed.load(Relaxed),
        )?;
        counter(
            &mut encoder,
            "keys_rehashed",
            "keys moved to the current pepper after a successful check under an older one",
            s.rehasher.rewritten(),
        )?;
        counter(
            &mut encoder,
            "rehash_dropped",
            "keys not queued for rehashing because the queue was full (offered again after their next first check)",
            s.rehasher.dropped(),
        )?;
        counter(
            &mut encoder,
            "rehash_write_failures",
            "failed writes of rehashed keys (retried)",
            s.rehasher.failed_writes(),
        )?;
        counter(
            &mut encoder,
            "audit_dead_letters",
            "audit rows the database refused for what they hold, kept apart with the reason",
            s.audit.dead_letters(),
        )?;
        gauge(
            &mut encoder,
            "usage_pending_keys",
            "keys with usage not yet written",
            None,
            s.usage.pending_keys() as f64,
        )?;
        gauge(
            &mut encoder,
            "usage_unsaved_keys",
            "keys with usage held only in memory: neither written nor spilled to local disk",
            None,
            s.usage.unsaved_keys() as f64,
        )?;
        gauge(
            &mut encoder,
            "usage_flush_lag",
            "time since usage counters were last written successfully",
            Some(&Unit::Seconds),
            s.usage.since_last_flush().as_secs_f64(),
        )?;
        counter(&mut encoder, "db_errors", "database errors", crate::store::db_errors())?;
        gauge(
            &mut encoder,
            "cache_trusted",
            "1 while cached key state is known current (change notices flowing)",
            None,
            if s.freshness.trusted() { 1.0 } else { 0.0 },
        )?;
        if let Some(cache) = &s.cache {
            let c = &cache.counters;
            for (name, help, value) in [
                (
                    "cache_identity_hits",
                    "verifications whose key identity was cached",
                    c.identity_hits.load(Relaxed),
                ),
                (
                    "cache_identity_misses",
                    "verifications that had to identify the key",
                    c.identity_misses.load(Relaxed),
                ),
                ("cache_state_hits", "verifications whose key state was cached", c.state_hits.load(Relaxed)),
                (
                    "cache_state_misses",
                    "verifications that read key state from the database",
                    c.state_misses.load(Relaxed),
                ),
                (
                    "cache_negative_hits",
                    "verifications answered from the not-found cache",
                    c.negative_hits.load(Relaxed),
                ),
            ] {
                counter(&mut encoder, name, help, value)?;
            }
            let (identities, states, negative) = cache.sizes();
            gauge(&mut encoder, "cache_identities", "key identities cached", None, identities as f64)?;
            gauge(&mut encoder, "cache_states", "key states cached", None, states as f64)?;
            gauge(
                &mut encoder,
                "cache_negative_entries",
                "not-found keys remembered",
                None,
                negative as f64,
            )?;
        }
        events::encode(&mut encoder, &s.events)
    }
}

/// Everything registered under the `keywarden_` prefix.
#[derive(Debug, Clone)]
pub struct Exporter {
    registry: Arc<Registry>,
}

impl Exporter {
    pub fn new(metrics: &Arc<Metrics>, sources: Sources) -> Self {
        let mut registry = Registry::with_prefix("keywarden");
        registry.register(
            "verify_decisions",
            "Verify decisions by decision and deny reason",
            metrics.verify_decisions.clone(),
        );
        registry.register_with_unit(
            "verify_duration",
            "time to decide a Verify, in the server",
            Unit::Seconds,
            metrics.verify_duration.clone(),
        );
        registry.register_with_unit(
            "revocation_propagation",
            "key change committed on one replica to notice received on this one",
            Unit::Seconds,
            metrics.propagation_lag.clone(),
        );
        registry.register(
            "grpc_errors",
            "gRPC answers other than OK, by status code (all services and listeners)",
            metrics.grpc_errors.clone(),
        );
        registry.register(
            "task_restarts",
            "background tasks restarted after a failure (panic, abort, early return), by task",
            metrics.task_restarts.clone(),
        );
        registry.register(
            "change_listener_heartbeat_misses",
            "times the change listener heard nothing, not even its own heartbeat, for two intervals (it reconnects)",
            metrics.listener_heartbeat_misses.clone(),
        );
        registry.register(
            "change_listener_reconnects",
            "times the change listener reconnected (cached state dropped each time)",
            metrics.listener_reconnects.clone(),
        );
        registry.register(
            "tls_reloads",
            "certificate, key or client CA files re-read and served to new connections",
            metrics.tls_reloads.clone(),
        );
        registry.register(
            "tls_reload_failures",
            "changed TLS files that did not load (the previous certificate stays in use)",
            metrics.tls_reload_failures.clone(),
        );
        registry.register(
            "tls_handshake_failures",
            "TLS handshakes that failed or timed out",
            metrics.tls_handshake_failures.clone(),
        );
        registry.register(
            "connections_refused_per_address",
            "connections closed at accept because their client address held max_connections_per_ip",
            metrics.connections_refused_per_address.clone(),
        );
        registry.register(
            "admin_unauthenticated",
            "KeyAdmin calls refused for missing, invalid, revoked or expired credentials",
            metrics.admin_unauthenticated.clone(),
        );
        registry.register(
            "admin_permission_denied",
            "KeyAdmin calls refused as outside the caller's role or merchants",
            metrics.admin_permission_denied.clone(),
        );
        registry.register(
            "redis_errors",
            "Redis commands that failed or timed out (each use falls back as configured)",
            metrics.redis_errors.clone(),
        );
        registry.register_with_unit(
            "redis_command_duration",
            "time of each Redis command, failures included",
            Unit::Seconds,
            metrics.redis_duration.clone(),
        );
        registry.register(
            "audit_outcomes_ignored",
            "reported HTTP statuses not written: the row had one already, or the id repeated in one call",
            metrics.outcomes_ignored.clone(),
        );
        registry.register(
            "leak_reports",
            "leak reports processed, by channel (github, rpc)",
            metrics.leak_reports.clone(),
        );
        registry.register("leak_tokens", "reported tokens, by label", metrics.leak_tokens.clone());
        registry.register(
            "leak_report_signature_failures",
            "GitHub leak reports refused: signature missing, unknown or wrong",
            metrics.leak_signature_failures.clone(),
        );
        registry.register(
            "warm_start_hits",
            "uncached keys recognised from the fleet's warm-start map, without scrypt",
            metrics.warm_start_hits.clone(),
        );
        registry.register(
            "warm_start_misses",
            "uncached keys not in the warm-start map (or Redis unreachable): checked by scrypt",
            metrics.warm_start_misses.clone(),
        );
        registry.register(
            "warm_start_published",
            "keys verified by scrypt and published to the warm-start map",
            metrics.warm_start_published.clone(),
        );
        registry.register(
            "rate_limit_lease_refills",
            "leases of fleet-wide rate-limit tokens granted by Redis (rate_limit_mode = redis)",
            metrics.rate_limit_lease_refills.clone(),
        );
        registry.register(
            "rate_limit_leased_tokens",
            "tokens carried by those leases",
            metrics.rate_limit_leased_tokens.clone(),
        );
        registry.register(
            "rate_limit_fallback_decisions",
            "rate-limit decisions taken without Redis, as rate_limit_on_redis_failure says",
            metrics.rate_limit_fallback_decisions.clone(),
        );
        registry.register(
            "credit_lease_refills",
            "leases of shared credit balances granted by Redis (rate_limit_mode = redis)",
            metrics.credit_lease_refills.clone(),
        );
        registry.register(
            "credits_leased",
            "credits carried by those leases",
            metrics.credits_leased.clone(),
        );
        registry.register(
            "credits_returned",
            "leased credits given back to the fleet unused (idle or at shutdown)",
            metrics.credits_returned.clone(),
        );
        registry.register(
            "credit_fallback_decisions",
            "credit decisions taken on the replica's own view of the balance because Redis could not lease",
            metrics.credit_fallback_decisions.clone(),
        );
        registry.register_collector(Box::new(Snapshot(sources)));
        Self { registry: Arc::new(registry) }
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Serves `GET /metrics` on `listener` until `stop` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    exporter: Exporter,
    stop: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::{Router, http::header, routing::get};
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let exporter = exporter.clone();
            async move {
                (
                    [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
                    exporter.render(),
                )
            }
        }),
    );
    axum::serve(listener, app).with_graceful_shutdown(stop).await
}

/// The endpoint as a background task: the first run serves on `listener`,
/// a restart binds its address again.
pub fn task(listener: tokio::net::TcpListener, exporter: Exporter) -> std::io::Result<Task> {
    let addr = listener.local_addr()?;
    let first = Arc::new(std::sync::Mutex::new(Some(listener)));
    Ok(Task::helper("metrics endpoint", move |stop| {
        let (first, exporter) = (Arc::clone(&first), exporter.clone());
        async move {
            let taken = first.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
            let listener = match taken {
                Some(listener) => listener,
                None => match tokio::net::TcpListener::bind(addr).await {
                    Ok(listener) => listener,
                    Err(e) => return tracing::error!(error = %e, %addr, "metrics endpoint cannot bind"),
                },
            };
            if let Err(e) = serve(listener, exporter, stop).await {
                tracing::error!(error = %e, "metrics endpoint failed");
            }
        }
    }))
}
