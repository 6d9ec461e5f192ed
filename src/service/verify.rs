//! The Verify pipeline: validate → parse the key (shape and checksum, no I/O)
//! → identify it (store lookup by prefix, scrypt check on the pool) → decide
//! against its current policy → take a token from each of its rate limits
//! → queue the audit row and count usage.
//!
//! Nothing here writes to the database: audit rows and usage go through
//! their batching queues.

use std::{net::IpAddr, sync::Arc};

use chrono::{DateTime, Utc};

use super::{
    Deps, ServiceError,
    hash_pool::{HashPool, Lane},
    rehash::Rehasher,
    validate::{self, Violations},
};
use crate::{
    audit::{
        self, AuditKind, AuditRecord,
        rollup::Rollups,
        writer::{AuditQueue, QueueError, TakenOutcomes},
    },
    cache::{
        IdentifyError, Owner, VerifyCache,
        changes::{Freshness, Trust},
    },
    clock::DbClock,
    fleet::WarmStart,
    keys::{
        AllowList, Decision, DenyReason, EventIds, KeyHash, KeyHasher, KeyPrefix, KeyState, LimitStatus,
        PlainKey, Policy, ScopeCatalogue, ScopeSet,
        credits::{self, Balance},
        decide,
    },
    limiter::{Limiter, credits::Spend},
    metrics::Metrics,
    store::{Store, audit::OutcomeWrite, keys::StoredKey},
    telemetry,
    throttle::GuessThrottle,
    usage::UsageTracker,
};

/// A future on the heap, for the cold paths kept out of the warm one's
/// state machine.
type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// A Verify call as received.
#[derive(Clone)]
pub struct VerifyInput {
    pub key: String,
    pub ip: String,
    pub required_scope: String,
    pub endpoint: String,
    pub method: String,
    /// Credits an allowed call takes (0 means 1).
    pub cost: u32,
}

impl std::fmt::Debug for VerifyInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyInput")
            .field("key", &"[redacted]")
            .field("ip", &self.ip)
            .field("required_scope", &self.required_scope)
            .field("endpoint", &self.endpoint)
            .field("method", &self.method)
            .field("cost", &self.cost)
            .finish()
    }
}

/// What an allowed key may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub merchant_id: String,
    pub key_id: String,
    pub key_name: String,
    /// Granted scopes with implications expanded.
    pub scopes: Vec<String>,
    pub expires_at: Option<DateTime<Utc>>,
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

/// The verification view of a stored key.
fn key_state(key: &StoredKey, catalogue: &ScopeCatalogue) -> Result<KeyState, ServiceError> {
    let allowed = AllowList::from_stored(key.allowed_cidrs.iter().map(String::as_str)).map_err(|entry| {
        ServiceError::Internal(format!("key {} has an unreadable allowed_cidrs entry {entry:?}", key.id))
    })?;
    let scopes = catalogue.expand(catalogue.from_stored(key.scopes.iter().map(String::as_str)));
    Ok(KeyState {
        key_id: Arc::from(key.id.as_str()),
        merchant_id: key.merchant_id.clone(),
        name: key.name.clone(),
        policy: Policy { revoked_at: key.revoked_at, expires_at: key.expires_at, allowed, scopes },
        rate_limits: key.rate_limits.clone(),
        credits: key.credits.map(|c| Balance {
            remaining: c.remaining,
            seq: key.credits_seq,
            epoch: key.credits_epoch,
        }),
        version: key.version,
    })
}

#[derive(Debug)]
pub struct Verifier {
    store: Store,
    hasher: KeyHasher,
    pool: HashPool,
    catalogue: Arc<ScopeCatalogue>,
    prefix: KeyPrefix,
    usage: Arc<UsageTracker>,
    audit: AuditQueue,
    ids: EventIds,
    rollups: Arc<Rollups>,
    throttle: Arc<GuessThrottle>,
    limiter: Arc<Limiter>,
    /// Database connections Verify may hold at once, and how long it waits
    /// for one.
    db_lane: tokio::sync::Semaphore,
    db_wait: std::time::Duration,
    /// `None` runs scrypt on every call (for measuring the cold path).
    cache: Option<Arc<VerifyCache>>,
    freshness: Arc<Freshness>,
    metrics: Arc<Metrics>,
    clock: Arc<DbClock>,
    /// Keys checked under an old pepper go here to be hashed again.
    rehasher: Arc<Rehasher>,
    /// The fleet's map of keys already checked by scrypt, when Redis is
    /// configured.
    warm: Option<Arc<WarmStart>>,
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
    /// what is reserved for everything else), and how long it waits.
    pub db_connections: usize,
    pub db_wait: std::time::Duration,
    pub cache: Option<Arc<VerifyCache>>,
    pub freshness: Arc<Freshness>,
    pub metrics: Arc<Metrics>,
    pub rehasher: Arc<Rehasher>,
    pub warm: Option<Arc<WarmStart>>,
}

/// A Verify request's fields, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checked {
    pub ip: Option<IpAddr>,
    pub required: Option<ScopeSet>,
}

/// Validates a Verify request's fields, naming each bad one. The key's
/// shape is not checked here: a malformed key is a verdict, not an error.
pub fn check_request(catalogue: &ScopeCatalogue, input: &VerifyInput) -> Result<Checked, ServiceError> {
    let mut v = Violations::default();
    if input.key.len() > validate::MAX_PRESENTED_KEY {
        v.add("key", format!("must be at most {} characters", validate::MAX_PRESENTED_KEY));
    }
    let ip = if input.ip.is_empty() {
        None
    } else {
        match input.ip.parse::<IpAddr>() {
            Ok(ip) => Some(ip),
            Err(_) => {
                v.add("ip", "is not an IPv4 or IPv6 address (leave it empty if unknown)");
                None
            }
        }
    };
    let required = if input.required_scope.is_empty() {
        None
    } else {
        let found = catalogue.required(&input.required_scope);
        if found.is_none() {
            v.add(
                "required_scope",
                format!(
                    "unknown scope {}; ListScopes returns the catalogue",
                    validate::excerpt(&input.required_scope, validate::MAX_EXCERPT)
                ),
            );
        }
        found
    };
    v.check("endpoint", validate::endpoint(&input.endpoint));
    v.check("method", validate::method(&input.method));
    v.into_result()?;
    Ok(Checked { ip, required })
}

/// A Verify audit row with the request's fields; its id is given once it is
/// known where the row goes (a minted id for the queue, the rollup's
/// otherwise).
fn verify_record(now: DateTime<Utc>, endpoint: String, method: String, ip: Option<IpAddr>) -> AuditRecord {
    let mut record =
        AuditRecord::with_id(String::new(), AuditKind::Verify, now, telemetry::current_trace_id());
    record.endpoint = Some(endpoint).filter(|s| !s.is_empty());
    record.method = Some(method).filter(|s| !s.is_empty());
    record.ip = ip.map(|ip| ip.to_string());
    record
}

/// What an allowed key grants, for the response.
fn grant(catalogue: &ScopeCatalogue, state: &KeyState) -> Grant {
    Grant {
        merchant_id: state.merchant_id.clone(),
        key_id: state.key_id.to_string(),
        key_name: state.name.clone(),
        scopes: catalogue.names(state.policy.scopes),
        expires_at: state.policy.expires_at,
    }
}

/// The outcome Verify reaches for `input` when identification finds
/// `found` (the key's state, if its prefix exists and the secret matches),
/// without I/O: the validation, parsing and policy steps of
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
    let checked = check_request(catalogue, input)?;
    if PlainKey::parse(prefix, &input.key).is_err() {
        return Ok(Err(DenyReason::Malformed));
    }
    let Some(state) = found else { return Ok(Err(DenyReason::NotFound)) };
    Ok(decide(&state.policy, now, checked.ip, checked.required).map(|()| grant(catalogue, state)))
}

impl Verifier {
    pub fn new(deps: Deps, parts: VerifyParts) -> Self {
        let Deps { store, hasher, pool, catalogue, prefix, usage, clock } = deps;
        let VerifyParts {
            audit,
            ids,
            rollups,
            throttle,
            limiter,
            db_connections,
            db_wait,
            cache,
            freshness,
            metrics,
            rehasher,
            warm,
        } = parts;
        Self {
            store,
            hasher,
            pool,
            catalogue,
            prefix,
            usage,
            audit,
            ids,
            rollups,
            throttle,
            limiter,
            db_lane: tokio::sync::Semaphore::new(db_connections.max(1)),
            db_wait,
            cache,
            freshness,
            metrics,
            clock,
            rehasher,
            warm,
        }
    }

    /// Decides on one presented key. Denials are verdicts, not errors; errors
    /// are the caller's bugs (INVALID_ARGUMENT) or ours (UNAVAILABLE, …).
    /// `span` is the call's `keywarden.verify` span: it receives the audit
    /// row's fields.
    pub async fn verify(&self, input: VerifyInput, span: &tracing::Span) -> Result<Verdict, ServiceError> {
        let started = std::time::Instant::now();
        let verdict = self.decide(input, span).await;
        if let Ok(v) = &verdict {
            self.metrics.count_decision(v.outcome.as_ref().err().copied());
            self.metrics.verify_duration.observe(started.elapsed().as_secs_f64());
        }
        verdict
    }

    async fn decide(&self, input: VerifyInput, span: &tracing::Span) -> Result<Verdict, ServiceError> {
        let checked = check_request(&self.catalogue, &input)?;
        // The database's clock: revocations stamped by another replica
        // compare against the clock they were stamped on.
        let now = self.clock.now();
        let mut record = verify_record(now, input.endpoint, input.method, checked.ip);
        let mut rate_limit = None;
        let mut credits_remaining = None;

        let outcome = match PlainKey::parse(&self.prefix, &input.key) {
            Err(_) => Err(DenyReason::Malformed),
            Ok(key) => {
                record.key_prefix = Some(key.lookup_prefix().as_str().to_owned());
                match self.identify(key, checked.ip).await? {
                    Err(Refused { reason, owner }) => {
                        // A wrong secret for an existing key is its
                        // merchant's business: a full row on that key.
                        if let Some(owner) = owner {
                            record.merchant_id = Some(owner.merchant_id.clone());
                            record.api_key_id = Some(owner.key_id.to_string());
                            record.api_key_name = Some(owner.name.clone());
                        }
                        Err(reason)
                    }
                    Ok(state) => {
                        record.merchant_id = Some(state.merchant_id.clone());
                        record.api_key_id = Some(state.key_id.to_string());
                        record.api_key_name = Some(state.name.clone());
                        let admitted = match decide(&state.policy, now, checked.ip, checked.required) {
                            Err(reason) => Err(reason),
                            Ok(()) => {
                                self.admit(&state, now, input.cost, &mut rate_limit, &mut credits_remaining)
                                    .await
                            }
                        };
                        admitted.map(|()| grant(&self.catalogue, &state))
                    }
                }
            }
        };

        match &outcome {
            Ok(grant) => {
                record.decision = Some(Decision::Allow);
                self.usage.record_allowed(&grant.key_id, now);
            }
            Err(reason) => {
                record.decision = Some(Decision::Deny);
                record.deny_reason = Some(*reason);
                record.status = Some(reason.http_status());
                if let Some(key_id) = &record.api_key_id {
                    self.usage.record_denied(key_id);
                }
            }
        }
        // A call that belongs to no merchant is counted in a rollup row,
        // not queued: garbage cannot take the queue's room from real keys.
        if record.merchant_id.is_none()
            && let Err(reason) = outcome
        {
            record.id = self.rollups.add(&record, reason);
            audit::record_on_span(span, &record);
            return Ok(Verdict { outcome, audit_event_id: record.id, rate_limit, credits_remaining });
        }
        record.id = self.ids.mint();
        audit::record_on_span(span, &record);
        let audit_event_id = record.id.clone();
        self.audit.push(record).await.map_err(|e| match e {
            QueueError::Closed => ServiceError::Unavailable("the server is shutting down".into()),
            QueueError::Full => {
                ServiceError::Unavailable("the audit trail is not keeping up; retry with backoff".into())
            }
        })?;
        Ok(Verdict { outcome, audit_event_id, rate_limit, credits_remaining })
    }

    /// The limits, then the credits, of a call the policy allows: only such
    /// a call takes a token (at the time it is admitted; a cold call's
    /// scrypt may have taken a while), and a call the limits refuse spends
    /// no credit. What each said goes into the verdict's fields.
    async fn admit(
        &self,
        state: &KeyState,
        now: DateTime<Utc>,
        cost: u32,
        rate_limit: &mut Option<LimitStatus>,
        credits_remaining: &mut Option<i64>,
    ) -> Result<(), DenyReason> {
        let at = if state.rate_limits.is_empty() { now } else { self.clock.now() };
        match self.limiter.check(&state.key_id, &state.rate_limits, at).await {
            Ok(tightest) => *rate_limit = tightest,
            Err(refusing) => {
                *rate_limit = Some(refusing);
                return Err(DenyReason::RateLimited);
            }
        }
        let Some(balance) = state.credits else { return Ok(()) };
        let cost = credits::cost(cost);
        let shared = match self.limiter.credits() {
            Some(fleet) => fleet.spend(&state.key_id, balance.epoch, cost).await,
            None => Spend::Unavailable,
        };
        let spent = match shared {
            Spend::Paid(left) => {
                self.usage.record_spent(&state.key_id, balance, cost);
                Ok(left)
            }
            Spend::Refused(left) => Err(left),
            Spend::Unavailable => self.usage.spend(&state.key_id, balance, cost),
        };
        *credits_remaining = Some(spent.unwrap_or_else(|left| left));
        spent.map(|_| ()).map_err(|_| DenyReason::QuotaExhausted)
    }

    /// A request refused before any key is looked at (the gateway's
    /// unmatched route): audited as a Verify that belongs to no merchant,
    /// in a rollup row, and counted with the other decisions.
    pub fn refuse(
        &self,
        endpoint: String,
        method: String,
        ip: Option<IpAddr>,
        reason: DenyReason,
        span: &tracing::Span,
    ) -> Verdict {
        let mut record = verify_record(self.clock.now(), endpoint, method, ip);
        record.decision = Some(Decision::Deny);
        record.deny_reason = Some(reason);
        record.status = Some(reason.http_status());
        record.id = self.rollups.add(&record, reason);
        audit::record_on_span(span, &record);
        self.metrics.count_decision(Some(reason));
        Verdict { outcome: Err(reason), audit_event_id: record.id, rate_limit: None, credits_remaining: None }
    }

    /// Completes allowed rows with the HTTP status the caller answered.
    /// The work is bounded before any is done: an oversized call is refused
    /// whole, errors list a few fields, the database gets one statement, and
    /// only ids this deployment issued may wait for their row.
    pub async fn record_outcomes(&self, outcomes: Vec<(String, i32)>) -> Result<u64, ServiceError> {
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
        let lane = self.db_lane().await?;
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

    /// The key's current state if it exists and the secret matches;
    /// NOT_FOUND for an unknown prefix or a wrong secret (indistinguishable
    /// by design), THROTTLED when its secret may not be checked now.
    /// Warm: two cache lookups. Cold: one indexed read and one scrypt, shared
    /// by every concurrent call presenting the same key.
    async fn identify(&self, key: PlainKey, ip: Option<IpAddr>) -> Result<Identified, ServiceError> {
        let Some(cache) = &self.cache else {
            let checked = self.noting_outage(Box::pin(self.check_secret(&key, ip)).await)?;
            return Ok(checked.map(Arc::new));
        };
        let digest = cache.digest(&key);
        let key_id = match cache.identity(&digest) {
            Some(id) => id,
            None if let Some(owner) = cache.known_bad(&digest) => {
                return self.refused_for(cache, owner).await.map(Err);
            }
            // Boxed, like every other store read below: the cold path's
            // futures (sea-orm, scrypt pool, single flight) are kilobytes,
            // and inline they would make every warm call's future that size
            // and copy it at each await and spawn.
            None => match Box::pin(cache.identify_once(digest, self.identify_cold(cache, key, ip))).await {
                Ok(id) => id,
                Err(Cold::Denied(refused)) => return Ok(Err(refused)),
                Err(Cold::KnownBad(owner)) => return self.refused_for(cache, owner).await.map(Err),
                Err(Cold::Failed(e)) => return Err(e),
            },
        };
        Ok(self
            .current_state(cache, &key_id)
            .await?
            .ok_or(Refused { reason: DenyReason::NotFound, owner: None }))
    }

    /// NOT_FOUND for a key found bad lately, with its owner's current state
    /// when only the secret was wrong.
    fn refused_for<'a>(
        &'a self,
        cache: &'a VerifyCache,
        owner: Owner,
    ) -> BoxFuture<'a, Result<Refused, ServiceError>> {
        Box::pin(async move {
            let owner = match owner {
                Some(key_id) => self.current_state(cache, &key_id).await?,
                None => None,
            };
            Ok(Refused { reason: DenyReason::NotFound, owner })
        })
    }

    /// An identified key's state, from the cache while it is trusted.
    async fn current_state(
        &self,
        cache: &VerifyCache,
        key_id: &str,
    ) -> Result<Option<Arc<KeyState>>, ServiceError> {
        match self.freshness.trust() {
            Trust::Trusted => {
                if let Some(state) = cache.state(key_id) {
                    return Ok(Some(state));
                }
                let since = cache.epoch();
                let state = self.load_state(key_id).await?;
                if let Some(state) = &state {
                    cache.fill_state(since, Arc::clone(state));
                }
                Ok(state)
            }
            // Change notices are not arriving: the database is the truth,
            // and what is cached may only stand in while it is unreachable.
            Trust::ReadThrough => match self.load_state(key_id).await {
                Err(ServiceError::Unavailable(reason)) => match cache.state(key_id) {
                    Some(state) if self.freshness.trust() == Trust::Stale => Ok(Some(state)),
                    _ => Err(ServiceError::Unavailable(reason)),
                },
                other => other,
            },
            Trust::Stale => match cache.state(key_id) {
                Some(state) => Ok(Some(state)),
                None => self.load_state(key_id).await,
            },
            Trust::Expired => self.load_state(key_id).await,
        }
    }

    /// First sight of a key: check it, and remember its state if the cache
    /// is current.
    async fn identify_cold(
        &self,
        cache: &VerifyCache,
        key: PlainKey,
        ip: Option<IpAddr>,
    ) -> Result<Arc<str>, Cold> {
        let since = cache.epoch();
        let checked = self.noting_outage(self.check_secret(&key, ip).await).map_err(Cold::Failed)?;
        let state = Arc::new(checked.map_err(Cold::Denied)?);
        if self.freshness.trust() == Trust::Trusted {
            cache.fill_state(since, Arc::clone(&state));
        }
        Ok(Arc::clone(&state.key_id))
    }

    /// One indexed read by id, boxed to keep it out of the warm path's
    /// future (see [`Verifier::identify`]).
    fn load_state<'a>(
        &'a self,
        key_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<Arc<KeyState>>, ServiceError>> {
        Box::pin(async move {
            let lane = self.db_lane().await?;
            let stored =
                self.noting_outage(self.store.find_by_id(key_id).await.map_err(ServiceError::from))?;
            drop(lane);
            stored.map(|s| key_state(&s, &self.catalogue).map(Arc::new)).transpose()
        })
    }

    /// One of the database connections Verify may use at once: the rest of
    /// the pool stays free for KeyAdmin, health checks and the writers,
    /// whatever Verify traffic does.
    async fn db_lane(&self) -> Result<tokio::sync::SemaphorePermit<'_>, ServiceError> {
        match tokio::time::timeout(self.db_wait, self.db_lane.acquire()).await {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_)) => Err(ServiceError::Unavailable("the server is shutting down".into())),
            Err(_) => Err(ServiceError::Busy(
                "Verify's share of database connections is busy; retry with backoff".into(),
            )),
        }
    }

    /// Marks the database down when a read says it is unreachable, so that
    /// cached keys are served at once instead of after a connect timeout.
    fn noting_outage<T>(&self, result: Result<T, ServiceError>) -> Result<T, ServiceError> {
        if matches!(result, Err(ServiceError::Unavailable(_))) {
            self.freshness.database_down();
        }
        result
    }

    /// One indexed read by lookup prefix and one scrypt on the pool, unless
    /// the prefix or the client IP is throttled. A prefix with recent wrong
    /// secrets waits for a hashing thread behind every other key.
    async fn check_secret(
        &self,
        key: &PlainKey,
        ip: Option<IpAddr>,
    ) -> Result<Result<KeyState, Refused>, ServiceError> {
        let lookup = key.lookup_prefix();
        let prefix = lookup.as_str();
        let refused = |reason| Ok(Err(Refused { reason, owner: None }));
        if self.throttle.check(prefix, ip).is_some() {
            return refused(DenyReason::Throttled);
        }
        // An unknown prefix is a wrong guess from its client IP: counted
        // before the read, so random prefixes cost a bounded number of them.
        let Ok(lookup) = self.throttle.admit_lookup(ip) else {
            return refused(DenyReason::Throttled);
        };
        let stored = match self.db_lane().await {
            Ok(lane) => {
                let stored = self.store.find_by_prefix(prefix).await;
                drop(lane);
                stored
            }
            Err(busy) => {
                self.throttle.uncount_lookup(lookup);
                return Err(busy);
            }
        };
        let stored = match stored {
            Ok(Some(stored)) => {
                self.throttle.uncount_lookup(lookup);
                stored
            }
            Ok(None) => return refused(DenyReason::NotFound),
            Err(e) => {
                self.throttle.uncount_lookup(lookup);
                return Err(e.into());
            }
        };
        // Another replica checked this very plaintext against this row and
        // its hash: its scrypt stands for ours, if its tag does. A hash
        // under an old pepper is checked here instead, since only a key this
        // process checked by scrypt may be offered to the rehasher.
        if let Some(warm) = &self.warm
            && self.hasher.is_current(&stored.hash)
            && warm.vouches(key, &stored.id, &stored.hash).await
        {
            return Ok(Ok(key_state(&stored, &self.catalogue)?));
        }
        let Ok(admission) = self.throttle.admit(prefix, ip) else {
            return refused(DenyReason::Throttled);
        };
        let lane = if admission.suspect { Lane::Later } else { Lane::First };
        let (hasher, hash, plain) = (self.hasher.clone(), stored.hash.clone(), key.clone());
        match self.pool.run_in(lane, move || hasher.verify(&plain, &hash)).await {
            // A wrong secret stays counted, and is its key's merchant's
            // business.
            Ok(Ok(false)) => {
                let owner = Some(Arc::new(key_state(&stored, &self.catalogue)?));
                Ok(Err(Refused { reason: DenyReason::NotFound, owner }))
            }
            Ok(Ok(true)) => {
                self.throttle.uncount(admission);
                let state = key_state(&stored, &self.catalogue)?;
                self.rehasher.offer(&state.key_id, key, &stored.hash);
                self.publish_warm(key, &state, &stored.hash);
                Ok(Ok(state))
            }
            // An operator retired a pepper this key still needs: a fault of
            // configuration, not a wrong secret.
            Ok(Err(unknown)) => {
                self.throttle.uncount(admission);
                Err(ServiceError::Internal(format!("key {}: {unknown}", stored.id)))
            }
            Err(e) => {
                self.throttle.uncount(admission);
                Err(e.into())
            }
        }
    }

    /// Tells the fleet, off the Verify path, that `key` is `state`'s key;
    /// not for a revoked key, whose entry its revocation deleted.
    fn publish_warm(&self, key: &PlainKey, state: &KeyState, hash: &KeyHash) {
        let Some(warm) = &self.warm else { return };
        if state.policy.revoked_at.is_some_and(|at| at <= self.clock.now()) {
            return;
        }
        let (warm, key, key_id, hash) =
            (Arc::clone(warm), key.clone(), Arc::clone(&state.key_id), hash.clone());
        tokio::spawn(async move { warm.publish(&key, &key_id, &hash).await });
    }
}

/// What identification found: the key, or why it is denied.
type Identified = Result<Arc<KeyState>, Refused>;

/// Why no usable key was found; for a wrong secret, whose key it was.
struct Refused {
    reason: DenyReason,
    owner: Option<Arc<KeyState>>,
}

/// Why a first-sight check did not yield a key (the single flight's error).
enum Cold {
    Denied(Refused),
    Failed(ServiceError),
    /// A concurrent caller's check found the key bad; its owner is looked
    /// up again from the key id.
    KnownBad(Owner),
}

impl IdentifyError for Cold {
    fn unknown_key(owner: Owner) -> Self {
        Self::KnownBad(owner)
    }
    /// Only NOT_FOUND is remembered as a bad key; a throttled secret was
    /// never checked.
    fn unknown_owner(&self) -> Option<Owner> {
        match self {
            Self::Denied(Refused { reason: DenyReason::NotFound, owner }) => {
                Some(owner.as_ref().map(|o| Arc::clone(&o.key_id)))
            }
            Self::KnownBad(owner) => Some(owner.clone()),
            _ => None,
        }
    }
}

/// Most outcomes one RecordOutcomes call may carry.
pub const MAX_OUTCOMES: usize = 1000;

#[cfg(test)]
mod tests {
    // Tests read the real clock to build their inputs.
    #![allow(clippy::disallowed_methods)]

    use super::*;
    use crate::clock;

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
                allowed: AllowList::parse(cidrs).unwrap(),
                scopes: catalogue.expand(catalogue.parse_grant(scopes).unwrap()),
            },
            rate_limits: Default::default(),
            credits: None,
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
