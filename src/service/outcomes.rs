//! RecordOutcomes: completing allowed Verify rows with the HTTP status the
//! caller answered, for the gRPC method and Envoy's access-log stream
//! alike. Bounded before any work is done; a row still in another
//! replica's queue gets its outcome held until it lands.

use std::sync::Arc;

use super::{ServiceError, validate::Violations};
use crate::{
    audit::{
        self,
        writer::{AuditQueue, TakenOutcomes},
    },
    clock::DbClock,
    keys::EventIds,
    metrics::Metrics,
    store::{Store, audit::OutcomeWrite, lane::DbLane},
};

/// Most outcomes one RecordOutcomes call may carry.
pub const MAX_OUTCOMES: usize = 1000;

#[derive(Debug)]
pub struct OutcomeRecorder {
    store: Store,
    audit: AuditQueue,
    /// Recognises the ids this deployment minted lately.
    ids: EventIds,
    /// Verify's share of database connections, shared with identification.
    lane: DbLane,
    metrics: Arc<Metrics>,
    clock: Arc<DbClock>,
}

impl OutcomeRecorder {
    pub(crate) fn new(
        store: Store,
        audit: AuditQueue,
        ids: EventIds,
        lane: DbLane,
        metrics: Arc<Metrics>,
        clock: Arc<DbClock>,
    ) -> Self {
        Self { store, audit, ids, lane, metrics, clock }
    }

    /// Completes allowed rows with the HTTP status the caller answered.
    /// The work is bounded before any is done: an oversized call is refused
    /// whole, errors list a few fields, the database gets one statement, and
    /// only ids this deployment issued may wait for their row.
    pub async fn record(&self, outcomes: Vec<(String, i32)>) -> Result<u64, ServiceError> {
        if outcomes.len() > MAX_OUTCOMES {
            return Err(ServiceError::invalid(
                "outcomes",
                format!("at most {MAX_OUTCOMES} per call (got {})", outcomes.len()),
            ));
        }
        let mut v = Violations::default();
        let mut checked: Vec<(String, u16)> = Vec::with_capacity(outcomes.len());
        for (i, (id, status)) in outcomes.into_iter().enumerate() {
            if id.is_empty() || id.len() > 64 {
                v.add(format!("outcomes[{i}].audit_event_id"), "is not an audit event id");
            }
            match u16::try_from(status) {
                Ok(s) if (100..=599).contains(&s) => checked.push((id, s)),
                _ => v.add(format!("outcomes[{i}].status"), "must be an HTTP status between 100 and 599"),
            }
        }
        v.into_result()?;
        // A status is written once, by the first report: an id repeated in
        // this call is ignored here, before any write.
        let mut seen = std::collections::HashSet::with_capacity(checked.len());
        let reported = checked.len();
        checked.retain(|(id, _)| seen.insert(id.clone()));
        let repeated = (reported - checked.len()) as u64;
        let TakenOutcomes { held, ignored, rest } = self.audit.record_outcomes(checked);
        let lane = self.lane.acquire().await?;
        let found = self.store.set_outcomes(&rest).await?;
        let count = |what| found.iter().filter(|f| **f == what).count() as u64;
        let written = count(OutcomeWrite::Written);
        self.metrics.outcomes_ignored.inc_by(repeated + ignored + count(OutcomeWrite::AlreadySet));
        // A row verified on another replica may still be in that replica's
        // queue: hold its outcome in the database until the row lands. Only
        // ids this deployment minted lately qualify (their tag says so), and
        // since this replica cannot tell whether the row will land, they are
        // not counted.
        let now = self.clock.now();
        let pending: Vec<(String, u16)> = rest
            .into_iter()
            .zip(found)
            .filter(|((id, _), found)| {
                *found == OutcomeWrite::NoRow
                    && self.ids.issued_at(id).is_some_and(|at| audit::recently_issued(at, now))
            })
            .map(|(outcome, _)| outcome)
            .collect();
        self.store.hold_outcomes(&pending, now).await?;
        drop(lane);
        Ok(held + written)
    }
}
