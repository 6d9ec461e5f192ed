//! Leaked keys: a report names tokens found where they should not be (a
//! public repository, a package, a ticket), and every token proven to be a
//! live key or operator token is revoked at once, fleet-wide.
//!
//! A token counts as a key only when its secret is proven against the
//! stored hash, as Verify proves it: a prefix alone never revokes anyone's
//! key, since anyone can publish a fake token carrying a real key's
//! prefix. A bad checksum or an unknown prefix costs no scrypt, and nor
//! does a key this replica's cache already proved; the rest wait in the
//! hash pool's later lane, so a flood of forged tokens cannot delay a
//! merchant's first verification. [`github`] checks the signature on
//! GitHub's reports.

pub mod github;

use std::{collections::HashMap, sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use sha2::{Digest as _, Sha256};
use tokio::task::JoinSet;

use super::{
    ServiceError,
    access::{Access, Principal},
    events::{KeyEvents, key_ref},
    hash_pool::{HashPool, Lane, PoolError},
    validate::{self, Violations},
};
use crate::{
    audit::{AuditKind, AuditRecord},
    cache::VerifyCache,
    clock::DbClock,
    event_fields,
    events::{EventType, KeyFacts, Outbox},
    keys::{
        KeyHasher, KeyPrefix, PlainKey,
        events::KeyEvent,
        operator::{AdminAction, OperatorSecret},
    },
    metrics::{ChannelLabels, LeakLabels, Metrics},
    store::{
        Store,
        keys::{LeakRevocation, Leaked, StoredKey},
    },
    telemetry::current_trace_id,
};

/// Most tokens one report may carry.
pub const MAX_TOKENS: usize = 1_000;
/// The actor of revocations GitHub's reports cause.
pub const GITHUB_ACTOR: &str = "github-secret-scanning";
/// Longest `source` and `url` kept from a report; the rest is cut.
const MAX_SOURCE: usize = 64;
const MAX_URL: usize = 2_048;
/// Scrypt checks of one report in flight at once: enough to keep every
/// pool thread busy without filling the lane it waits in.
const IN_FLIGHT: usize = 4;
/// How long a check waits for room in a full hash-pool lane before the
/// report fails (and is delivered again).
const POOL_PATIENCE: Duration = Duration::from_secs(30);

/// How a reported token was judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Label {
    /// One of ours: now revoked, or revoked or expired already.
    TruePositive,
    /// Not one of ours: a bad checksum, or nothing it proves.
    FalsePositive,
}

impl Label {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TruePositive => "true_positive",
            Self::FalsePositive => "false_positive",
        }
    }
}

/// One token as reported, and where it was found.
#[derive(Debug, Clone)]
pub struct Reported {
    pub token: String,
    pub source: String,
    pub url: String,
}

/// The judgement of one reported token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Lowercase hex SHA-256 of the token: names it without repeating it.
    pub token_hash: String,
    pub label: Label,
    /// `(merchant_id, key_id)` when a merchant's key matched.
    pub key: Option<(String, String)>,
}

/// Who is reporting, as the rows it causes name them.
#[derive(Debug, Clone, Copy)]
pub enum Channel<'a> {
    /// GitHub's secret-scanning partner program (signature checked).
    Github,
    /// KeyAdmin.ReportLeakedKeys, by an authorized operator.
    Operator(&'a Principal),
}

impl Channel<'_> {
    fn actor(&self) -> &str {
        match self {
            Self::Github => GITHUB_ACTOR,
            Self::Operator(who) => &who.actor,
        }
    }

    fn label(&self) -> &'static str {
        match self {
            Self::Github => "github",
            Self::Operator(_) => "rpc",
        }
    }
}

/// What a token turned out to be before anything is written.
enum Match {
    None,
    Key(String),
    Operator(crate::keys::operator::OperatorToken),
}

/// Judges leak reports and revokes what they prove.
#[derive(Debug)]
pub struct Leaks {
    store: Store,
    hasher: KeyHasher,
    pool: HashPool,
    prefix: KeyPrefix,
    cache: Option<Arc<VerifyCache>>,
    access: Arc<Access>,
    clock: Arc<DbClock>,
    outbox: Outbox,
    events: KeyEvents,
    metrics: Arc<Metrics>,
}

/// What [`Leaks`] is built from.
#[derive(Debug)]
pub struct LeakParts {
    pub store: Store,
    pub hasher: KeyHasher,
    /// Verify's pool: a report's checks wait in its later lane.
    pub pool: HashPool,
    pub prefix: KeyPrefix,
    pub cache: Option<Arc<VerifyCache>>,
    pub access: Arc<Access>,
    pub clock: Arc<DbClock>,
    pub outbox: Outbox,
    pub events: KeyEvents,
    pub metrics: Arc<Metrics>,
}

impl Leaks {
    pub fn new(p: LeakParts) -> Self {
        let LeakParts { store, hasher, pool, prefix, cache, access, clock, outbox, events, metrics } = p;
        Self { store, hasher, pool, prefix, cache, access, clock, outbox, events, metrics }
    }

    /// KeyAdmin.ReportLeakedKeys: ADMIN and LEAK_REPORTER, every merchant.
    pub async fn report_by(
        &self,
        who: &Principal,
        tokens: Vec<Reported>,
    ) -> Result<Vec<Finding>, ServiceError> {
        self.access.authorize_all_merchants(who, AdminAction::ReportLeakedKeys)?;
        let mut v = Violations::default();
        if tokens.is_empty() {
            v.add("keys", "name at least one key");
        } else if tokens.len() > MAX_TOKENS {
            v.add("keys", format!("at most {MAX_TOKENS} per report (got {})", tokens.len()));
        } else {
            for (i, t) in tokens.iter().enumerate() {
                v.check(&format!("keys[{i}].source"), validate::text(&t.source, MAX_SOURCE, false));
                v.check(&format!("keys[{i}].url"), validate::text(&t.url, MAX_URL, false));
            }
        }
        v.into_result()?;
        self.judge(Channel::Operator(who), tokens).await
    }

    /// A GitHub report whose signature the caller has checked. Fields past
    /// their length are cut rather than refused: the answer must label
    /// every token.
    pub async fn report_from_github(&self, tokens: Vec<Reported>) -> Result<Vec<Finding>, ServiceError> {
        let tokens = tokens
            .into_iter()
            .map(|t| Reported {
                source: clip(&t.source, MAX_SOURCE),
                url: clip(&t.url, MAX_URL),
                token: t.token,
            })
            .collect();
        self.judge(Channel::Github, tokens).await
    }

    /// Labels every token, revoking what is proven. Any token that could
    /// not be judged (the database away, a hash under a pepper this replica
    /// lacks) fails the report after the rest are done: its sender tries
    /// again, and a second delivery changes nothing already changed.
    async fn judge(&self, channel: Channel<'_>, tokens: Vec<Reported>) -> Result<Vec<Finding>, ServiceError> {
        self.metrics.leak_reports.get_or_create(&ChannelLabels { channel: channel.label() }).inc();
        let mut findings: Vec<Option<Finding>> = vec![None; tokens.len()];
        let mut failure = None;
        // The same token twice is judged once.
        let mut first_of: HashMap<&str, usize> = HashMap::new();
        let mut checks = JoinSet::new();
        let mut pending: Vec<(usize, PlainKey, StoredKey)> = Vec::new();
        for (i, t) in tokens.iter().enumerate() {
            // A repeat takes its first's finding at the end.
            if first_of.contains_key(t.token.as_str()) {
                continue;
            }
            first_of.insert(&t.token, i);
            match self.identify_cheaply(&t.token).await {
                Ok(Cheap::Judged(m)) => match self.act(channel, t, m).await {
                    Ok(f) => findings[i] = Some(f),
                    Err(e) => failure = Some(e),
                },
                Ok(Cheap::NeedsScrypt(key, stored)) => pending.push((i, key, *stored)),
                Err(e) => failure = Some(e),
            }
        }
        // Scrypt checks, a few at a time so the lane never overflows.
        let mut queue = pending.into_iter();
        let mut stored_of: HashMap<usize, StoredKey> = HashMap::new();
        loop {
            while checks.len() < IN_FLIGHT {
                let Some((i, key, stored)) = queue.next() else { break };
                let (pool, hasher, hash) = (self.pool.clone(), self.hasher.clone(), stored.hash.clone());
                stored_of.insert(i, stored);
                checks.spawn(async move { (i, prove(pool, hasher, key, hash).await) });
            }
            let Some(done) = checks.join_next().await else { break };
            let (i, proven) =
                done.map_err(|e| ServiceError::Internal(format!("a leak check panicked: {e}")))?;
            let Some(stored) = stored_of.remove(&i) else { continue };
            let found = match proven {
                Ok(true) => Match::Key(stored.id),
                Ok(false) => Match::None,
                Err(e) => {
                    failure = Some(e);
                    continue;
                }
            };
            match self.act(channel, &tokens[i], found).await {
                Ok(f) => findings[i] = Some(f),
                Err(e) => failure = Some(e),
            }
        }
        if let Some(e) = failure {
            return Err(e);
        }
        // Repeats take their first's finding.
        for (i, t) in tokens.iter().enumerate() {
            if findings[i].is_none()
                && let Some(&first) = first_of.get(t.token.as_str())
            {
                findings[i] = findings[first].clone();
            }
        }
        let findings: Vec<Finding> = findings.into_iter().flatten().collect();
        if findings.len() != tokens.len() {
            return Err(ServiceError::Internal("a reported token was left unjudged".into()));
        }
        for f in &findings {
            self.metrics.leak_tokens.get_or_create(&LeakLabels { label: f.label.as_str() }).inc();
        }
        Ok(findings)
    }

    /// Everything short of scrypt: the format and checksum, an operator
    /// token's digest, this replica's cache, the stored row by prefix.
    async fn identify_cheaply(&self, token: &str) -> Result<Cheap, ServiceError> {
        if OperatorSecret::looks_like(token.as_bytes()) {
            let Ok(secret) = OperatorSecret::parse(token) else { return Ok(Cheap::Judged(Match::None)) };
            let Some(stored) = self.store.find_operator_by_prefix(&secret.lookup_prefix()).await? else {
                return Ok(Cheap::Judged(Match::None));
            };
            let proven = self.access.digester().matches(&secret, &stored.pepper, &stored.digest);
            return Ok(Cheap::Judged(if proven { Match::Operator(stored) } else { Match::None }));
        }
        let Ok(key) = PlainKey::parse(&self.prefix, token) else { return Ok(Cheap::Judged(Match::None)) };
        if let Some(cache) = &self.cache
            && let Some(key_id) = cache.identity(&cache.digest(&key))
        {
            return Ok(Cheap::Judged(Match::Key(key_id.to_string())));
        }
        match self.store.find_by_prefix(key.lookup_prefix().as_str()).await? {
            None => Ok(Cheap::Judged(Match::None)),
            Some(stored) => Ok(Cheap::NeedsScrypt(key, Box::new(stored))),
        }
    }

    /// Revokes what `found` names and says how the token is labelled.
    async fn act(
        &self,
        channel: Channel<'_>,
        reported: &Reported,
        found: Match,
    ) -> Result<Finding, ServiceError> {
        let token_hash = token_hash(&reported.token);
        let now = self.clock.now();
        let reason = reason(reported);
        match found {
            Match::None => Ok(Finding { token_hash, label: Label::FalsePositive, key: None }),
            Match::Operator(token) => {
                let mut audit = AuditRecord::new(AuditKind::OperatorTokenRevoked, now, current_trace_id());
                audit.actor = Some(channel.actor().to_owned());
                audit.detail = Some(format!("operator token {}; reason: {reason}", token.id));
                if token.revoked_at.is_none() {
                    self.store.revoke_operator(&token.id, now, audit).await?;
                    tracing::warn!(token_id = %token.id, source = %reported.source, "leaked operator token revoked");
                }
                Ok(Finding { token_hash, label: Label::TruePositive, key: None })
            }
            Match::Key(key_id) => {
                let actor = channel.actor();
                let partner_reason = clip(
                    &format!("{reason} (rotation partner of leaked key {key_id})"),
                    validate::MAX_REASON,
                );
                let why = Why { actor, reported, reason: &reason, partner_reason: &partner_reason, now };
                let record = |key: &StoredKey, role: LeakRevocation| self.record(key, role, &why);
                let leaked = self.store.revoke_leaked(&key_id, &reason, &partner_reason, now, record).await?;
                let key = match leaked {
                    Leaked::NotFound => {
                        return Ok(Finding { token_hash, label: Label::FalsePositive, key: None });
                    }
                    Leaked::AlreadyRevoked(key) => key,
                    Leaked::Revoked { key, partners } => {
                        for changed in std::iter::once(&key).chain(&partners) {
                            self.events.emit(KeyEvent::Revoked { key: key_ref(changed), at: now }).await;
                        }
                        let partners: Vec<&str> = partners.iter().map(|p| p.id.as_str()).collect();
                        tracing::warn!(merchant_id = %key.merchant_id, key_id = %key.id, ?partners, actor, source = %reported.source, "leaked key revoked");
                        key
                    }
                };
                Ok(Finding { token_hash, label: Label::TruePositive, key: Some((key.merchant_id, key.id)) })
            }
        }
    }

    /// The audit row and event of one key a leak revoked.
    fn record(
        &self,
        key: &StoredKey,
        role: LeakRevocation,
        why: &Why<'_>,
    ) -> (AuditRecord, crate::store::events::NewEvent) {
        let Why { actor, reported, reason, partner_reason, now } = *why;
        let trace = current_trace_id();
        match role {
            LeakRevocation::Reported => (
                AuditRecord::admin(
                    AuditKind::KeyLeaked,
                    now,
                    actor,
                    &key.merchant_id,
                    &key.id,
                    Some(&key.name),
                    trace,
                )
                .with_detail(format!("{reason}; label: {}", Label::TruePositive.as_str())),
                self.outbox.event(
                    EventType::Leaked,
                    KeyFacts::of(key),
                    actor,
                    now,
                    event_fields!(
                        "source" => reported.source.clone(),
                        "url" => reported.url.clone(),
                        "label" => Label::TruePositive.as_str(),
                        "reason" => reason,
                    ),
                    None,
                ),
            ),
            LeakRevocation::Partner => {
                let why = partner_reason;
                (
                    AuditRecord::admin(
                        AuditKind::KeyRevoked,
                        now,
                        actor,
                        &key.merchant_id,
                        &key.id,
                        Some(&key.name),
                        trace,
                    )
                    .with_detail(format!("reason: {why}")),
                    self.outbox.event(
                        EventType::Revoked,
                        KeyFacts::of(key),
                        actor,
                        now,
                        event_fields!("reason" => why),
                        None,
                    ),
                )
            }
        }
    }
}

/// Who revoked a leaked key and why, for the rows written about it.
#[derive(Clone, Copy)]
struct Why<'a> {
    actor: &'a str,
    reported: &'a Reported,
    reason: &'a str,
    partner_reason: &'a str,
    now: DateTime<Utc>,
}

/// What the cheap checks left.
enum Cheap {
    Judged(Match),
    NeedsScrypt(PlainKey, Box<StoredKey>),
}

/// Proves `key` against `hash` on the pool's later lane, waiting for room
/// when the lane is full.
async fn prove(
    pool: HashPool,
    hasher: KeyHasher,
    key: PlainKey,
    hash: crate::keys::KeyHash,
) -> Result<bool, ServiceError> {
    let deadline = tokio::time::Instant::now() + POOL_PATIENCE;
    loop {
        let (hasher, key, hash) = (hasher.clone(), key.clone(), hash.clone());
        match pool.run_in(Lane::Later, move || hasher.verify(&key, &hash)).await {
            Ok(Ok(proven)) => return Ok(proven),
            Ok(Err(unknown)) => {
                return Err(ServiceError::Unavailable(format!("a reported key's hash needs {unknown}")));
            }
            Err(PoolError::Busy) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => return Err(ServiceError::Overloaded(e.to_string())),
        }
    }
}

/// `leaked: <source> <url>`, as the key's revoke reason.
fn reason(r: &Reported) -> String {
    let mut reason = String::from("leaked:");
    for part in [r.source.as_str(), r.url.as_str()] {
        if !part.is_empty() {
            reason.push(' ');
            reason.push_str(part);
        }
    }
    clip(&reason, validate::MAX_REASON)
}

/// At most `max` characters of `s`, control characters dropped.
fn clip(s: &str, max: usize) -> String {
    s.chars().filter(|c| !c.is_control()).take(max).collect()
}

/// Lowercase hex SHA-256.
pub fn token_hash(token: &str) -> String {
    Sha256::digest(token.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_named_by_its_sha256_in_lowercase_hex() {
        assert_eq!(token_hash("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    #[test]
    fn the_reason_names_source_and_url_bounded_and_without_control_characters() {
        let r = |source: &str, url: &str| Reported {
            token: String::new(),
            source: source.into(),
            url: url.into(),
        };
        assert_eq!(
            reason(&r("content", "https://github.com/o/r/blob/x")),
            "leaked: content https://github.com/o/r/blob/x"
        );
        assert_eq!(reason(&r("", "")), "leaked:");
        assert_eq!(reason(&r("a\nb", "")), "leaked: ab");
        assert_eq!(reason(&r("s", &"u".repeat(5_000))).chars().count(), validate::MAX_REASON);
    }
}
