//! Who may do what on KeyAdmin.
//!
//! [`Access::authenticate`] turns a caller's credentials into a
//! [`Principal`]: an operator token (`kwop_…`, looked up by prefix and
//! compared as a keyed digest in constant time, on every call, so a
//! revocation holds on every replica at once), a bootstrap admin token
//! (break-glass), or, under mTLS, a client identity mapped to a role.
//! [`Access::authorize`] applies the role matrix and the merchant limit.
//!
//! Every refusal is audited with the actor, the RPC, the merchant asked for
//! and the peer, aggregated per peer and minute: the first refusal of a
//! kind is written at once, the rest of that minute as one summary row, so
//! a flood costs at most two rows per peer, kind and minute.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{ServiceError, validate};
use crate::{
    audit::{AuditKind, AuditRecord, writer::AuditQueue},
    clock::DbClock,
    config::{IdentityGrant, ThrottleSettings},
    keys::{
        identity::ClientIdentity,
        operator::{AdminAction, OperatorRole, OperatorSecret, OperatorToken, TokenDigester},
    },
    metrics::Metrics,
    store::Store,
    task::Task,
    telemetry::current_trace_id,
    throttle::GuessThrottle,
};

/// How often the summaries of refused KeyAdmin calls are written.
const REFUSAL_SWEEP: Duration = Duration::from_secs(10);

/// An authenticated KeyAdmin caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// What audit rows name: the token's name, or the client identity.
    pub actor: String,
    pub role: OperatorRole,
    /// Empty: every merchant.
    pub merchants: Vec<String>,
    /// The peer (identity, else address), for refusal rows.
    pub peer: Peer,
}

/// The other end of a call, as the transport saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Peer {
    /// The client certificate's identity under mTLS.
    pub identity: Option<ClientIdentity>,
    pub ip: Option<IpAddr>,
}

impl Peer {
    /// The identity, else the address, for logs and refusal rows.
    fn describe(&self) -> String {
        match (&self.identity, self.ip) {
            (Some(identity), _) => identity.as_str().to_owned(),
            (None, Some(ip)) => ip.to_string(),
            (None, None) => "unknown".to_owned(),
        }
    }
}

impl Principal {
    fn covers(&self, merchant: &str) -> bool {
        self.merchants.is_empty() || self.merchants.iter().any(|m| m == merchant)
    }
}

/// Credentials presented with one call.
#[derive(Debug, Default)]
pub struct Credentials<'a> {
    /// The bearer token, if an `authorization: Bearer` header was sent.
    pub bearer: Option<&'a [u8]>,
    pub peer: Peer,
}

/// Who a credential names (actor, role, merchants), or why it names nobody.
type Grant = Result<(String, OperatorRole, Vec<String>), &'static str>;

/// Most (peer, kind, …) refusal series itemised per minute; beyond it,
/// refusals are only counted into one row per minute.
const MAX_REFUSAL_SERIES: usize = 10_000;

#[derive(Debug)]
pub struct Access {
    store: Store,
    digester: TokenDigester,
    bootstrap: Vec<(String, [u8; 32])>,
    identities: Vec<IdentityGrant>,
    refusals: Refusals,
    /// Wrong operator tokens per client address (this listener's peers,
    /// apart from Verify's counts).
    guesses: GuessThrottle,
    metrics: Arc<Metrics>,
    clock: Arc<DbClock>,
}

impl Access {
    pub fn new(
        store: Store,
        digester: TokenDigester,
        bootstrap: &[(String, SecretString)],
        identities: Vec<IdentityGrant>,
        audit: AuditQueue,
        metrics: Arc<Metrics>,
        clock: Arc<DbClock>,
    ) -> Self {
        // Off until [`Access::throttling`] says otherwise.
        let guesses = GuessThrottle::new(ThrottleSettings {
            per_prefix: 0,
            per_ip: 0,
            window: Duration::from_secs(60),
        });
        let bootstrap =
            bootstrap.iter().map(|(n, t)| (n.clone(), sha256(t.expose_secret().as_bytes()))).collect();
        Self {
            store,
            digester,
            bootstrap,
            identities,
            refusals: Refusals::new(audit),
            guesses,
            metrics,
            clock,
        }
    }

    /// Counts wrong operator tokens per client address with `guesses`.
    pub fn throttling(mut self, guesses: GuessThrottle) -> Self {
        self.guesses = guesses;
        self
    }

    /// Now on the database's clock, on which operator tokens are revoked.
    pub fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    pub fn digester(&self) -> &TokenDigester {
        &self.digester
    }

    /// The principal behind `credentials`, or UNAUTHENTICATED (audited).
    pub async fn authenticate(
        &self,
        credentials: Credentials<'_>,
        action: AdminAction,
    ) -> Result<Principal, ServiceError> {
        let now = self.clock.now();
        let outcome = match credentials.bearer {
            Some(token) if OperatorSecret::looks_like(token) => {
                self.operator(token, &credentials.peer, now).await?
            }
            Some(token) => self.bootstrap_token(token),
            None => self.identity(credentials.peer.identity.as_ref()),
        };
        match outcome {
            Ok((actor, role, merchants)) => Ok(Principal { actor, role, merchants, peer: credentials.peer }),
            Err(why) => {
                self.metrics.admin_unauthenticated.inc();
                tracing::info!(
                    peer = %credentials.peer.describe(),
                    rpc = action.rpc(),
                    reason = why,
                    "KeyAdmin call unauthenticated"
                );
                self.refusals.record(
                    RefusalKey {
                        kind: AuditKind::AuthenticationFailed,
                        peer: credentials.peer,
                        actor: None,
                        rpc: action.rpc(),
                        merchant: None,
                        named: None,
                        why,
                    },
                    now,
                );
                Err(ServiceError::Unauthenticated(why.to_owned()))
            }
        }
    }

    /// The role matrix and the merchant limit; a refusal is
    /// PERMISSION_DENIED, audited, and changes nothing.
    pub fn authorize(
        &self,
        who: &Principal,
        action: AdminAction,
        merchant: Option<&str>,
    ) -> Result<(), ServiceError> {
        let (why, scope) = if !who.role.allows(action) {
            ("outside the caller's role", "")
        } else if merchant.is_some_and(|m| !who.covers(m)) {
            ("outside the caller's merchants", " for this merchant")
        } else {
            return Ok(());
        };
        self.refuse(who, action, merchant, why, scope)
    }

    /// A read across every merchant: the role must allow it, and the
    /// caller must have no merchant limit.
    pub fn authorize_all_merchants(&self, who: &Principal, action: AdminAction) -> Result<(), ServiceError> {
        self.authorize(who, action, None)?;
        if !who.merchants.is_empty() {
            let why = "every merchant's rows are for callers without a merchant limit";
            return self.refuse(who, action, None, why, " across every merchant");
        }
        Ok(())
    }

    /// Rows that belong to no merchant (rollups of garbage, failed
    /// authentications, operator tokens) are for ADMIN callers without a
    /// merchant limit.
    pub fn authorize_unattributed(&self, who: &Principal, action: AdminAction) -> Result<(), ServiceError> {
        if who.role != OperatorRole::Admin || !who.merchants.is_empty() {
            let why = "rows of no merchant are for unrestricted ADMIN callers";
            return self.refuse(who, action, None, why, " for rows of no merchant");
        }
        // An unrestricted ADMIN may call every RPC.
        Ok(())
    }

    fn refuse(
        &self,
        who: &Principal,
        action: AdminAction,
        merchant: Option<&str>,
        why: &'static str,
        scope: &str,
    ) -> Result<(), ServiceError> {
        self.metrics.admin_permission_denied.inc();
        // The merchant asked for is recorded only when it is a well-formed
        // id: the row stays bounded whatever the caller sends.
        let merchant = merchant.filter(|m| validate::merchant_id(m).is_ok()).map(str::to_owned);
        tracing::info!(actor = %who.actor, peer = %who.peer.describe(), rpc = action.rpc(), merchant_id = ?merchant, reason = why, "KeyAdmin call denied");
        // A refusal for a merchant the caller does not cover is no business
        // of that merchant's: it is a row of no merchant (which only an
        // unrestricted ADMIN lists), naming the merchant in its detail, so
        // that another tenant's operator names and addresses never reach
        // a merchant's trail.
        let (merchant, named) = match merchant {
            Some(m) if !who.covers(&m) => (None, Some(m)),
            covered => (covered, None),
        };
        self.refusals.record(
            RefusalKey {
                kind: AuditKind::AccessDenied,
                peer: who.peer.clone(),
                actor: Some(who.actor.clone()),
                rpc: action.rpc(),
                merchant,
                named,
                why,
            },
            self.clock.now(),
        );
        Err(ServiceError::PermissionDenied(format!(
            "{} may not call {}{scope}",
            who.role.as_str(),
            action.rpc()
        )))
    }

    /// Writes the summaries of refused calls every `REFUSAL_SWEEP`, as a
    /// background task.
    pub fn summaries(self: &Arc<Self>) -> Task {
        let access = Arc::clone(self);
        Task::helper("refusal summaries", move |stop| {
            let access = Arc::clone(&access);
            async move {
                tokio::pin!(stop);
                let mut ticker = tokio::time::interval(REFUSAL_SWEEP);
                loop {
                    tokio::select! {
                        () = &mut stop => return,
                        _ = ticker.tick() => access.sweep().await,
                    }
                }
            }
        })
    }

    /// Queues the summary rows of minutes that have ended.
    pub async fn sweep(&self) {
        self.refusals.queue_all(self.refusals.summaries(self.clock.now(), false)).await;
    }

    /// Queues every pending summary row (at shutdown, before the audit
    /// writer's final flush).
    pub async fn flush(&self) {
        self.refusals.queue_all(self.refusals.summaries(self.clock.now(), true)).await;
    }

    async fn operator(&self, token: &[u8], peer: &Peer, now: DateTime<Utc>) -> Result<Grant, ServiceError> {
        // Shape and checksum first: garbage never reaches the store.
        let Some(token) = std::str::from_utf8(token).ok().and_then(|t| OperatorSecret::parse(t).ok()) else {
            return Ok(Err("malformed operator token"));
        };
        // An unknown or wrong token is a wrong guess from its address,
        // counted before the read: made-up tokens cost a bounded number of
        // reads per address and window.
        let ip = peer.ip;
        let Ok(lookup) = self.guesses.admit_lookup(ip) else {
            return Ok(Err("too many failed attempts from this address; retry later"));
        };
        let stored = match self.store.find_operator_by_prefix(&token.lookup_prefix()).await {
            Ok(Some(stored)) => stored,
            Ok(None) => return Ok(Err("invalid credentials")),
            Err(e) => {
                self.guesses.uncount_lookup(lookup);
                return Err(e.into());
            }
        };
        if !self.digester.matches(&token, &stored.pepper, &stored.digest) {
            return Ok(Err("invalid credentials"));
        }
        self.guesses.uncount_lookup(lookup);
        if !self.digester.is_current(&stored.pepper) {
            self.move_to_current_pepper(&token, &stored);
        }
        if stored.revoked_at.is_some_and(|r| r <= now) {
            return Ok(Err("operator token revoked"));
        }
        if stored.expires_at.is_some_and(|e| e <= now) {
            return Ok(Err("operator token expired"));
        }
        Ok(Ok((stored.name, stored.role, stored.merchant_ids)))
    }

    /// Rewrites a token's digest under the current pepper, in the
    /// background: the call it authenticated does not wait, and a failure
    /// only means the rewrite is tried on the token's next use.
    fn move_to_current_pepper(&self, token: &OperatorSecret, stored: &OperatorToken) {
        let (pepper, digest) = self.digester.digest(token);
        let (store, id, checked) = (self.store.clone(), stored.id.clone(), stored.digest.clone());
        tokio::spawn(async move {
            match store.rewrite_operator_digest(&id, &checked, &pepper, &digest).await {
                Ok(_) => {
                    tracing::info!(token_id = %id, %pepper, "operator token moved to the current pepper")
                }
                Err(e) => {
                    tracing::warn!(error = %e, token_id = %id, "cannot move an operator token to the current pepper")
                }
            }
        });
    }

    fn bootstrap_token(&self, token: &[u8]) -> Grant {
        let presented = sha256(token);
        let mut found = None;
        // Every configured token is compared, match or not.
        for (name, expected) in &self.bootstrap {
            if bool::from(presented.ct_eq(expected)) && found.is_none() {
                found = Some(name.clone());
            }
        }
        found.map(|name| (name, OperatorRole::Admin, Vec::new())).ok_or("invalid credentials")
    }

    fn identity(&self, identity: Option<&ClientIdentity>) -> Grant {
        let Some(identity) = identity else {
            return Err("missing credentials: send `authorization: Bearer <operator token>`");
        };
        self.identities
            .iter()
            .find(|g| identity.matches(&g.identity))
            .map(|g| (g.identity.clone(), g.role, g.merchant_ids.clone()))
            .ok_or("the client certificate's identity is not an operator; send a bearer token")
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// One series of refusals within a minute.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct RefusalKey {
    kind: AuditKind,
    peer: Peer,
    actor: Option<String>,
    rpc: &'static str,
    /// The row's merchant: the one the call named, when the caller covers
    /// it.
    merchant: Option<String>,
    /// The merchant a call named outside the caller's merchants.
    named: Option<String>,
    why: &'static str,
}

impl RefusalKey {
    fn record(&self, at: DateTime<Utc>, detail: String) -> AuditRecord {
        let mut row = AuditRecord::new(self.kind, at, current_trace_id());
        row.actor = self.actor.clone();
        row.merchant_id = self.merchant.clone();
        row.endpoint = Some(format!("/keywarden.v1.KeyAdmin/{}", self.rpc));
        row.method = Some("POST".to_owned());
        row.ip = self.peer.ip;
        row.status = Some(if self.kind == AuditKind::AuthenticationFailed { 401 } else { 403 });
        let detail = match &self.named {
            Some(named) => format!("{detail}; named merchant {named}"),
            None => detail,
        };
        row.with_detail(detail)
    }
}

#[derive(Debug, Default)]
struct Window {
    minute: i64,
    counts: HashMap<RefusalKey, u64>,
    /// Refusals beyond [`MAX_REFUSAL_SERIES`] this minute.
    unitemised: u64,
}

#[derive(Debug)]
struct Refusals {
    queue: AuditQueue,
    window: Mutex<Window>,
}

fn minute_of(at: DateTime<Utc>) -> i64 {
    at.timestamp().div_euclid(60)
}

impl Refusals {
    fn new(queue: AuditQueue) -> Self {
        Self { queue, window: Mutex::new(Window::default()) }
    }

    fn record(&self, key: RefusalKey, now: DateTime<Utc>) {
        for row in self.summaries(now, false) {
            self.write(row);
        }
        let mut window = self.window.lock().unwrap_or_else(PoisonError::into_inner);
        window.minute = minute_of(now);
        let full = window.counts.len() >= MAX_REFUSAL_SERIES;
        match window.counts.get_mut(&key) {
            Some(count) => *count += 1,
            None if full => window.unitemised += 1,
            None => {
                let row = key.record(now, format!("peer: {}; {}", key.peer.describe(), key.why));
                window.counts.insert(key, 1);
                drop(window);
                self.write(row);
            }
        }
    }

    /// The summary rows of the repeats of a minute that has ended (or of
    /// the current one too, with `all`).
    fn summaries(&self, now: DateTime<Utc>, all: bool) -> Vec<AuditRecord> {
        let mut window = self.window.lock().unwrap_or_else(PoisonError::into_inner);
        if !all && window.minute == minute_of(now) {
            return Vec::new();
        }
        let start = DateTime::from_timestamp(window.minute * 60, 0).unwrap_or(now).to_rfc3339();
        let mut rows: Vec<AuditRecord> = std::mem::take(&mut window.counts)
            .into_iter()
            .filter(|(_, n)| *n > 1)
            .map(|(key, n)| {
                let detail = format!(
                    "peer: {}; {}; {} more in the minute from {start}",
                    key.peer.describe(),
                    key.why,
                    n - 1
                );
                key.record(now, detail)
            })
            .collect();
        if window.unitemised > 0 {
            let mut row = AuditRecord::new(AuditKind::AuthenticationFailed, now, None);
            row.detail = Some(format!(
                "{} further refusals from more than {MAX_REFUSAL_SERIES} peers in the minute from {start}",
                window.unitemised
            ));
            rows.push(row);
            window.unitemised = 0;
        }
        rows
    }

    async fn queue_all(&self, rows: Vec<AuditRecord>) {
        for row in rows {
            let _ = self.queue.push(row).await;
        }
    }

    /// Queues a row without making the refused caller wait for room. The
    /// row is queued before the refusal is answered, so whoever waits for
    /// the queue to drain after it sees the row.
    fn write(&self, row: AuditRecord) {
        self.queue.push_detached(row);
    }
}
