//! Lifecycle events: what happened to a key, told to the world outside the
//! service. Each event is a CloudEvent (1.0, structured JSON) written to
//! the outbox in the transaction of the change it describes, or once per
//! occasion by the expiry scan ([`expiry`]). The relay ([`relay`]), run by
//! one replica at a time under a lease, delivers each to NATS JetStream
//! ([`nats`]) and to signed webhooks ([`webhook`]), at least once and in
//! order per key. KeyAdmin.ListEvents reads the same rows.
//!
//! No secret is ever part of an event: no plaintext, no hash.

pub mod expiry;
pub mod nats;
pub mod relay;
pub mod webhook;

use std::{sync::Arc, time::Duration};

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Map, Value, json};

use crate::{
    keys::Metadata,
    store::{events::NewEvent, keys::StoredKey},
};

/// Every event type, as the contract names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventType {
    Created,
    Updated,
    Revoked,
    Regenerated,
    GraceEnded,
    Expiring,
    Expired,
    Disabled,
    Enabled,
    Leaked,
}

impl EventType {
    pub const ALL: [Self; 10] = [
        Self::Created,
        Self::Updated,
        Self::Revoked,
        Self::Regenerated,
        Self::GraceEnded,
        Self::Expiring,
        Self::Expired,
        Self::Disabled,
        Self::Enabled,
        Self::Leaked,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "key.created",
            Self::Updated => "key.updated",
            Self::Revoked => "key.revoked",
            Self::Regenerated => "key.regenerated",
            Self::GraceEnded => "key.grace_ended",
            Self::Expiring => "key.expiring",
            Self::Expired => "key.expired",
            Self::Disabled => "key.disabled",
            Self::Enabled => "key.enabled",
            Self::Leaked => "key.leaked",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// Every type's name, for error messages.
    pub fn names() -> String {
        Self::ALL.map(Self::as_str).join(", ")
    }
}

/// The actor of scheduled events.
pub const SCHEDULER: &str = "keywarden";

/// What an event says about its key.
#[derive(Debug, Clone, Copy)]
pub struct KeyFacts<'a> {
    pub merchant_id: &'a str,
    pub key_id: &'a str,
    pub key_name: &'a str,
    pub prefix: &'a str,
    pub metadata: &'a Metadata,
}

impl<'a> KeyFacts<'a> {
    pub fn of(key: &'a StoredKey) -> Self {
        Self {
            merchant_id: &key.merchant_id,
            key_id: &key.id,
            key_name: &key.name,
            prefix: &key.prefix,
            metadata: &key.metadata,
        }
    }
}

/// Builds outbox rows: the CloudEvent envelope around each event's data.
#[derive(Debug, Clone)]
pub struct Outbox {
    source: Arc<str>,
}

impl Outbox {
    /// `source` is every event's CloudEvents `source`.
    pub fn new(source: &str) -> Self {
        Self { source: source.into() }
    }

    /// An event of `kind` about `key`, done by `actor` at `at`, with the
    /// type's own fields in `extra`. `occasion` makes a scheduled event
    /// once-only.
    pub fn event(
        &self,
        kind: EventType,
        key: KeyFacts<'_>,
        actor: &str,
        at: DateTime<Utc>,
        extra: Map<String, Value>,
        occasion: Option<String>,
    ) -> NewEvent {
        let id = uuid::Uuid::now_v7().to_string();
        let mut data = Map::new();
        data.insert("merchant_id".into(), key.merchant_id.into());
        data.insert("key_id".into(), key.key_id.into());
        data.insert("key_name".into(), key.key_name.into());
        data.insert("prefix".into(), key.prefix.into());
        if !key.metadata.is_empty() {
            data.insert("metadata".into(), key.metadata.to_json());
        }
        data.insert("actor".into(), actor.into());
        data.extend(extra);
        let body = json!({
            "specversion": "1.0",
            "id": id,
            "source": &*self.source,
            "type": kind.as_str(),
            "subject": key.key_id,
            "time": rfc3339(at),
            "datacontenttype": "application/json",
            "data": Value::Object(data),
        })
        .to_string();
        NewEvent {
            id,
            kind: kind.as_str(),
            merchant_id: key.merchant_id.to_owned(),
            key_id: key.key_id.to_owned(),
            time: at,
            occasion,
            body,
        }
    }
}

/// One second after the first failure, doubling with each one after, at
/// most `longest`: the one backoff of deliveries and of silent endpoints.
pub fn doubling_backoff(failures: u32, longest: Duration) -> Duration {
    let doublings = failures.saturating_sub(1).min(20);
    (Duration::from_secs(1) * 2u32.pow(doublings)).min(longest)
}

/// RFC 3339 in UTC, to the microsecond, as every event time is written.
pub fn rfc3339(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// A lead time as configured and as events name it: `14d`, `3h`, `10s`.
pub fn lead_name(lead: Duration) -> String {
    let secs = lead.as_secs();
    match secs {
        s if s > 0 && s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s > 0 && s % 3_600 == 0 => format!("{}h", s / 3_600),
        s if s > 0 && s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// Fields for an event's `data`.
#[macro_export]
#[doc(hidden)]
macro_rules! event_fields {
    ($($name:literal => $value:expr),* $(,)?) => {{
        #[allow(unused_mut)]
        let mut map = serde_json::Map::new();
        $(map.insert($name.to_owned(), serde_json::Value::from($value));)*
        map
    }};
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn an_event_is_a_structured_cloudevent_without_secrets() {
        let outbox = Outbox::new("keywarden");
        let at = DateTime::from_timestamp_micros(1_800_000_000_123_456).unwrap();
        let metadata = Metadata::new([("tier".to_owned(), "gold".to_owned())]).unwrap();
        let key = KeyFacts {
            merchant_id: "m1",
            key_id: "k1",
            key_name: "till",
            prefix: "sntr_abcdefghijk",
            metadata: &metadata,
        };
        let event =
            outbox.event(EventType::Revoked, key, "alice", at, event_fields!("reason" => "lost"), None);
        let body: Value = serde_json::from_str(&event.body).unwrap();
        assert_eq!(body["specversion"], "1.0");
        assert_eq!(body["id"], event.id.as_str());
        assert_eq!(uuid::Uuid::parse_str(&event.id).unwrap().get_version_num(), 7);
        assert_eq!(body["source"], "keywarden");
        assert_eq!(body["type"], "key.revoked");
        assert_eq!(body["subject"], "k1");
        assert_eq!(body["time"], "2027-01-15T08:00:00.123456Z");
        assert_eq!(body["datacontenttype"], "application/json");
        let data = &body["data"];
        for (field, value) in [
            ("merchant_id", "m1"),
            ("key_id", "k1"),
            ("key_name", "till"),
            ("prefix", "sntr_abcdefghijk"),
            ("actor", "alice"),
            ("reason", "lost"),
        ] {
            assert_eq!(data[field], value, "{field}");
        }
        assert_eq!(data["metadata"], json!({"tier": "gold"}));
        assert_eq!(
            (event.kind, event.key_id.as_str(), event.merchant_id.as_str()),
            ("key.revoked", "k1", "m1")
        );
    }

    #[test]
    fn types_and_leads_have_their_contract_names() {
        for t in EventType::ALL {
            assert_eq!(EventType::parse(t.as_str()), Some(t));
        }
        assert_eq!(EventType::parse("key.deleted"), None);
        let leads = [86_400 * 14, 3 * 3_600, 90, 600].map(|s| lead_name(Duration::from_secs(s)));
        assert_eq!(leads, ["14d", "3h", "90s", "10m"]);
    }
}
