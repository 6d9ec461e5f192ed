//! The event outbox. An event row is written by the
//! transaction of the change it describes (`insert_events`), or once per
//! occasion by the expiry scan ([`Store::insert_scheduled`]). The relay,
//! holding the fleet's lease ([`Store::claim_lease`]), gives each new event
//! its position and queues one delivery per sink ([`Store::fan_out`]), then
//! delivers what is due (`super::deliveries`).

use chrono::{DateTime, Utc};
use sea_orm::{
    ActiveValue::Set,
    ColumnTrait, Condition, ConnectionTrait, EntityTrait, ExprTrait, FromQueryResult, QueryFilter,
    QueryOrder, QuerySelect,
    sea_query::{Expr, Func, OnConflict, Query},
};

use super::{
    Store, StoreError,
    deliveries::DeliveryState,
    entity::{event_delivery, event_lease, key_event},
};

/// An event as its writer hands it to the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    pub id: String,
    pub kind: &'static str,
    pub merchant_id: String,
    pub key_id: String,
    pub time: DateTime<Utc>,
    /// For a scheduled event: what makes it once-only.
    pub occasion: Option<String>,
    /// The CloudEvent, exactly as sinks receive it.
    pub body: String,
}

/// An event as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    pub seq: i64,
    pub id: String,
    pub kind: String,
    pub merchant_id: String,
    pub key_id: String,
    pub time: DateTime<Utc>,
    pub position: Option<i64>,
    pub body: String,
}

impl From<key_event::Model> for StoredEvent {
    fn from(m: key_event::Model) -> Self {
        Self {
            seq: m.seq,
            id: m.id,
            kind: m.kind,
            merchant_id: m.merchant_id,
            key_id: m.key_id,
            time: m.time,
            position: m.position,
            body: m.body,
        }
    }
}

/// Writes `events` as part of the caller's transaction.
pub(super) async fn insert_events<C: ConnectionTrait>(
    db: &C,
    events: Vec<NewEvent>,
) -> Result<(), StoreError> {
    if events.is_empty() {
        return Ok(());
    }
    key_event::Entity::insert_many(events.into_iter().map(active)).exec_without_returning(db).await?;
    Ok(())
}

fn active(e: NewEvent) -> key_event::ActiveModel {
    key_event::ActiveModel {
        id: Set(e.id),
        kind: Set(e.kind.to_owned()),
        merchant_id: Set(e.merchant_id),
        key_id: Set(e.key_id),
        time: Set(e.time),
        occasion: Set(e.occasion),
        body: Set(e.body),
        position: Set(None),
        ..Default::default()
    }
}

#[derive(Debug, FromQueryResult)]
struct Max {
    n: Option<i64>,
}

impl Store {
    /// Writes scheduled events, each unless its occasion has one already
    /// (however many replicas scan); returns how many were new.
    pub async fn insert_scheduled(&self, events: Vec<NewEvent>) -> Result<u64, StoreError> {
        let mut written = 0;
        for event in events {
            self.count(1);
            let inserted = key_event::Entity::insert(active(event))
                .on_conflict(OnConflict::column(key_event::Column::Occasion).do_nothing().to_owned())
                .exec_without_returning(self.db())
                .await;
            match inserted {
                Ok(n) => written += n,
                // sea-orm reports "nothing inserted" as an error on some backends.
                Err(sea_orm::DbErr::RecordNotInserted) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(written)
    }

    /// Events in position order after `after` (a position), optionally one
    /// merchant's and only some types; only events the relay has placed.
    pub async fn list_events(
        &self,
        merchant_id: Option<&str>,
        types: &[String],
        after: Option<i64>,
        limit: u64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        use key_event::Column as C;
        let mut query = key_event::Entity::find().filter(C::Position.is_not_null());
        if let Some(merchant) = merchant_id {
            query = query.filter(C::MerchantId.eq(merchant));
        }
        if !types.is_empty() {
            query = query.filter(C::Kind.is_in(types.iter().map(String::as_str)));
        }
        if let Some(after) = after {
            query = query.filter(C::Position.gt(after));
        }
        self.count_read();
        Ok(query
            .order_by_asc(C::Position)
            .limit(limit)
            .all(self.db())
            .await?
            .into_iter()
            .map(Into::into)
            .collect())
    }

    /// One event by id, optionally only if it is this merchant's.
    pub async fn find_event(
        &self,
        merchant_id: Option<&str>,
        id: &str,
    ) -> Result<Option<StoredEvent>, StoreError> {
        use key_event::Column as C;
        let mut query = key_event::Entity::find().filter(C::Id.eq(id));
        if let Some(merchant) = merchant_id {
            query = query.filter(C::MerchantId.eq(merchant));
        }
        self.count_read();
        Ok(query.one(self.db()).await?.map(Into::into))
    }

    /// Takes or renews the lease `name` for `holder` until `now + ttl`; a
    /// lease another holder has let lapse is taken over. `false`: someone
    /// else holds it.
    pub async fn claim_lease(
        &self,
        name: &str,
        holder: &str,
        now: DateTime<Utc>,
        ttl: chrono::Duration,
    ) -> Result<bool, StoreError> {
        use event_lease::Column as C;
        self.count(1);
        let renewed = event_lease::Entity::update_many()
            .col_expr(C::Holder, Expr::value(holder))
            .col_expr(C::Until, Expr::value(now + ttl))
            .filter(C::Name.eq(name))
            .filter(C::Holder.eq(holder).or(C::Until.lt(now)))
            .exec(self.db())
            .await?
            .rows_affected;
        if renewed == 1 {
            return Ok(true);
        }
        self.count(1);
        let lease = event_lease::ActiveModel {
            name: Set(name.to_owned()),
            holder: Set(holder.to_owned()),
            until: Set(now + ttl),
        };
        match event_lease::Entity::insert(lease)
            .on_conflict(OnConflict::column(C::Name).do_nothing().to_owned())
            .exec_without_returning(self.db())
            .await
        {
            Ok(n) => Ok(n == 1),
            Err(sea_orm::DbErr::RecordNotInserted) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Gives the lease up at once (shutdown), if `holder` has it.
    pub async fn release_lease(
        &self,
        name: &str,
        holder: &str,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        use event_lease::Column as C;
        self.count(1);
        event_lease::Entity::update_many()
            .col_expr(C::Until, Expr::value(now - chrono::Duration::seconds(1)))
            .filter(C::Name.eq(name))
            .filter(C::Holder.eq(holder))
            .exec(self.db())
            .await?;
        Ok(())
    }

    /// Up to `limit` events not yet placed, oldest first.
    pub async fn unplaced_events(&self, limit: u64) -> Result<Vec<StoredEvent>, StoreError> {
        use key_event::Column as C;
        self.count_read();
        Ok(key_event::Entity::find()
            .filter(C::Position.is_null())
            .order_by_asc(C::Seq)
            .limit(limit)
            .all(self.db())
            .await?
            .into_iter()
            .map(Into::into)
            .collect())
    }

    /// Queues each event's deliveries (`sinks` says which sinks take it),
    /// then places the events after every placed one, in the order given.
    /// No transaction: each step can be done again, so a relay that dies
    /// half-way leaves work its successor finishes (queued deliveries are
    /// not queued twice; an event is placed once, and only once its
    /// deliveries are queued). Two relays placing at once collide on the
    /// unique position, and one of them fails and tries again.
    pub async fn fan_out(
        &self,
        events: &[StoredEvent],
        sinks: impl Fn(&StoredEvent) -> Vec<String>,
    ) -> Result<(), StoreError> {
        use key_event::Column as C;
        if events.is_empty() {
            return Ok(());
        }
        let mut queued = Vec::new();
        for event in events {
            for sink in sinks(event) {
                queued.push(event_delivery::ActiveModel {
                    event_seq: Set(event.seq),
                    sink: Set(sink),
                    key_id: Set(event.key_id.clone()),
                    state: Set(DeliveryState::Pending.as_str().to_owned()),
                    attempts: Set(0),
                    last_status: Set(None),
                    last_error: Set(None),
                    created_at: Set(event.time),
                    next_attempt_at: Set(event.time),
                    last_attempt_at: Set(None),
                });
            }
        }
        for chunk in queued.chunks(500) {
            self.count(1);
            match event_delivery::Entity::insert_many(chunk.to_vec())
                .on_conflict(
                    OnConflict::columns([event_delivery::Column::EventSeq, event_delivery::Column::Sink])
                        .do_nothing()
                        .to_owned(),
                )
                .exec_without_returning(self.db())
                .await
            {
                Ok(_) | Err(sea_orm::DbErr::RecordNotInserted) => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.count(1);
        let last = key_event::Entity::find()
            .select_only()
            .column_as(Expr::from(Func::max(Expr::col(C::Position))), "n")
            .into_model::<Max>()
            .one(self.db())
            .await?
            .and_then(|m| m.n)
            .unwrap_or(0);
        for (i, event) in events.iter().enumerate() {
            self.count(1);
            key_event::Entity::update_many()
                .col_expr(C::Position, Expr::value(last + 1 + i as i64))
                .filter(C::Seq.eq(event.seq))
                .filter(C::Position.is_null())
                .exec(self.db())
                .await?;
        }
        Ok(())
    }

    /// Deletes up to `limit` placed events older than `before` that no
    /// sink still waits for, with their deliveries; returns how many.
    pub async fn prune_events(&self, before: DateTime<Utc>, limit: u64) -> Result<u64, StoreError> {
        use event_delivery::Column as D;
        use key_event::Column as C;
        let waiting = Query::select()
            .column(D::EventSeq)
            .from(event_delivery::Entity)
            .and_where(D::State.eq(DeliveryState::Pending.as_str()))
            .to_owned();
        self.count(1);
        let seqs: Vec<i64> = key_event::Entity::find()
            .select_only()
            .column(C::Seq)
            .filter(C::Position.is_not_null())
            .filter(C::Time.lt(before))
            .filter(Condition::all().add(Expr::col((key_event::Entity, C::Seq)).not_in_subquery(waiting)))
            .order_by_asc(C::Seq)
            .limit(limit)
            .into_tuple()
            .all(self.db())
            .await?;
        if seqs.is_empty() {
            return Ok(0);
        }
        self.count(2);
        event_delivery::Entity::delete_many()
            .filter(D::EventSeq.is_in(seqs.iter().copied()))
            .exec(self.db())
            .await?;
        let deleted = key_event::Entity::delete_many()
            .filter(C::Seq.is_in(seqs.iter().copied()))
            .exec(self.db())
            .await?;
        Ok(deleted.rows_affected)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::disallowed_methods)]

    use super::*;

    fn event(key: &str, time: DateTime<Utc>) -> NewEvent {
        NewEvent {
            id: uuid::Uuid::now_v7().to_string(),
            kind: "key.updated",
            merchant_id: "m".into(),
            key_id: key.into(),
            time,
            occasion: None,
            body: "{}".into(),
        }
    }

    #[tokio::test]
    async fn deliveries_go_in_order_per_key_and_only_finished_old_events_are_pruned() {
        let (store, _dir) = crate::store::temp_sqlite_store().await;
        let old = Utc::now() - chrono::Duration::days(40);
        insert_events(
            store.db(),
            vec![event("a", old), event("a", old), event("b", old), event("c", Utc::now())],
        )
        .await
        .unwrap();
        let events = store.unplaced_events(10).await.unwrap();
        store.fan_out(&events, |_| vec!["s".to_owned()]).await.unwrap();
        assert!(store.unplaced_events(10).await.unwrap().is_empty(), "placed once");
        let now = Utc::now();
        // a's first event fails and waits for a retry: a's second waits too.
        store
            .mark_attempt_failed(
                "s",
                events[0].seq,
                Some(500),
                "HTTP 500",
                now,
                Some(now + chrono::Duration::hours(1)),
            )
            .await
            .unwrap();
        let due: Vec<i64> =
            store.due_deliveries("s", now, 10).await.unwrap().iter().map(|d| d.delivery.event_seq).collect();
        assert_eq!(due, [events[2].seq, events[3].seq]);
        store.mark_delivered("s", &due, Some(200), now).await.unwrap();
        // Old and delivered (b) goes; old and pending (a) stays, as does new (c).
        assert_eq!(store.prune_events(now - chrono::Duration::days(30), 100).await.unwrap(), 1);
        let left: Vec<String> =
            store.list_events(None, &[], None, 10).await.unwrap().into_iter().map(|e| e.key_id).collect();
        assert_eq!(left, ["a", "a", "c"]);
        assert_eq!(store.list_deliveries("s", None, 10).await.unwrap().len(), 3);
    }
}
