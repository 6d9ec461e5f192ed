//! Prometheus metrics. Counters and histograms that code updates directly
//! live in [`Metrics`]; figures that other components already keep (queue
//! depths, cache hit counts, scrypt runs) are read at scrape time by
//! `Snapshot`, so the hot path pays nothing extra for them.

use std::sync::Arc;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::ConstGauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Registry, Unit},
};

use crate::{
    audit::writer::AuditQueue,
    cache::VerifyCache,
    cache::changes::Freshness,
    keys::{Decision, DenyReason},
    service::hash_pool::HashPool,
    usage::UsageTracker,
};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub decision: &'static str,
    pub reason: &'static str,
}

/// Metrics updated by the code paths themselves.
#[derive(Debug)]
pub struct Metrics {
    pub verify_decisions: Family<DecisionLabels, Counter>,
    /// Every series of `verify_decisions`, looked up once: ALLOW, then each
    /// [`DenyReason`] in declaration order. Verify counts through these, so
    /// the hot path takes no lock and hashes no labels; every series is
    /// exported from the start, at zero until it happens.
    decisions: [Counter; 1 + DenyReason::ALL.len()],
    pub verify_duration: Histogram,
    pub propagation_lag: Histogram,
    pub listener_reconnects: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let verify_decisions = Family::<DecisionLabels, Counter>::default();
        let series = |decision: Decision, reason: &'static str| {
            verify_decisions.get_or_create(&DecisionLabels { decision: decision.as_str(), reason }).clone()
        };
        let decisions = std::array::from_fn(|i| match i.checked_sub(1) {
            None => series(Decision::Allow, ""),
            Some(r) => series(Decision::Deny, DenyReason::ALL[r].as_str()),
        });
        Self {
            verify_decisions,
            decisions,
            // 50 µs to ~1.6 s.
            verify_duration: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            // 0.5 ms to ~8 s.
            propagation_lag: Histogram::new(exponential_buckets(0.000_5, 2.0, 15)),
            listener_reconnects: Counter::default(),
        }
    }
}

impl Metrics {
    /// Counts one Verify decision: an ALLOW, or a DENY for `denied`.
    pub fn count_decision(&self, denied: Option<DenyReason>) {
        let series = match denied {
            None => 0,
            Some(reason) => 1 + reason as usize,
        };
        self.decisions[series].inc();
    }
}

/// Components whose own counters are exported at scrape time.
#[derive(Debug, Clone)]
pub struct Sources {
    pub pool: HashPool,
    pub audit: AuditQueue,
    pub usage: Arc<UsageTracker>,
    pub cache: Option<Arc<VerifyCache>>,
    pub freshness: Arc<Freshness>,
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
        counter(&mut encoder, "scrypt_runs", "scrypt hashes computed", s.pool.runs())?;
        gauge(
            &mut encoder,
            "audit_queue_depth",
            "audit rows waiting to be written",
            None,
            s.audit.depth() as f64,
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
            "audit_write_failures",
            "failed audit batch inserts (retried)",
            s.audit.failed_writes(),
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
        Ok(())
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
            "change_listener_reconnects",
            "times the change listener reconnected (cached state dropped each time)",
            metrics.listener_reconnects.clone(),
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
