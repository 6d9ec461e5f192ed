//! What happened to a key, once its transaction has committed
//! ([`KeyEvent`]), and what hears of it ([`KeyEventSink`]). The key-management
//! use case emits each event once, after the commit, to every sink; the
//! verification cache and the fleet's warm-start map are sinks (ADR 50).
//!
//! Free of I/O like the rest of [`crate::keys`]: a sink's work is its own,
//! behind a boxed future.

use std::{future::Future, pin::Pin, sync::Arc};

use chrono::{DateTime, Utc};

/// A key as an event names it: enough to find it, and its row version
/// after the change (so a consumer can order events and drop stale ones).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRef {
    pub key_id: Arc<str>,
    pub merchant_id: String,
    pub version: i64,
}

/// A committed change to a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyEvent {
    /// A new key was issued.
    Created { key: KeyRef, at: DateTime<Utc> },
    /// Its name, scopes, allow-list, expiry, limits, credits or metadata
    /// changed, or it was disabled or enabled.
    Updated { key: KeyRef, at: DateTime<Utc> },
    /// Revoked: it stops verifying at once.
    Revoked { key: KeyRef, at: DateTime<Utc> },
    /// `previous` was replaced by `key`; it verifies until `previous_until`
    /// (the end of its grace period, or at once).
    Regenerated { key: KeyRef, previous: KeyRef, previous_until: DateTime<Utc>, at: DateTime<Utc> },
}

impl KeyEvent {
    /// The event's type, as logs and (later) event envelopes name it.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Created { .. } => "key.created",
            Self::Updated { .. } => "key.updated",
            Self::Revoked { .. } => "key.revoked",
            Self::Regenerated { .. } => "key.regenerated",
        }
    }

    /// The key the event is about (for a regeneration, the new one).
    pub fn key(&self) -> &KeyRef {
        match self {
            Self::Created { key, .. }
            | Self::Updated { key, .. }
            | Self::Revoked { key, .. }
            | Self::Regenerated { key, .. } => key,
        }
    }

    /// When the change was committed, on the database's clock.
    pub fn at(&self) -> DateTime<Utc> {
        match self {
            Self::Created { at, .. }
            | Self::Updated { at, .. }
            | Self::Revoked { at, .. }
            | Self::Regenerated { at, .. } => *at,
        }
    }

    /// The existing key whose stored state the change altered: what a
    /// cache of key states must forget. `None` for a new key, which
    /// nothing can hold yet.
    pub fn altered(&self) -> Option<&KeyRef> {
        match self {
            Self::Created { .. } => None,
            Self::Updated { key, .. } | Self::Revoked { key, .. } => Some(key),
            Self::Regenerated { previous, .. } => Some(previous),
        }
    }

    /// The key whose plaintext no longer belongs to a key that should
    /// verify (revoked, or replaced): what must forget the plaintext.
    pub fn retired(&self) -> Option<&KeyRef> {
        match self {
            Self::Revoked { key, .. } => Some(key),
            Self::Regenerated { previous, .. } => Some(previous),
            Self::Created { .. } | Self::Updated { .. } => None,
        }
    }
}

/// A sink's work for one event.
pub type Delivery<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// Something that hears of every committed key change on this replica. The
/// change is already committed when it hears: a sink cannot refuse it, so
/// it handles (and logs) its own failures.
pub trait KeyEventSink: Send + Sync + std::fmt::Debug {
    fn deliver<'a>(&'a self, event: &'a KeyEvent) -> Delivery<'a>;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::disallowed_methods)]

    use super::*;

    fn key(id: &str, version: i64) -> KeyRef {
        KeyRef { key_id: id.into(), merchant_id: "m".into(), version }
    }

    #[test]
    fn each_event_says_which_key_it_altered_and_which_it_retired() {
        let at = Utc::now();
        let created = KeyEvent::Created { key: key("new", 1), at };
        assert_eq!((created.altered(), created.retired()), (None, None));
        let updated = KeyEvent::Updated { key: key("k", 2), at };
        assert_eq!((updated.altered(), updated.retired()), (Some(&key("k", 2)), None));
        let revoked = KeyEvent::Revoked { key: key("k", 3), at };
        assert_eq!((revoked.altered(), revoked.retired()), (Some(&key("k", 3)), Some(&key("k", 3))));
        let rotated =
            KeyEvent::Regenerated { key: key("new", 1), previous: key("old", 4), previous_until: at, at };
        assert_eq!(rotated.key(), &key("new", 1));
        assert_eq!((rotated.altered(), rotated.retired()), (Some(&key("old", 4)), Some(&key("old", 4))));
        let kinds = [created, updated, revoked, rotated].map(|e| e.kind());
        assert_eq!(kinds, ["key.created", "key.updated", "key.revoked", "key.regenerated"]);
    }
}
