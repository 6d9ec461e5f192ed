//! Webhook endpoints: where lifecycle events are POSTed. The signing
//! secret arrives sealed (see `events::webhook`) and is stored as given.

use chrono::{DateTime, Utc};
use sea_orm::{ActiveValue::Set, ColumnTrait, EntityTrait, QueryFilter, QueryOrder, TransactionTrait};

use super::{Store, StoreError, entity::webhook_endpoint};

/// A webhook endpoint as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookEndpoint {
    pub id: String,
    pub url: String,
    /// Empty: every type.
    pub event_types: Vec<String>,
    /// Empty: every merchant.
    pub merchant_id: String,
    /// The signing secret sealed under a pepper subkey.
    pub sealed_secret: String,
    pub pepper: String,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
}

impl WebhookEndpoint {
    /// The delivery sink this endpoint is, as `event_deliveries` names it.
    pub fn sink(&self) -> String {
        sink_of(&self.id)
    }

    /// Whether it takes events of this type about this merchant's keys.
    pub fn wants(&self, kind: &str, merchant_id: &str) -> bool {
        (self.merchant_id.is_empty() || self.merchant_id == merchant_id)
            && (self.event_types.is_empty() || self.event_types.iter().any(|t| t == kind))
    }
}

/// The sink name of endpoint `id`.
pub fn sink_of(id: &str) -> String {
    format!("webhook:{id}")
}

impl From<webhook_endpoint::Model> for WebhookEndpoint {
    fn from(m: webhook_endpoint::Model) -> Self {
        Self {
            id: m.id,
            url: m.url,
            event_types: m.event_types.split_whitespace().map(str::to_owned).collect(),
            merchant_id: m.merchant_id,
            sealed_secret: m.sealed_secret,
            pepper: m.pepper,
            created_by: m.created_by,
            created_at: m.created_at,
        }
    }
}

impl Store {
    pub async fn insert_webhook(&self, endpoint: WebhookEndpoint) -> Result<(), StoreError> {
        self.count(1);
        webhook_endpoint::Entity::insert(webhook_endpoint::ActiveModel {
            id: Set(endpoint.id),
            url: Set(endpoint.url),
            event_types: Set(endpoint.event_types.join(" ")),
            merchant_id: Set(endpoint.merchant_id),
            sealed_secret: Set(endpoint.sealed_secret),
            pepper: Set(endpoint.pepper),
            created_by: Set(endpoint.created_by),
            created_at: Set(endpoint.created_at),
        })
        .exec_without_returning(self.db())
        .await?;
        Ok(())
    }

    /// Every endpoint, oldest first.
    pub async fn list_webhooks(&self) -> Result<Vec<WebhookEndpoint>, StoreError> {
        use webhook_endpoint::Column as C;
        self.count_read();
        Ok(webhook_endpoint::Entity::find()
            .order_by_asc(C::CreatedAt)
            .order_by_asc(C::Id)
            .all(self.db())
            .await?
            .into_iter()
            .map(Into::into)
            .collect())
    }

    pub async fn get_webhook(&self, id: &str) -> Result<Option<WebhookEndpoint>, StoreError> {
        self.count_read();
        Ok(webhook_endpoint::Entity::find_by_id(id.to_owned()).one(self.db()).await?.map(Into::into))
    }

    /// Removes the endpoint and every delivery queued for it; `false` if
    /// there was no such endpoint.
    pub async fn delete_webhook(&self, id: &str) -> Result<bool, StoreError> {
        let txn = self.db().begin().await?;
        self.count(4);
        let deleted = webhook_endpoint::Entity::delete_many()
            .filter(webhook_endpoint::Column::Id.eq(id))
            .exec(&txn)
            .await?
            .rows_affected;
        Self::drop_deliveries(&txn, &sink_of(id)).await?;
        txn.commit().await?;
        Ok(deleted == 1)
    }
}
