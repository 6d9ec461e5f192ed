//! KeyAdmin use cases: create, read, list, update, revoke, regenerate, usage,
//! audit trail and the scope catalogue. Every call is scoped by merchant;
//! every change is written with its audit row in one transaction and then
//! emitted once as a [`KeyEvent`] to every sink ([`super::events`]), so
//! verification caches drop what they knew about the key.

use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use uuid::Uuid;

use super::{
    Deps, ServiceError,
    access::{Access, Principal},
    hash_pool::HashPool,
    page::{self, Page},
    validate::{self, Violations},
};
use crate::{
    audit::{AuditKind, AuditRecord},
    clock::{self, DbClock},
    keys::{
        AllowList, Credits, KeyHasher, KeyPrefix, KeyStatus, PlainKey, RateLimit, RateLimits, RefillInterval,
        ScopeCatalogue,
        cidr::CidrError,
        events::{KeyEvent, KeyRef},
        operator::AdminAction,
    },
    store::{
        Store,
        audit::AuditQuery,
        keys::{Change, InsertError, KeyChanges, NewKey, Rotation, StoredKey},
        usage::UsageDelta,
    },
    telemetry::current_trace_id,
    usage::UsageTracker,
};

use super::events::KeyEvents;

/// Longest grace period RegenerateKey accepts.
pub const MAX_GRACE: Duration = Duration::days(7);
/// Attempts at a fresh key when a lookup prefix collides (vanishingly rare).
const INSERT_ATTEMPTS: usize = 3;

/// A stored key as an event names it.
fn key_ref(key: &StoredKey) -> KeyRef {
    KeyRef { key_id: key.id.as_str().into(), merchant_id: key.merchant_id.clone(), version: key.version }
}

/// A key as an administrator sees it, usage included.
#[derive(Debug, Clone)]
pub struct KeyView {
    pub key: StoredKey,
    pub status: KeyStatus,
}

#[derive(Debug)]
pub struct CreateKey {
    pub merchant_id: String,
    pub name: String,
    pub scopes: Vec<String>,
    pub preset: String,
    pub expires_at: Option<DateTime<Utc>>,
    pub allowed_cidrs: Vec<String>,
    pub rate_limits: Vec<RateLimit>,
    pub credits: Option<CreditsRequest>,
}

/// Credits as a request gives them, before validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreditsRequest {
    pub remaining: i64,
    /// `(amount, interval)`; `None` for an interval left unspecified.
    pub refill: Option<(i64, Option<RefillInterval>)>,
}

#[derive(Debug)]
pub struct UpdateKey {
    pub merchant_id: String,
    pub key_id: String,
    pub name: String,
    pub scopes: Vec<String>,
    pub allowed_cidrs: Vec<String>,
    pub expires_at: Option<DateTime<Utc>>,
    pub rate_limits: Vec<RateLimit>,
    pub credits: Option<CreditsRequest>,
    pub paths: Vec<String>,
}

#[derive(Debug)]
pub struct AuditFilter {
    /// Empty with `unattributed`.
    pub merchant_id: String,
    /// The rows of no merchant instead of one merchant's (ADMIN only).
    pub unattributed: bool,
    pub api_key_id: String,
    pub start: Option<DateTime<Utc>>,
    pub end: Option<DateTime<Utc>>,
    pub page_size: i32,
    pub page_token: String,
}

#[derive(Debug)]
pub struct Issued {
    pub key: KeyView,
    pub plaintext: PlainKey,
}

#[derive(Debug)]
pub struct Regenerated {
    pub key: KeyView,
    pub plaintext: PlainKey,
    pub previous: KeyView,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub last_used_at: Option<DateTime<Utc>>,
    pub request_count: i64,
    pub denied_count: i64,
}

#[derive(Debug)]
pub struct KeyManager {
    store: Store,
    hasher: KeyHasher,
    pool: HashPool,
    catalogue: Arc<ScopeCatalogue>,
    prefix: KeyPrefix,
    usage: Arc<UsageTracker>,
    /// Every sink of committed key changes (this replica's cache, the
    /// fleet's warm-start map).
    events: KeyEvents,
    access: Arc<Access>,
    clock: Arc<DbClock>,
}

impl KeyManager {
    /// `events` hear of every change once it has committed; `access`
    /// decides what each caller may do.
    pub fn new(deps: Deps, events: KeyEvents, access: Arc<Access>) -> Self {
        let Deps { store, hasher, pool, catalogue, prefix, usage, clock } = deps;
        Self { store, hasher, pool, catalogue, prefix, usage, events, access, clock }
    }

    pub fn catalogue(&self, who: &Principal) -> Result<&ScopeCatalogue, ServiceError> {
        self.access.authorize(who, AdminAction::ListScopes, None)?;
        Ok(&self.catalogue)
    }

    /// A fresh key and its hash, hashed on the pool.
    async fn issue(&self) -> Result<(PlainKey, crate::keys::KeyHash), ServiceError> {
        let plaintext = PlainKey::generate(&self.prefix)?;
        let hasher = self.hasher.clone();
        let key = plaintext.clone();
        let hash = self.pool.run(move || hasher.hash(&key)).await??;
        Ok((plaintext, hash))
    }

    pub async fn create(&self, who: &Principal, req: CreateKey) -> Result<Issued, ServiceError> {
        self.access.authorize(who, AdminAction::CreateKey, Some(&req.merchant_id))?;
        let now = self.clock.now();
        let mut v = Violations::default();
        v.check("merchant_id", validate::merchant_id(&req.merchant_id));
        v.check("name", validate::text(&req.name, validate::MAX_NAME, true));
        let scopes = match (req.scopes.is_empty(), req.preset.is_empty()) {
            (false, false) => {
                v.add("preset", "give either scopes or a preset, not both");
                None
            }
            (true, false) => match self.catalogue.preset(&req.preset) {
                Some(preset) => Some(preset.scopes),
                None => {
                    v.add(
                        "preset",
                        format!(
                            "unknown preset {}; valid presets are: {}",
                            validate::excerpt(&req.preset, validate::MAX_EXCERPT),
                            self.catalogue.preset_names()
                        ),
                    );
                    None
                }
            },
            _ => match self.catalogue.parse_grant(&req.scopes) {
                Ok(set) => Some(set),
                Err(e) => {
                    v.add("scopes", e.to_string());
                    None
                }
            },
        };
        check_expiry(&mut v, req.expires_at, now);
        let allowed = parse_cidrs(&mut v, &req.allowed_cidrs);
        let limits = parse_limits(&mut v, req.rate_limits);
        let credits = parse_credits(&mut v, req.credits);
        v.into_result()?;
        let (Some(scopes), Some(allowed), Some(limits), Some(credits)) = (scopes, allowed, limits, credits)
        else {
            return Err(ServiceError::Internal("validation passed without values".into()));
        };
        let scope_names = self.catalogue.names(scopes);
        for _ in 0..INSERT_ATTEMPTS {
            let (plaintext, hash) = self.issue().await?;
            let key_id = new_key_id();
            let mut detail = describe_policy(&scope_names, &allowed.canonical(), &limits, req.expires_at);
            if let Some(c) = &credits {
                detail.push_str(&format!("; credits: {}", describe_credits(Some(c))));
            }
            let audit = AuditRecord::admin(
                AuditKind::KeyCreated,
                now,
                &who.actor,
                &req.merchant_id,
                &key_id,
                Some(&req.name),
                current_trace_id(),
            )
            .with_detail(detail);
            let new = NewKey {
                id: key_id,
                merchant_id: req.merchant_id.clone(),
                name: req.name.clone(),
                prefix: plaintext.lookup_prefix().as_str().to_owned(),
                hash,
                scopes: scope_names.clone(),
                allowed_cidrs: allowed.canonical(),
                rate_limits: limits.clone(),
                credits,
                expires_at: req.expires_at.map(clock::stored),
                created_at: now,
                created_by: who.actor.clone(),
            };
            match self.store.insert_key(new, audit).await {
                Ok(key) => {
                    self.events.emit(KeyEvent::Created { key: key_ref(&key), at: now }).await;
                    tracing::info!(actor = %who.actor, merchant_id = %key.merchant_id, key_id = %key.id, prefix = %key.prefix, "key created");
                    return Ok(Issued { key: view(key, UsageDelta::default(), now), plaintext });
                }
                Err(InsertError::PrefixTaken) => continue,
                Err(InsertError::Store(e)) => return Err(e.into()),
            }
        }
        Err(ServiceError::Internal("could not find a free lookup prefix".into()))
    }

    pub async fn get(
        &self,
        who: &Principal,
        merchant_id: &str,
        key_id: &str,
    ) -> Result<KeyView, ServiceError> {
        self.access.authorize(who, AdminAction::GetKey, Some(merchant_id))?;
        self.read(merchant_id, key_id).await
    }

    /// A key with its unflushed usage, for a caller already authorized.
    async fn read(&self, merchant_id: &str, key_id: &str) -> Result<KeyView, ServiceError> {
        check_ids(merchant_id, key_id)?;
        let _pause = self.usage.pause_flush().await?;
        let key = self.store.get_key(merchant_id, key_id).await?.ok_or(ServiceError::NotFound("key"))?;
        let pending = self.usage.pending(&key.id);
        Ok(view(key, pending, self.clock.now()))
    }

    pub async fn list(
        &self,
        who: &Principal,
        merchant_id: &str,
        page_size: i32,
        page_token: &str,
        include_revoked: bool,
    ) -> Result<Page<KeyView>, ServiceError> {
        self.access.authorize(who, AdminAction::ListKeys, Some(merchant_id))?;
        let mut v = Violations::default();
        v.check("merchant_id", validate::merchant_id(merchant_id));
        v.into_result()?;
        let now = self.clock.now();
        let _pause = self.usage.pause_flush().await?;
        let page = page::keyset(
            page_size,
            page_token,
            |after, limit| self.store.list_keys(merchant_id, include_revoked, now, after, limit),
            |k: &StoredKey| (k.created_at, &k.id),
        )
        .await?;
        Ok(page.map(|k| {
            let pending = self.usage.pending(&k.id);
            view(k, pending, now)
        }))
    }

    pub async fn update(&self, who: &Principal, req: UpdateKey) -> Result<KeyView, ServiceError> {
        self.access.authorize(who, AdminAction::UpdateKey, Some(&req.merchant_id))?;
        check_ids(&req.merchant_id, &req.key_id)?;
        let now = self.clock.now();
        let mut v = Violations::default();
        let mut changes = KeyChanges::default();
        if req.paths.is_empty() {
            v.add("update_mask", format!("name at least one of: {UPDATE_PATHS}"));
        }
        // Each path once, and no more paths than there are: the work below
        // stays bounded whatever the mask holds.
        let repeated = req.paths.len() > UPDATE_PATH_COUNT || {
            let mut distinct: Vec<&str> = req.paths.iter().map(String::as_str).collect();
            distinct.sort_unstable();
            distinct.dedup();
            distinct.len() != req.paths.len()
        };
        if repeated {
            return Err(ServiceError::invalid(
                "update_mask",
                format!("name each path at most once, from: {UPDATE_PATHS}"),
            ));
        }
        for path in &req.paths {
            match path.as_str() {
                "name" => {
                    v.check("name", validate::text(&req.name, validate::MAX_NAME, true));
                    changes.name = Some(req.name.clone());
                }
                "scopes" => match self.catalogue.parse_grant(&req.scopes) {
                    Ok(set) => changes.scopes = Some(self.catalogue.names(set)),
                    Err(e) => v.add("scopes", format!("{e} (a key cannot have its scopes cleared)")),
                },
                "allowed_cidrs" => {
                    changes.allowed_cidrs = parse_cidrs(&mut v, &req.allowed_cidrs).map(|l| l.canonical());
                }
                "expires_at" => {
                    check_expiry(&mut v, req.expires_at, now);
                    changes.expires_at = Some(req.expires_at.map(clock::stored));
                }
                "rate_limits" => changes.rate_limits = parse_limits(&mut v, req.rate_limits.clone()),
                "credits" => changes.credits = parse_credits(&mut v, req.credits),
                other => v.add(
                    "update_mask",
                    format!(
                        "unknown path {}; paths are: {UPDATE_PATHS}",
                        validate::excerpt(other, validate::MAX_EXCERPT)
                    ),
                ),
            }
        }
        v.into_result()?;
        let audit = AuditRecord::admin(
            AuditKind::KeyUpdated,
            now,
            &who.actor,
            &req.merchant_id,
            &req.key_id,
            None,
            current_trace_id(),
        )
        .with_detail(describe_changes(&changes));
        if changes.credits.is_some() {
            // Spending this replica has recorded so far is taken from the
            // balance being replaced, not from the new one.
            self.usage.flush().await?;
        }
        let _pause = self.usage.pause_flush().await?;
        match self.store.update_key(&req.merchant_id, &req.key_id, &changes, now, audit).await? {
            Change::Applied(key) => {
                self.events.emit(KeyEvent::Updated { key: key_ref(&key), at: now }).await;
                tracing::info!(actor = %who.actor, merchant_id = %key.merchant_id, key_id = %key.id, paths = ?req.paths, "key updated");
                Ok(self.committed(key, now))
            }
            Change::NotFound => Err(ServiceError::NotFound("key")),
            Change::Refused(key) => Err(refusal(&key, now, "updated")),
        }
    }

    pub async fn revoke(
        &self,
        who: &Principal,
        merchant_id: &str,
        key_id: &str,
        reason: &str,
    ) -> Result<KeyView, ServiceError> {
        self.access.authorize(who, AdminAction::RevokeKey, Some(merchant_id))?;
        check_ids(merchant_id, key_id)?;
        let mut v = Violations::default();
        v.check("reason", validate::text(reason, validate::MAX_REASON, false));
        v.into_result()?;
        let now = self.clock.now();
        let reason = (!reason.is_empty()).then_some(reason);
        let mut audit = AuditRecord::admin(
            AuditKind::KeyRevoked,
            now,
            &who.actor,
            merchant_id,
            key_id,
            None,
            current_trace_id(),
        );
        if let Some(reason) = reason {
            audit = audit.with_detail(format!("reason: {reason}"));
        }
        let _pause = self.usage.pause_flush().await?;
        match self.store.revoke_key(merchant_id, key_id, reason, now, audit).await? {
            Change::Applied(key) => {
                self.events.emit(KeyEvent::Revoked { key: key_ref(&key), at: now }).await;
                tracing::info!(actor = %who.actor, merchant_id, key_id, "key revoked");
                Ok(self.committed(key, now))
            }
            // Revoking twice is a no-op that answers with the revoked key.
            Change::Refused(key) => Ok(self.committed(key, now)),
            Change::NotFound => Err(ServiceError::NotFound("key")),
        }
    }

    pub async fn regenerate(
        &self,
        who: &Principal,
        merchant_id: &str,
        key_id: &str,
        grace: Option<Duration>,
    ) -> Result<Regenerated, ServiceError> {
        self.access.authorize(who, AdminAction::RegenerateKey, Some(merchant_id))?;
        check_ids(merchant_id, key_id)?;
        let grace = grace.unwrap_or_else(Duration::zero);
        if grace < Duration::zero() || grace > MAX_GRACE {
            return Err(ServiceError::invalid("grace_period", "must be between 0 and 7 days"));
        }
        for _ in 0..INSERT_ATTEMPTS {
            let (plaintext, hash) = self.issue().await?;
            let now = self.clock.now();
            let successor_id = new_key_id();
            let revoke_at = clock::stored(now + grace);
            let actor_name = who.actor.clone();
            let trace = current_trace_id();
            let prefix = plaintext.lookup_prefix().as_str().to_owned();
            let new_id = successor_id.clone();
            let _pause = self.usage.pause_flush().await?;
            let result = self
                .store
                .regenerate_key(merchant_id, key_id, &successor_id, revoke_at, now, move |old| {
                    // The successor keeps the old key's lifetime, not its end date.
                    let expires_at = old.expires_at.map(|e| clock::stored(now + (e - old.created_at)));
                    let new = NewKey {
                        id: new_id.clone(),
                        merchant_id: old.merchant_id.clone(),
                        name: old.name.clone(),
                        prefix,
                        hash,
                        scopes: old.scopes.clone(),
                        allowed_cidrs: old.allowed_cidrs.clone(),
                        rate_limits: old.rate_limits.clone(),
                        // The successor carries on with the stored balance.
                        credits: old.credits,
                        expires_at,
                        created_at: now,
                        created_by: actor_name.clone(),
                    };
                    let detail = if grace > Duration::zero() {
                        format!("replaced by {new_id}; old key verifies until {}", revoke_at.to_rfc3339())
                    } else {
                        format!("replaced by {new_id}")
                    };
                    let audits = vec![
                        AuditRecord::admin(
                            AuditKind::KeyRegenerated,
                            now,
                            &actor_name,
                            &old.merchant_id,
                            &old.id,
                            Some(&old.name),
                            trace.clone(),
                        )
                        .with_detail(detail),
                        AuditRecord::admin(
                            AuditKind::KeyCreated,
                            now,
                            &actor_name,
                            &old.merchant_id,
                            &new_id,
                            Some(&old.name),
                            trace.clone(),
                        )
                        .with_detail(format!(
                            "regenerated from {}; {}",
                            old.id,
                            describe_policy(&old.scopes, &old.allowed_cidrs, &old.rate_limits, expires_at)
                        )),
                    ];
                    (new, audits)
                })
                .await;
            return match result {
                Ok(Rotation::Applied { old, new }) => {
                    let event = KeyEvent::Regenerated {
                        key: key_ref(&new),
                        previous: key_ref(&old),
                        previous_until: revoke_at,
                        at: now,
                    };
                    self.events.emit(event).await;
                    tracing::info!(actor = %who.actor, merchant_id, key_id, successor = %new.id, grace_secs = grace.num_seconds(), "key regenerated");
                    Ok(Regenerated {
                        key: view(*new, UsageDelta::default(), now),
                        plaintext,
                        previous: self.committed(old, now),
                    })
                }
                Ok(Rotation::NotFound) => Err(ServiceError::NotFound("key")),
                Ok(Rotation::Refused(old)) => Err(refusal(&old, now, "regenerated")),
                Err(InsertError::PrefixTaken) => continue,
                Err(InsertError::Store(e)) => Err(e.into()),
            };
        }
        Err(ServiceError::Internal("could not find a free lookup prefix".into()))
    }

    pub async fn usage(
        &self,
        who: &Principal,
        merchant_id: &str,
        key_id: &str,
    ) -> Result<Usage, ServiceError> {
        self.access.authorize(who, AdminAction::GetKeyUsage, Some(merchant_id))?;
        let key = self.read(merchant_id, key_id).await?.key;
        Ok(Usage {
            last_used_at: key.last_used_at,
            request_count: key.request_count,
            denied_count: key.denied_count,
        })
    }

    pub async fn audit_events(
        &self,
        who: &Principal,
        filter: AuditFilter,
    ) -> Result<Page<AuditRecord>, ServiceError> {
        if filter.unattributed {
            self.access.authorize_unattributed(who, AdminAction::ListAuditEvents)?;
        } else {
            self.access.authorize(who, AdminAction::ListAuditEvents, Some(&filter.merchant_id))?;
        }
        let mut v = Violations::default();
        match (filter.unattributed, filter.merchant_id.is_empty()) {
            (true, true) => {}
            (true, false) => v.add("merchant_id", "must be empty with unattributed"),
            (false, _) => v.check("merchant_id", validate::merchant_id(&filter.merchant_id)),
        }
        if !filter.api_key_id.is_empty() {
            v.check("api_key_id", validate::key_id(&filter.api_key_id));
        }
        if let (Some(start), Some(end)) = (filter.start, filter.end)
            && start >= end
        {
            v.add("end_time", "must be after start_time");
        }
        v.into_result()?;
        let query = AuditQuery {
            merchant_id: (!filter.unattributed).then_some(filter.merchant_id.as_str()),
            api_key_id: (!filter.api_key_id.is_empty()).then_some(filter.api_key_id.as_str()),
            start: filter.start,
            end: filter.end,
        };
        page::keyset(
            filter.page_size,
            &filter.page_token,
            |after, limit| self.store.list_audit(&query, after, limit),
            |r| (r.timestamp, &r.id),
        )
        .await
    }

    /// A key as its transaction committed it, with the usage this replica
    /// has not flushed yet. Built from the transaction's own result, never
    /// from a read after the commit that could fail once the change is
    /// made; the caller holds the flush paused across the transaction, so
    /// the two parts count each use once.
    fn committed(&self, key: StoredKey, now: DateTime<Utc>) -> KeyView {
        let pending = self.usage.pending(&key.id);
        view(key, pending, now)
    }
}

fn new_key_id() -> String {
    Uuid::now_v7().to_string()
}

fn check_ids(merchant_id: &str, key_id: &str) -> Result<(), ServiceError> {
    let mut v = Violations::default();
    v.check("merchant_id", validate::merchant_id(merchant_id));
    v.check("key_id", validate::key_id(key_id));
    v.into_result()
}

fn check_expiry(v: &mut Violations, expires_at: Option<DateTime<Utc>>, now: DateTime<Utc>) {
    if expires_at.is_some_and(|at| at <= now) {
        v.add("expires_at", "must be in the future");
    }
}

fn parse_cidrs(v: &mut Violations, entries: &[String]) -> Option<AllowList> {
    match AllowList::parse(entries) {
        Ok(list) => Some(list),
        Err(e) => {
            let field = match e.index() {
                Some(i) => format!("allowed_cidrs[{i}]"),
                None => "allowed_cidrs".to_owned(),
            };
            let hint = match e {
                CidrError::Syntax { .. } => " (use an IP such as 203.0.113.7 or a range such as 10.0.0.0/8)",
                _ => "",
            };
            v.add(field, format!("{e}{hint}"));
            None
        }
    }
}

/// Applies unflushed usage and derives the status.
fn view(mut key: StoredKey, pending: UsageDelta, now: DateTime<Utc>) -> KeyView {
    key.request_count += pending.allowed;
    key.denied_count += pending.denied;
    key.last_used_at = key.last_used_at.max(pending.last_used_at);
    if let Some(credits) = &mut key.credits {
        credits.remaining -= pending.spent;
    }
    let status = KeyStatus::at(key.revoked_at, key.expires_at, now);
    KeyView { key, status }
}

fn refusal(key: &StoredKey, now: DateTime<Utc>, verb: &str) -> ServiceError {
    match KeyStatus::at(key.revoked_at, key.expires_at, now) {
        KeyStatus::Revoked => {
            ServiceError::FailedPrecondition(format!("key {} is revoked and cannot be {verb}", key.id))
        }
        _ => ServiceError::FailedPrecondition(format!(
            "key {} is being rotated (replaced by {}) and cannot be {verb}; revoke it or change its successor",
            key.id,
            key.replaced_by_key_id.as_deref().unwrap_or("another key")
        )),
    }
}

fn describe_policy(
    scopes: &[String],
    cidrs: &[String],
    limits: &RateLimits,
    expires_at: Option<DateTime<Utc>>,
) -> String {
    let mut detail = format!(
        "scopes: {}; allowed_cidrs: {}; expires_at: {}",
        scopes.join(","),
        if cidrs.is_empty() { "any".to_owned() } else { cidrs.join(",") },
        expires_at.map_or_else(|| "never".to_owned(), |e| e.to_rfc3339()),
    );
    if !limits.is_empty() {
        detail.push_str(&format!("; rate_limits: {}", describe_limits(limits)));
    }
    detail
}

/// `name=limit/window_ms,…` or `none`.
fn describe_limits(limits: &RateLimits) -> String {
    if limits.is_empty() { "none".to_owned() } else { limits.to_stored().replace(' ', ",") }
}

/// The paths UpdateKey's mask may name.
const UPDATE_PATHS: &str = "name, scopes, allowed_cidrs, expires_at, rate_limits, credits";
/// How many paths [`UPDATE_PATHS`] lists.
const UPDATE_PATH_COUNT: usize = 6;

/// Validated credits: `Some(None)` for none given (unlimited), `None` when
/// a field is bad (named in `v`).
fn parse_credits(v: &mut Violations, credits: Option<CreditsRequest>) -> Option<Option<Credits>> {
    let Some(c) = credits else { return Some(None) };
    match Credits::new(c.remaining, c.refill) {
        Ok(credits) => Some(Some(credits)),
        Err(errors) => {
            for e in errors {
                v.add(e.field, e.problem);
            }
            None
        }
    }
}

/// `remaining` and its refill, or `unlimited`.
fn describe_credits(c: Option<&Credits>) -> String {
    match c {
        None => "unlimited".to_owned(),
        Some(Credits { remaining, refill: None }) => format!("{remaining}"),
        Some(Credits { remaining, refill: Some(r) }) => {
            format!("{remaining}, refilled to {} {}", r.amount, r.interval.as_str())
        }
    }
}

fn parse_limits(v: &mut Violations, limits: Vec<RateLimit>) -> Option<RateLimits> {
    match RateLimits::new(limits) {
        Ok(limits) => Some(limits),
        Err(errors) => {
            for e in errors {
                v.add(e.field, e.problem);
            }
            None
        }
    }
}

fn describe_changes(c: &KeyChanges) -> String {
    let mut parts = Vec::new();
    if let Some(name) = &c.name {
        parts.push(format!("name: {name}"));
    }
    if let Some(scopes) = &c.scopes {
        parts.push(format!("scopes: {}", scopes.join(",")));
    }
    if let Some(cidrs) = &c.allowed_cidrs {
        parts.push(format!(
            "allowed_cidrs: {}",
            if cidrs.is_empty() { "any".into() } else { cidrs.join(",") }
        ));
    }
    if let Some(limits) = &c.rate_limits {
        parts.push(format!("rate_limits: {}", describe_limits(limits)));
    }
    if let Some(credits) = &c.credits {
        parts.push(format!("credits: {}", describe_credits(credits.as_ref())));
    }
    if let Some(expires_at) = c.expires_at {
        parts.push(format!(
            "expires_at: {}",
            expires_at.map_or_else(|| "never".to_owned(), |e| e.to_rfc3339())
        ));
    }
    parts.join("; ")
}
