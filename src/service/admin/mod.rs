//! KeyAdmin use cases: create, read, list, update, revoke, regenerate, usage,
//! audit trail and the scope catalogue (the changes are in `change.rs`). Every call is scoped by merchant;
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
    event_fields,
    events::{EventType, KeyFacts, Outbox, rfc3339},
    keys::{
        AllowList, Credits, KeyHasher, KeyPrefix, KeyStatus, Metadata, PlainKey, RateLimit, RateLimits,
        RefillInterval, ScopeCatalogue, cidr::CidrError, events::KeyEvent, operator::AdminAction,
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

use super::events::{KeyEvents, key_ref};

mod change;
mod outbox;
mod state;

pub use outbox::{EventPage, NewWebhook, Webhooks};

/// Longest grace period RegenerateKey accepts.
pub const MAX_GRACE: Duration = Duration::days(7);
/// Attempts at a fresh key when a lookup prefix collides (vanishingly rare).
const INSERT_ATTEMPTS: usize = 3;

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
    pub metadata: Vec<(String, String)>,
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
    /// Replaces every entry, with the path `metadata`.
    pub metadata: Vec<(String, String)>,
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
    /// Builds the lifecycle event each change writes in its transaction.
    outbox: Outbox,
    webhooks: Webhooks,
}

impl KeyManager {
    /// `events` hear of every change once it has committed; `access`
    /// decides what each caller may do.
    pub fn new(
        deps: Deps,
        events: KeyEvents,
        access: Arc<Access>,
        outbox: Outbox,
        webhooks: Webhooks,
    ) -> Self {
        let Deps { store, hasher, pool, catalogue, prefix, usage, clock } = deps;
        Self { store, hasher, pool, catalogue, prefix, usage, events, access, clock, outbox, webhooks }
    }

    pub fn catalogue(&self, who: &Principal) -> Result<&ScopeCatalogue, ServiceError> {
        self.access.authorize(who, AdminAction::ListScopes, None)?;
        Ok(&self.catalogue)
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
            |r: &AuditRecord| (r.timestamp, &r.id),
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

/// A reason as a request gives it: checked, and `None` when empty.
fn checked_reason(reason: &str) -> Result<Option<&str>, ServiceError> {
    let mut v = Violations::default();
    v.check("reason", validate::text(reason, validate::MAX_REASON, false));
    v.into_result()?;
    Ok((!reason.is_empty()).then_some(reason))
}

/// The audit row of a change by `who` to a key, naming the reason given.
fn reasoned_audit(
    kind: AuditKind,
    now: DateTime<Utc>,
    who: &Principal,
    merchant_id: &str,
    key_id: &str,
    reason: Option<&str>,
) -> AuditRecord {
    let audit = AuditRecord::admin(kind, now, &who.actor, merchant_id, key_id, None, current_trace_id());
    match reason {
        Some(reason) => audit.with_detail(format!("reason: {reason}")),
        None => audit,
    }
}

fn check_ids(merchant_id: &str, key_id: &str) -> Result<(), ServiceError> {
    let mut v = Violations::default();
    v.check("merchant_id", validate::merchant_id(merchant_id));
    v.check("key_id", validate::key_id(key_id));
    v.into_result()
}

/// Applies unflushed usage and derives the status.
fn view(mut key: StoredKey, pending: UsageDelta, now: DateTime<Utc>) -> KeyView {
    key.request_count += pending.allowed;
    key.denied_count += pending.denied;
    key.last_used_at = key.last_used_at.max(pending.last_used_at);
    if let Some(credits) = &mut key.credits {
        credits.remaining -= pending.spent;
    }
    let status = KeyStatus::of(key.revoked_at, key.expires_at, key.disabled_at.is_some(), now);
    KeyView { key, status }
}
