//! The KeyAdmin use cases that change a key: create, update, revoke and
//! regenerate. Each validates its request naming every bad field, writes
//! the change and its audit row in one transaction, and emits one
//! [`KeyEvent`] once it has committed.

use super::*;

impl KeyManager {
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
        let metadata = parse_metadata(&mut v, req.metadata);
        v.into_result()?;
        let (Some(scopes), Some(allowed), Some(limits), Some(credits), Some(metadata)) =
            (scopes, allowed, limits, credits, metadata)
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
            if !metadata.is_empty() {
                let names: Vec<&str> = metadata.iter().map(|(k, _)| k).collect();
                detail.push_str(&format!("; metadata: {}", names.join(",")));
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
                metadata: metadata.clone(),
                expires_at: req.expires_at.map(clock::stored),
                created_at: now,
                created_by: who.actor.clone(),
            };
            let event = self.outbox.event(
                EventType::Created,
                KeyFacts {
                    merchant_id: &new.merchant_id,
                    key_id: &new.id,
                    key_name: &new.name,
                    prefix: &new.prefix,
                    metadata: &new.metadata,
                },
                &who.actor,
                now,
                event_fields!(
                    "scopes" => new.scopes.clone(),
                    "expires_at" => new.expires_at.map(rfc3339),
                ),
                None,
            );
            match self.store.insert_key(new, audit, event).await {
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

    pub async fn update(&self, who: &Principal, mut req: UpdateKey) -> Result<KeyView, ServiceError> {
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
                "metadata" => changes.metadata = parse_metadata(&mut v, std::mem::take(&mut req.metadata)),
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
        let changed_fields = req.paths.clone();
        let event = |key: &StoredKey| {
            self.outbox.event(
                EventType::Updated,
                KeyFacts::of(key),
                &who.actor,
                now,
                event_fields!(
                    "changed_fields" => changed_fields,
                    "expires_at" => key.expires_at.map(rfc3339),
                ),
                None,
            )
        };
        match self.store.update_key(&req.merchant_id, &req.key_id, &changes, now, audit, event).await? {
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
        let reason = checked_reason(reason)?;
        let now = self.clock.now();
        let audit = reasoned_audit(AuditKind::KeyRevoked, now, who, merchant_id, key_id, reason);
        let _pause = self.usage.pause_flush().await?;
        let event = |key: &StoredKey| {
            self.outbox.event(
                EventType::Revoked,
                KeyFacts::of(key),
                &who.actor,
                now,
                event_fields!("reason" => reason),
                None,
            )
        };
        match self.store.revoke_key(merchant_id, key_id, reason, now, audit, event).await? {
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
            let outbox = self.outbox.clone();
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
                        metadata: old.metadata.clone(),
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
                    let event = outbox.event(
                        EventType::Regenerated,
                        KeyFacts::of(old),
                        &actor_name,
                        now,
                        event_fields!(
                            "successor_key_id" => new_id.clone(),
                            "grace_ends_at" => rfc3339(revoke_at),
                        ),
                        None,
                    );
                    (new, audits, event)
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
const UPDATE_PATHS: &str = "name, scopes, allowed_cidrs, expires_at, rate_limits, credits, metadata";
/// How many paths [`UPDATE_PATHS`] lists.
const UPDATE_PATH_COUNT: usize = 7;

/// Validated metadata, or `None` when an entry is bad (named in `v`).
fn parse_metadata(v: &mut Violations, entries: Vec<(String, String)>) -> Option<Metadata> {
    match Metadata::new(entries) {
        Ok(metadata) => Some(metadata),
        Err(errors) => {
            for e in errors {
                v.add(e.field, e.problem);
            }
            None
        }
    }
}

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
    if let Some(metadata) = &c.metadata {
        let names: Vec<&str> = metadata.iter().map(|(k, _)| k).collect();
        parts.push(format!("metadata: {}", if names.is_empty() { "none".into() } else { names.join(",") }));
    }
    if let Some(expires_at) = c.expires_at {
        parts.push(format!(
            "expires_at: {}",
            expires_at.map_or_else(|| "never".to_owned(), |e| e.to_rfc3339())
        ));
    }
    parts.join("; ")
}
