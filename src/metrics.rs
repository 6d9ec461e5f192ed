//! The push side of the Prometheus metrics: counters and histograms that
//! code paths update directly ([`Metrics`]). The scrape side, which also
//! reads figures other components already keep (queue depths, cache hit
//! counts, scrypt runs), is wired at startup (`startup::exporter`), so this
//! module depends on nothing above the key domain.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        histogram::{Histogram, exponential_buckets},
    },
};

use crate::keys::{Decision, DenyReason};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub decision: &'static str,
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabels {
    pub code: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LeakLabels {
    /// `true_positive` or `false_positive`.
    pub label: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChannelLabels {
    /// `github` or `rpc`.
    pub channel: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TaskLabels {
    pub task: &'static str,
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
    /// Times the change listener was declared dead for hearing nothing,
    /// not even its own heartbeat, for two intervals.
    pub listener_heartbeat_misses: Counter,
    /// gRPC answers other than OK, by status code.
    pub grpc_errors: Family<CodeLabels, Counter>,
    /// Background tasks restarted after a failure, by task.
    pub task_restarts: Family<TaskLabels, Counter>,
    /// TLS material re-read and served to new connections.
    pub tls_reloads: Counter,
    /// Changed TLS files that did not load; the previous material stays.
    pub tls_reload_failures: Counter,
    pub tls_handshake_failures: Counter,
    /// Connections closed at accept: their address held its share.
    pub connections_refused_per_address: Counter,
    /// KeyAdmin calls refused: no or bad credentials, or outside the
    /// caller's role or merchants.
    pub admin_unauthenticated: Counter,
    pub admin_permission_denied: Counter,
    /// Redis commands that failed or timed out, and every command's time.
    pub redis_errors: Counter,
    pub redis_duration: Histogram,
    /// Warm-start lookups that found the key in Redis, and those that did
    /// not (Redis unreachable included); entries published after a scrypt.
    pub warm_start_hits: Counter,
    pub warm_start_misses: Counter,
    pub warm_start_published: Counter,
    /// Redis-mode rate limits: leases granted by Redis and the tokens
    /// they carried; decisions taken without Redis (by the failure mode).
    pub rate_limit_lease_refills: Counter,
    pub rate_limit_leased_tokens: Counter,
    pub rate_limit_fallback_decisions: Counter,
    /// Redis-mode credits: leases granted, the credits they carried and
    /// the credits given back unused; calls decided without Redis.
    pub credit_lease_refills: Counter,
    pub credits_leased: Counter,
    pub credits_returned: Counter,
    pub credit_fallback_decisions: Counter,
    /// Reported HTTP statuses not written: the row had one already (a
    /// status is written once, by the first report), or the id came twice
    /// in one call.
    pub outcomes_ignored: Counter,
    /// Leak reports processed, by channel; their tokens by label; GitHub
    /// reports refused for a missing, unknown or wrong signature.
    pub leak_reports: Family<ChannelLabels, Counter>,
    pub leak_tokens: Family<LeakLabels, Counter>,
    pub leak_signature_failures: Counter,
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
            listener_heartbeat_misses: Counter::default(),
            task_restarts: Family::default(),
            grpc_errors: Family::default(),
            tls_reloads: Counter::default(),
            tls_reload_failures: Counter::default(),
            tls_handshake_failures: Counter::default(),
            connections_refused_per_address: Counter::default(),
            admin_unauthenticated: Counter::default(),
            admin_permission_denied: Counter::default(),
            redis_errors: Counter::default(),
            // 50 µs to ~0.8 s.
            redis_duration: Histogram::new(exponential_buckets(0.000_05, 2.0, 15)),
            warm_start_hits: Counter::default(),
            warm_start_misses: Counter::default(),
            warm_start_published: Counter::default(),
            rate_limit_lease_refills: Counter::default(),
            rate_limit_leased_tokens: Counter::default(),
            rate_limit_fallback_decisions: Counter::default(),
            credit_lease_refills: Counter::default(),
            credits_leased: Counter::default(),
            credits_returned: Counter::default(),
            credit_fallback_decisions: Counter::default(),
            outcomes_ignored: Counter::default(),
            leak_reports: Family::default(),
            leak_tokens: Family::default(),
            leak_signature_failures: Counter::default(),
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
