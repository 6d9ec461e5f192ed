//! The lifecycle-event relay's figures on `/metrics`, read from its last
//! look at the fleet's backlog.

use prometheus_client::{
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::gauge::ConstGauge,
    registry::Unit,
};

use super::{counter, gauge};
use crate::events::relay::EventStats;

#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct SinkLabels {
    sink: String,
}

/// Per sink, what waits and for how long (`unplaced` counts events no sink
/// has been given yet), and what the relay delivered.
pub(super) fn encode(encoder: &mut DescriptorEncoder, stats: &EventStats) -> Result<(), std::fmt::Error> {
    use std::sync::atomic::Ordering::Relaxed;
    let backlog = stats.backlog();
    let mut depth = encoder.encode_descriptor(
        "events_outbox_depth",
        "lifecycle events not yet delivered, per sink",
        None,
        prometheus_client::metrics::MetricType::Gauge,
    )?;
    for (sink, pending, _) in &backlog {
        ConstGauge::new(*pending as f64).encode(depth.encode_family(&SinkLabels { sink: sink.clone() })?)?;
    }
    let mut age = encoder.encode_descriptor(
        "events_oldest_undelivered_age",
        "age of the oldest lifecycle event not yet delivered, per sink",
        Some(&Unit::Seconds),
        prometheus_client::metrics::MetricType::Gauge,
    )?;
    for (sink, _, oldest) in &backlog {
        ConstGauge::new(*oldest).encode(age.encode_family(&SinkLabels { sink: sink.clone() })?)?;
    }
    gauge(
        encoder,
        "events_relay_leading",
        "1 if this replica holds the lease that delivers lifecycle events",
        None,
        if stats.leading.load(Relaxed) { 1.0 } else { 0.0 },
    )?;
    counter(
        encoder,
        "events_delivered",
        "lifecycle-event deliveries acknowledged",
        stats.delivered.load(Relaxed),
    )?;
    counter(
        encoder,
        "events_delivery_failures",
        "lifecycle-event delivery attempts that failed",
        stats.failed_attempts.load(Relaxed),
    )
}
