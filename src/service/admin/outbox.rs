//! KeyAdmin's lifecycle-event calls: ListEvents (the pull side, scoped by
//! merchant like every read) and the webhook endpoints, ADMIN only.

use super::{KeyManager, new_key_id};
use crate::{
    events::{
        EventType,
        webhook::{self, SigningSecret},
    },
    keys::{hash::SubkeyMacs, operator::AdminAction},
    service::{
        ServiceError,
        access::Principal,
        page::{self, Page},
        validate::{self, Violations},
    },
    store::{
        deliveries::Delivery,
        events::StoredEvent,
        webhooks::{WebhookEndpoint, sink_of},
    },
};

/// Most event types an endpoint or a ListEvents call may name.
const MAX_TYPES: usize = 16;

/// What webhook management needs: whether `http://` is allowed, and the
/// subkeys that seal signing secrets.
#[derive(Debug, Clone)]
pub struct Webhooks {
    allow_http: bool,
    macs: SubkeyMacs,
}

impl Webhooks {
    pub fn new(allow_http: bool, macs: SubkeyMacs) -> Self {
        Self { allow_http, macs }
    }
}

/// One page of events and where the next starts.
#[derive(Debug)]
pub struct EventPage {
    pub events: Vec<StoredEvent>,
    /// The last event's id; empty when the page is empty.
    pub next_cursor: String,
}

/// A new endpoint and its signing secret, shown this once.
#[derive(Debug)]
pub struct NewWebhook {
    pub endpoint: WebhookEndpoint,
    pub secret: SigningSecret,
}

fn check_types(v: &mut Violations, field: &str, types: &[String]) {
    if types.len() > MAX_TYPES {
        v.add(field, format!("name at most {MAX_TYPES} types"));
        return;
    }
    for t in types {
        if EventType::parse(t).is_none() {
            v.add(
                field,
                format!(
                    "unknown type {}; types are: {}",
                    validate::excerpt(t, validate::MAX_EXCERPT),
                    EventType::names()
                ),
            );
        }
    }
}

impl KeyManager {
    pub async fn list_events(
        &self,
        who: &Principal,
        merchant_id: &str,
        types: &[String],
        after: &str,
        page_size: i32,
    ) -> Result<EventPage, ServiceError> {
        if merchant_id.is_empty() {
            self.access.authorize_all_merchants(who, AdminAction::ListEvents)?;
        } else {
            self.access.authorize(who, AdminAction::ListEvents, Some(merchant_id))?;
        }
        let mut v = Violations::default();
        if !merchant_id.is_empty() {
            v.check("merchant_id", validate::merchant_id(merchant_id));
        }
        check_types(&mut v, "types", types);
        if !after.is_empty() {
            v.check("after", validate::key_id(after));
        }
        let limit = page::page_size_of(page_size)?;
        v.into_result()?;
        let merchant = (!merchant_id.is_empty()).then_some(merchant_id);
        let after = if after.is_empty() {
            None
        } else {
            match self.store.find_event(merchant, after).await? {
                Some(StoredEvent { position: Some(position), .. }) => Some(position),
                _ => return Err(ServiceError::invalid("after", "is not the id of an event listed before")),
            }
        };
        let events = self.store.list_events(merchant, types, after, limit).await?;
        let next_cursor = events.last().map(|e| e.id.clone()).unwrap_or_default();
        Ok(EventPage { events, next_cursor })
    }

    pub async fn create_webhook(
        &self,
        who: &Principal,
        url: &str,
        event_types: Vec<String>,
        merchant_id: &str,
    ) -> Result<NewWebhook, ServiceError> {
        self.access.authorize(who, AdminAction::CreateWebhookEndpoint, None)?;
        let mut v = Violations::default();
        if let Err(why) = webhook::check_url(url, self.webhooks.allow_http) {
            v.add("url", why);
        }
        check_types(&mut v, "event_types", &event_types);
        if !merchant_id.is_empty() {
            v.check("merchant_id", validate::merchant_id(merchant_id));
        }
        v.into_result()?;
        let secret = SigningSecret::generate().map_err(|e| ServiceError::Internal(e.to_string()))?;
        let id = new_key_id();
        let (sealed_secret, pepper) = secret.seal(&self.webhooks.macs, &id);
        let mut types = event_types;
        types.sort();
        types.dedup();
        let endpoint = WebhookEndpoint {
            id,
            url: url.to_owned(),
            event_types: types,
            merchant_id: merchant_id.to_owned(),
            sealed_secret,
            pepper: pepper.to_string(),
            created_by: who.actor.clone(),
            created_at: self.clock.now(),
        };
        self.store.insert_webhook(endpoint.clone()).await?;
        tracing::info!(actor = %who.actor, endpoint = %endpoint.id, "webhook endpoint created");
        Ok(NewWebhook { endpoint, secret })
    }

    pub async fn list_webhooks(&self, who: &Principal) -> Result<Vec<WebhookEndpoint>, ServiceError> {
        self.access.authorize(who, AdminAction::ListWebhookEndpoints, None)?;
        Ok(self.store.list_webhooks().await?)
    }

    pub async fn delete_webhook(&self, who: &Principal, id: &str) -> Result<(), ServiceError> {
        self.access.authorize(who, AdminAction::DeleteWebhookEndpoint, None)?;
        let mut v = Violations::default();
        v.check("id", validate::key_id(id));
        v.into_result()?;
        if !self.store.delete_webhook(id).await? {
            return Err(ServiceError::NotFound("webhook endpoint"));
        }
        tracing::info!(actor = %who.actor, endpoint = %id, "webhook endpoint deleted");
        Ok(())
    }

    pub async fn webhook_deliveries(
        &self,
        who: &Principal,
        endpoint_id: &str,
        page_size: i32,
        page_token: &str,
    ) -> Result<Page<Delivery>, ServiceError> {
        self.access.authorize(who, AdminAction::ListWebhookDeliveries, None)?;
        let mut v = Violations::default();
        v.check("endpoint_id", validate::key_id(endpoint_id));
        v.into_result()?;
        if self.store.get_webhook(endpoint_id).await?.is_none() {
            return Err(ServiceError::NotFound("webhook endpoint"));
        }
        let sink = sink_of(endpoint_id);
        page::by_number(
            page_size,
            page_token,
            |before, limit| self.store.list_deliveries(&sink, before, limit),
            |d| d.event_seq,
        )
        .await
    }

    pub async fn redeliver(
        &self,
        who: &Principal,
        endpoint_id: &str,
        event_id: &str,
    ) -> Result<(), ServiceError> {
        self.access.authorize(who, AdminAction::RedeliverEvent, None)?;
        let mut v = Violations::default();
        v.check("endpoint_id", validate::key_id(endpoint_id));
        v.check("event_id", validate::key_id(event_id));
        v.into_result()?;
        if self.store.get_webhook(endpoint_id).await?.is_none() {
            return Err(ServiceError::NotFound("webhook endpoint"));
        }
        if !self.store.redeliver(&sink_of(endpoint_id), event_id, self.clock.now()).await? {
            return Err(ServiceError::NotFound("delivery of this event to this endpoint"));
        }
        tracing::info!(actor = %who.actor, endpoint = %endpoint_id, event_id, "event queued for redelivery");
        Ok(())
    }
}
