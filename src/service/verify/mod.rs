//! The Verify pipeline, top to bottom in [`Verifier::verify`]: a checked
//! call ([`VerifyCall`]: the key parsed, the IP and scope typed) → one
//! reading of the database's clock → identify the key (`identify.rs`: cache,
//! store lane, throttle, scrypt, warm start) → decide against its policy →
//! admit it (`admit.rs`: rate limits, credits, usage counts) → record the
//! audit row or rollup and the span (`record.rs`).
//!
//! Nothing here writes to the database: audit rows and usage go through
//! their batching queues.

mod admit;
mod call;
mod identify;
mod record;

use std::{net::IpAddr, sync::Arc};

use chrono::{DateTime, Utc};

use super::{Deps, ServiceError, outcomes::OutcomeRecorder, rehash::Rehasher};
use crate::{
    audit::{rollup::Rollups, writer::AuditQueue},
    cache::{VerifyCache, changes::Freshness},
    clock::DbClock,
    credits::Credits,
    fleet::WarmStart,
    keys::{DenyReason, EventIds, KeyPrefix, KeyState, LimitStatus, Metadata, ScopeCatalogue, decide},
    limiter::Limiter,
    metrics::Metrics,
    store::lane::DbLane,
    throttle::GuessThrottle,
};
use admit::{Admission, Admitter};
pub use call::{Presented, VerifyCall, VerifyInput};
use identify::{Identifier, Refused};
use record::{Recorder, Row};

/// What an allowed key may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub merchant_id: String,
    pub key_id: String,
    pub key_name: String,
    /// Granted scopes with implications expanded.
    pub scopes: Vec<String>,
    pub expires_at: Option<DateTime<Utc>>,
    /// The key's labels, returned as they are.
    pub metadata: Metadata,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub outcome: Result<Grant, DenyReason>,
    pub audit_event_id: String,
    /// The key's tightest rate limit after an allowed call, or the limit
    /// that refused it; `None` for keys without limits and for denials
    /// decided before the limits.
    pub rate_limit: Option<LimitStatus>,
    /// For keys with credits: the balance after an allowed call, or the one
    /// that could not pay a refused call.
    pub credits_remaining: Option<i64>,
}

/// The Verify use case: the pipeline and the parts each step owns.
#[derive(Debug)]
pub struct Verifier {
    catalogue: Arc<ScopeCatalogue>,
    prefix: KeyPrefix,
    clock: Arc<DbClock>,
    metrics: Arc<Metrics>,
    identifier: Identifier,
    admitter: Admitter,
    recorder: Recorder,
    outcomes: OutcomeRecorder,
}

/// What the Verify path needs beyond [`Deps`].
#[derive(Debug, Clone)]
pub struct VerifyParts {
    pub audit: AuditQueue,
    /// Mints the audit ids Verify returns, and recognises them later.
    pub ids: EventIds,
    /// Where calls that belong to no merchant are counted.
    pub rollups: Arc<Rollups>,
    pub throttle: Arc<GuessThrottle>,
    /// Per-key rate limits.
    pub limiter: Arc<Limiter>,
    /// Database connections Verify may hold at once (the pool's size minus
    /// what is reserved for everything else), and how long it waits: shared
    /// with RecordOutcomes and the fleet credits' seed reads.
    pub lane: DbLane,
    /// Credit balances: the fleet's shared ones, or this replica's view.
    pub credits: Arc<Credits>,
    /// `None` runs scrypt on every call (for measuring the cold path).
    pub cache: Option<Arc<VerifyCache>>,
    pub freshness: Arc<Freshness>,
    pub metrics: Arc<Metrics>,
    /// Keys checked under an old pepper go here to be hashed again.
    pub rehasher: Arc<Rehasher>,
    /// The fleet's map of keys already checked by scrypt, when Redis is
    /// configured.
    pub warm: Option<Arc<WarmStart>>,
}

/// What an allowed key grants, for the response.
fn grant(catalogue: &ScopeCatalogue, state: &KeyState) -> Grant {
    Grant {
        merchant_id: state.merchant_id.clone(),
        key_id: state.key_id.to_string(),
        key_name: state.name.clone(),
        scopes: catalogue.names(state.policy.scopes),
        expires_at: state.policy.expires_at,
        metadata: state.metadata.clone(),
    }
}

/// The outcome Verify reaches for `input` when identification finds
/// `found` (the key's state, if its prefix exists and the secret matches),
/// without I/O: the checking, parsing and policy steps of
/// [`Verifier::verify`], in its order. It lets the fuzzer and property
/// tests drive the whole decision from request bytes; the server runs the
/// same steps with identification (store, scrypt, throttle) in between.
pub fn decide_offline(
    catalogue: &ScopeCatalogue,
    prefix: &KeyPrefix,
    input: &VerifyInput,
    found: Option<&KeyState>,
    now: DateTime<Utc>,
) -> Result<Result<Grant, DenyReason>, ServiceError> {
    let call = VerifyCall::check(catalogue, prefix, input.clone())?;
    if let Presented::Malformed = call.key {
        return Ok(Err(DenyReason::Malformed));
    }
    let Some(state) = found else { return Ok(Err(DenyReason::NotFound)) };
    Ok(decide(&state.policy, now, call.ip, call.required).map(|()| grant(catalogue, state)))
}

impl Verifier {
    pub fn new(deps: Deps, parts: VerifyParts) -> Self {
        let Deps { store, hasher, pool, catalogue, prefix, usage, clock } = deps;
        let lane = parts.lane;
        Self {
            identifier: Identifier {
                store: store.clone(),
                hasher,
                pool,
                catalogue: Arc::clone(&catalogue),
                lane: lane.clone(),
                cache: parts.cache,
                freshness: parts.freshness,
                throttle: parts.throttle,
                rehasher: parts.rehasher,
                warm: parts.warm,
            },
            admitter: Admitter { limiter: parts.limiter, credits: parts.credits, usage },
            recorder: Recorder { audit: parts.audit.clone(), ids: parts.ids.clone(), rollups: parts.rollups },
            outcomes: OutcomeRecorder::new(
                store,
                parts.audit,
                parts.ids,
                lane,
                Arc::clone(&parts.metrics),
                Arc::clone(&clock),
            ),
            catalogue,
            prefix,
            clock,
            metrics: parts.metrics,
        }
    }

    /// Checks a call as the protocol carries it ([`VerifyCall::check`]).
    pub fn check(&self, input: VerifyInput) -> Result<VerifyCall, ServiceError> {
        VerifyCall::check(&self.catalogue, &self.prefix, input)
    }

    /// The prefix keys are parsed with, for callers that build a
    /// [`VerifyCall`] themselves.
    pub fn prefix(&self) -> &KeyPrefix {
        &self.prefix
    }

    /// RecordOutcomes, for the gRPC method and the access-log stream alike.
    pub fn outcomes(&self) -> &OutcomeRecorder {
        &self.outcomes
    }

    /// Decides on one presented key. Denials are verdicts, not errors; errors
    /// are ours (UNAVAILABLE, …). `span` is the call's `keywarden.verify`
    /// span: it receives the audit row's fields.
    pub async fn verify(&self, call: VerifyCall, span: &tracing::Span) -> Result<Verdict, ServiceError> {
        let started = std::time::Instant::now();
        let verdict = self.decide(call, span).await;
        if let Ok(v) = &verdict {
            self.metrics.count_decision(v.outcome.as_ref().err().copied());
            self.metrics.verify_duration.observe(started.elapsed().as_secs_f64());
        }
        verdict
    }

    async fn decide(&self, call: VerifyCall, span: &tracing::Span) -> Result<Verdict, ServiceError> {
        let VerifyCall { key, ip, required, endpoint, method, cost } = call;
        // The one reading of the database's clock: revocations stamped by
        // another replica compare against the clock they were stamped on.
        let now = self.clock.now();

        // Identify: whose key this is, if anyone's.
        let (prefix, identified) = match key {
            Presented::Malformed => (None, Err(Refused { reason: DenyReason::Malformed, owner: None })),
            Presented::Key(key) => {
                let prefix = key.lookup_prefix();
                (Some(prefix), self.identifier.identify(key, ip, now).await?)
            }
        };

        // Decide, then admit: only a call the policy allows takes a token
        // or a credit.
        let (outcome, key, admission) = match identified {
            // A wrong secret for an existing key is its merchant's business.
            Err(Refused { reason, owner }) => (Err(reason), owner, Admission::default()),
            Ok(state) => {
                let admission = match decide(&state.policy, now, ip, required) {
                    Err(reason) => Admission::refused(reason),
                    Ok(()) => self.admitter.admit(&state, now, cost).await,
                };
                (admission.outcome.map(|()| grant(&self.catalogue, &state)), Some(state), admission)
            }
        };
        self.admitter.count(&outcome, key.as_deref(), now);

        // Record: the audit row (or rollup) and the span say the same.
        let row = Row { now, endpoint, method, ip, prefix, key: key.as_deref(), outcome: &outcome };
        let audit_event_id = self.recorder.record(row, span).await?;
        Ok(Verdict {
            outcome,
            audit_event_id,
            rate_limit: admission.rate_limit,
            credits_remaining: admission.credits_remaining,
        })
    }

    /// A request refused before any key is looked at (the gateway's
    /// unmatched or non-canonical request): audited as a Verify that
    /// belongs to no merchant, in a rollup row, and counted with the other
    /// decisions.
    pub fn refuse(
        &self,
        endpoint: String,
        method: String,
        ip: Option<IpAddr>,
        reason: DenyReason,
        span: &tracing::Span,
    ) -> Verdict {
        let outcome = Err(reason);
        let row =
            Row { now: self.clock.now(), endpoint, method, ip, prefix: None, key: None, outcome: &outcome };
        let audit_event_id = self.recorder.roll_up(row, reason, span);
        self.metrics.count_decision(Some(reason));
        Verdict { outcome, audit_event_id, rate_limit: None, credits_remaining: None }
    }
}

#[cfg(test)]
mod tests {
    // Tests read the real clock to build their inputs.
    #![allow(clippy::disallowed_methods)]

    use super::*;
    use crate::{
        clock,
        keys::{AllowList, PlainKey, Policy},
    };

    fn input(key: &str, ip: &str, scope: &str) -> VerifyInput {
        VerifyInput {
            key: key.into(),
            ip: ip.into(),
            required_scope: scope.into(),
            endpoint: "/v1/invoices".into(),
            method: "GET".into(),
            cost: 0,
        }
    }

    fn state(catalogue: &ScopeCatalogue, scopes: &[&str], cidrs: &[&str]) -> KeyState {
        KeyState {
            key_id: Arc::from("k1"),
            merchant_id: "m1".into(),
            name: "n".into(),
            policy: Policy {
                revoked_at: None,
                expires_at: None,
                disabled: false,
                allowed: AllowList::parse(cidrs).unwrap(),
                scopes: catalogue.expand(catalogue.parse_grant(scopes).unwrap()),
            },
            rate_limits: Default::default(),
            credits: None,
            metadata: Default::default(),
            version: 1,
        }
    }

    #[test]
    fn the_offline_decision_validates_then_parses_then_decides() {
        let catalogue = ScopeCatalogue::default();
        let prefix = KeyPrefix::new("sntr_").unwrap();
        let key = PlainKey::generate(&prefix).unwrap();
        let key = key.expose();
        let held = state(&catalogue, &["invoice:write"], &["10.0.0.0/8"]);
        let now = clock::now();
        let decide = |i: &VerifyInput, found| decide_offline(&catalogue, &prefix, i, found, now);

        let allowed = decide(&input(key, "10.0.0.1", "invoice:read"), Some(&held)).unwrap().unwrap();
        assert_eq!(allowed.merchant_id, "m1");
        assert_eq!(allowed.scopes, ["invoice:read", "invoice:write"]);
        assert_eq!(decide(&input(key, "11.0.0.1", ""), Some(&held)).unwrap(), Err(DenyReason::IpNotAllowed));
        assert_eq!(decide(&input(key, "10.0.0.1", ""), None).unwrap(), Err(DenyReason::NotFound));
        assert_eq!(decide(&input("sntr_x", "", ""), Some(&held)).unwrap(), Err(DenyReason::Malformed));
        let Err(ServiceError::Invalid(fields)) = decide(&input(key, "nope", "no:such"), Some(&held)) else {
            panic!("bad fields are an error, not a verdict");
        };
        let names: Vec<&str> = fields.iter().map(|f| f.field.as_str()).collect();
        assert_eq!(names, ["ip", "required_scope"]);
    }
}
