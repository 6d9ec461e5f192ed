//! The after-commit seam of key changes: [`KeyEvents`] hands each
//! committed [`KeyEvent`] to every sink this replica has (its verification
//! cache, the fleet's warm-start map), in the order they were given. Other
//! replicas hear through the change feed, which the store writes in the
//! change's own transaction (ADR 50).

use std::sync::Arc;

use crate::{
    keys::events::{KeyEvent, KeyEventSink, KeyRef},
    store::keys::StoredKey,
};

/// A stored key as an event names it.
pub fn key_ref(key: &StoredKey) -> KeyRef {
    KeyRef { key_id: key.id.as_str().into(), merchant_id: key.merchant_id.clone(), version: key.version }
}

/// Every sink that hears of a committed key change.
#[derive(Debug, Clone, Default)]
pub struct KeyEvents {
    sinks: Vec<Arc<dyn KeyEventSink>>,
}

impl KeyEvents {
    pub fn new(sinks: Vec<Arc<dyn KeyEventSink>>) -> Self {
        Self { sinks }
    }

    /// Delivers `event` to each sink in turn; returns when all have it.
    pub async fn emit(&self, event: KeyEvent) {
        tracing::debug!(kind = event.kind(), key_id = %event.key().key_id, "key event");
        for sink in &self.sinks {
            sink.deliver(&event).await;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::disallowed_methods)]

    use std::sync::Mutex;

    use chrono::Utc;

    use super::*;
    use crate::keys::events::{Delivery, KeyRef};

    #[derive(Debug, Default)]
    struct Recorder {
        name: &'static str,
        heard: Arc<Mutex<Vec<(&'static str, &'static str)>>>,
    }

    impl KeyEventSink for Recorder {
        fn deliver<'a>(&'a self, event: &'a KeyEvent) -> Delivery<'a> {
            Box::pin(async move { self.heard.lock().unwrap().push((self.name, event.kind())) })
        }
    }

    #[tokio::test]
    async fn every_sink_hears_each_event_once_in_order() {
        let heard = Arc::new(Mutex::new(Vec::new()));
        let sink = |name| Arc::new(Recorder { name, heard: Arc::clone(&heard) }) as Arc<dyn KeyEventSink>;
        let events = KeyEvents::new(vec![sink("cache"), sink("warm")]);
        let key = KeyRef { key_id: "k".into(), merchant_id: "m".into(), version: 2 };
        events.emit(KeyEvent::Revoked { key: key.clone(), at: Utc::now() }).await;
        events.emit(KeyEvent::Updated { key, at: Utc::now() }).await;
        assert_eq!(
            *heard.lock().unwrap(),
            [
                ("cache", "key.revoked"),
                ("warm", "key.revoked"),
                ("cache", "key.updated"),
                ("warm", "key.updated")
            ]
        );
    }
}
