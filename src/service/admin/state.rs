//! DisableKey and EnableKey: stopping a key short of revoking it, and
//! letting it verify again. Each is one conditional write with its audit
//! row and event, propagated like any change.

use super::{KeyManager, KeyView, check_ids, checked_reason, key_ref, reasoned_audit};
use crate::{
    audit::AuditKind,
    event_fields,
    events::{EventType, KeyFacts},
    keys::{KeyStatus, events::KeyEvent, operator::AdminAction},
    service::{ServiceError, access::Principal},
    store::keys::{Change, StoredKey},
};

impl KeyManager {
    /// Refused with DENY_REASON_DISABLED from the next Verify on. Disabling
    /// a disabled key changes nothing and answers it; a revoked key cannot
    /// be disabled.
    pub async fn disable(
        &self,
        who: &Principal,
        merchant_id: &str,
        key_id: &str,
        reason: &str,
    ) -> Result<KeyView, ServiceError> {
        self.access.authorize(who, AdminAction::DisableKey, Some(merchant_id))?;
        check_ids(merchant_id, key_id)?;
        let reason = checked_reason(reason)?;
        let now = self.clock.now();
        let audit = reasoned_audit(AuditKind::KeyDisabled, now, who, merchant_id, key_id, reason);
        let _pause = self.usage.pause_flush().await?;
        let event = |key: &StoredKey| {
            self.outbox.event(
                EventType::Disabled,
                KeyFacts::of(key),
                &who.actor,
                now,
                event_fields!("reason" => reason),
                None,
            )
        };
        match self.store.disable_key(merchant_id, key_id, reason, now, audit, event).await? {
            Change::Applied(key) => {
                self.events.emit(KeyEvent::Updated { key: key_ref(&key), at: now }).await;
                tracing::info!(actor = %who.actor, merchant_id, key_id, "key disabled");
                Ok(self.committed(key, now))
            }
            Change::Refused(key) if key.disabled_at.is_some() && !revoked(&key, now) => {
                Ok(self.committed(key, now))
            }
            Change::Refused(key) => Err(ServiceError::FailedPrecondition(format!(
                "key {} is revoked and cannot be disabled",
                key.id
            ))),
            Change::NotFound => Err(ServiceError::NotFound("key")),
        }
    }

    /// Lets a disabled key verify again. Enabling a key that is not
    /// disabled changes nothing and answers it; a revoked key cannot be
    /// enabled.
    pub async fn enable(
        &self,
        who: &Principal,
        merchant_id: &str,
        key_id: &str,
    ) -> Result<KeyView, ServiceError> {
        self.access.authorize(who, AdminAction::EnableKey, Some(merchant_id))?;
        check_ids(merchant_id, key_id)?;
        let now = self.clock.now();
        let audit = reasoned_audit(AuditKind::KeyEnabled, now, who, merchant_id, key_id, None);
        let _pause = self.usage.pause_flush().await?;
        let event = |key: &StoredKey| {
            self.outbox.event(EventType::Enabled, KeyFacts::of(key), &who.actor, now, event_fields!(), None)
        };
        match self.store.enable_key(merchant_id, key_id, now, audit, event).await? {
            Change::Applied(key) => {
                self.events.emit(KeyEvent::Updated { key: key_ref(&key), at: now }).await;
                tracing::info!(actor = %who.actor, merchant_id, key_id, "key enabled");
                Ok(self.committed(key, now))
            }
            Change::Refused(key) if revoked(&key, now) => Err(ServiceError::FailedPrecondition(format!(
                "key {} is revoked and cannot be enabled",
                key.id
            ))),
            Change::Refused(key) => Ok(self.committed(key, now)),
            Change::NotFound => Err(ServiceError::NotFound("key")),
        }
    }
}

fn revoked(key: &StoredKey, now: chrono::DateTime<chrono::Utc>) -> bool {
    KeyStatus::at(key.revoked_at, None, now) == KeyStatus::Revoked
}
