//! Identification: whose key a presented plaintext is, if anyone's, and
//! that key's current state. Owns what it takes: the verification cache
//! and its freshness, the guessing throttle, Verify's lane to the store,
//! the scrypt pool, the fleet's warm-start map, and the rehash of keys
//! checked under an old pepper.

use std::{net::IpAddr, sync::Arc};

use chrono::{DateTime, Utc};

use crate::{
    cache::{
        IdentifyError, Owner, VerifyCache,
        changes::{Freshness, Trust},
    },
    fleet::WarmStart,
    keys::{
        AllowList, DenyReason, KeyHash, KeyHasher, KeyState, PlainKey, Policy, ScopeCatalogue,
        credits::Balance,
    },
    service::{
        ServiceError,
        hash_pool::{HashPool, Lane},
        rehash::Rehasher,
    },
    store::{Store, keys::StoredKey, lane::DbLane},
    throttle::GuessThrottle,
};

/// A future on the heap, for the cold paths kept out of the warm one's
/// state machine.
type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

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
        policy: Policy {
            revoked_at: key.revoked_at,
            expires_at: key.expires_at,
            disabled: key.disabled_at.is_some(),
            allowed,
            scopes,
        },
        metadata: key.metadata.clone(),
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
pub(super) struct Identifier {
    pub store: Store,
    pub hasher: KeyHasher,
    pub pool: HashPool,
    pub catalogue: Arc<ScopeCatalogue>,
    pub lane: DbLane,
    /// `None` runs scrypt on every call (for measuring the cold path).
    pub cache: Option<Arc<VerifyCache>>,
    pub freshness: Arc<Freshness>,
    pub throttle: Arc<GuessThrottle>,
    pub rehasher: Arc<Rehasher>,
    pub warm: Option<Arc<WarmStart>>,
}

impl Identifier {
    /// The key's current state if it exists and the secret matches;
    /// NOT_FOUND for an unknown prefix or a wrong secret (indistinguishable
    /// by design), THROTTLED when its secret may not be checked now.
    /// Warm: two cache lookups. Cold: one indexed read and one scrypt, shared
    /// by every concurrent call presenting the same key.
    pub async fn identify(
        &self,
        key: PlainKey,
        ip: Option<IpAddr>,
        now: DateTime<Utc>,
    ) -> Result<Identified, ServiceError> {
        let Some(cache) = &self.cache else {
            let checked = self.noting_outage(Box::pin(self.check_secret(&key, ip, now)).await)?;
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
            None => {
                match Box::pin(cache.identify_once(digest, self.identify_cold(cache, key, ip, now))).await {
                    Ok(id) => id,
                    Err(Cold::Denied(refused)) => return Ok(Err(refused)),
                    Err(Cold::KnownBad(owner)) => return self.refused_for(cache, owner).await.map(Err),
                    Err(Cold::Failed(e)) => return Err(e),
                }
            }
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
        now: DateTime<Utc>,
    ) -> Result<Arc<str>, Cold> {
        let since = cache.epoch();
        let checked = self.noting_outage(self.check_secret(&key, ip, now).await).map_err(Cold::Failed)?;
        let state = Arc::new(checked.map_err(Cold::Denied)?);
        if self.freshness.trust() == Trust::Trusted {
            cache.fill_state(since, Arc::clone(&state));
        }
        Ok(Arc::clone(&state.key_id))
    }

    /// One indexed read by id, boxed to keep it out of the warm path's
    /// future (see [`Identifier::identify`]).
    fn load_state<'a>(
        &'a self,
        key_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<Arc<KeyState>>, ServiceError>> {
        Box::pin(async move {
            let lane = self.lane.acquire().await?;
            let stored =
                self.noting_outage(self.store.find_by_id(key_id).await.map_err(ServiceError::from))?;
            drop(lane);
            stored.map(|s| key_state(&s, &self.catalogue).map(Arc::new)).transpose()
        })
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
        now: DateTime<Utc>,
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
        let stored = match self.lane.acquire().await {
            Ok(lane) => {
                let stored = self.store.find_by_prefix(prefix).await;
                drop(lane);
                stored
            }
            Err(busy) => {
                self.throttle.uncount_lookup(lookup);
                return Err(busy.into());
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
                self.publish_warm(key, &state, &stored.hash, now);
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
    fn publish_warm(&self, key: &PlainKey, state: &KeyState, hash: &KeyHash, now: DateTime<Utc>) {
        let Some(warm) = &self.warm else { return };
        if state.policy.revoked_at.is_some_and(|at| at <= now) {
            return;
        }
        let (warm, key, key_id, hash) =
            (Arc::clone(warm), key.clone(), Arc::clone(&state.key_id), hash.clone());
        tokio::spawn(async move { warm.publish(&key, &key_id, &hash).await });
    }
}

/// What identification found: the key, or why it is denied.
pub(super) type Identified = Result<Arc<KeyState>, Refused>;

/// Why no usable key was found; for a wrong secret, whose key it was.
pub(super) struct Refused {
    pub reason: DenyReason,
    pub owner: Option<Arc<KeyState>>,
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
