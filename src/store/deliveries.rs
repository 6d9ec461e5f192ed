//! Each event's delivery to each sink: what is due, oldest first and never
//! past an undelivered earlier event of the same key
//! ([`Store::due_deliveries`]); what a delivery did; how far behind each
//! sink is.

use chrono::{DateTime, Utc};
use sea_orm::{
    ColumnTrait, Condition, ConnectionTrait, EntityTrait, ExprTrait, FromQueryResult, QueryFilter,
    QueryOrder, QuerySelect, Select,
    sea_query::{Expr, Func, Query},
};

use super::{
    Store, StoreError,
    entity::{event_delivery, key_event},
};

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryState {
    Pending,
    Delivered,
    Failed,
}

impl DeliveryState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Delivered => "delivered",
            Self::Failed => "failed",
        }
    }

    fn parse(s: &str) -> Result<Self, StoreError> {
        match s {
            "pending" => Ok(Self::Pending),
            "delivered" => Ok(Self::Delivered),
            "failed" => Ok(Self::Failed),
            other => Err(StoreError::Corrupt {
                id: other.to_owned(),
                what: "delivery state",
                detail: "not pending, delivered or failed".into(),
            }),
        }
    }
}

/// One event's delivery to one sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub event_seq: i64,
    pub event_id: String,
    /// The event's type.
    pub kind: String,
    pub sink: String,
    pub key_id: String,
    pub state: DeliveryState,
    pub attempts: i32,
    pub last_status: Option<i32>,
    pub last_error: Option<String>,
    /// When the event was queued for the sink: the start of its delivery's
    /// time budget.
    pub created_at: DateTime<Utc>,
    pub next_attempt_at: DateTime<Utc>,
    pub last_attempt_at: Option<DateTime<Utc>>,
}

/// A delivery that is due, with what to send.
#[derive(Debug, Clone)]
pub struct DueDelivery {
    pub delivery: Delivery,
    pub body: String,
}

/// How far behind one sink is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backlog {
    pub sink: String,
    pub pending: u64,
    pub oldest: Option<DateTime<Utc>>,
}

#[derive(Debug, FromQueryResult)]
struct DueRow {
    event_seq: i64,
    sink: String,
    key_id: String,
    state: String,
    attempts: i32,
    last_status: Option<i32>,
    last_error: Option<String>,
    created_at: DateTime<Utc>,
    next_attempt_at: DateTime<Utc>,
    last_attempt_at: Option<DateTime<Utc>>,
    id: String,
    kind: String,
    body: String,
}

impl DueRow {
    fn split(self) -> Result<DueDelivery, StoreError> {
        Ok(DueDelivery {
            delivery: Delivery {
                event_seq: self.event_seq,
                event_id: self.id,
                kind: self.kind,
                sink: self.sink,
                key_id: self.key_id,
                state: DeliveryState::parse(&self.state)?,
                attempts: self.attempts,
                last_status: self.last_status,
                last_error: self.last_error,
                created_at: self.created_at,
                next_attempt_at: self.next_attempt_at,
                last_attempt_at: self.last_attempt_at,
            },
            body: self.body,
        })
    }
}

/// Deliveries with their event's id, type and body.
fn with_events() -> Select<event_delivery::Entity> {
    use event_delivery::Column as D;
    event_delivery::Entity::find()
        .select_only()
        .columns([
            D::EventSeq,
            D::Sink,
            D::KeyId,
            D::State,
            D::Attempts,
            D::LastStatus,
            D::LastError,
            D::CreatedAt,
            D::NextAttemptAt,
            D::LastAttemptAt,
        ])
        .column(key_event::Column::Id)
        .column_as(key_event::Column::Kind, "kind")
        .column(key_event::Column::Body)
        .join(
            sea_orm::JoinType::InnerJoin,
            event_delivery::Entity::belongs_to(key_event::Entity)
                .from(D::EventSeq)
                .to(key_event::Column::Seq)
                .into(),
        )
}

impl Store {
    /// Up to `limit` of `sink`'s pending deliveries that are due at `now`,
    /// oldest first, leaving out every key that has an earlier delivery
    /// waiting for a retry: per key, events go out in order.
    pub async fn due_deliveries(
        &self,
        sink: &str,
        now: DateTime<Utc>,
        limit: u64,
    ) -> Result<Vec<DueDelivery>, StoreError> {
        use event_delivery::Column as D;
        let pending = DeliveryState::Pending.as_str();
        let waiting = Query::select()
            .column(D::KeyId)
            .from(event_delivery::Entity)
            .and_where(D::Sink.eq(sink))
            .and_where(D::State.eq(pending))
            .and_where(D::NextAttemptAt.gt(now))
            .to_owned();
        self.count_read();
        with_events()
            .filter(D::Sink.eq(sink))
            .filter(D::State.eq(pending))
            .filter(D::NextAttemptAt.lte(now))
            .filter(
                Condition::all().add(Expr::col((event_delivery::Entity, D::KeyId)).not_in_subquery(waiting)),
            )
            .order_by_asc(D::EventSeq)
            .limit(limit)
            .into_model::<DueRow>()
            .all(self.db())
            .await?
            .into_iter()
            .map(DueRow::split)
            .collect()
    }

    /// Records that `sink` took these events.
    pub async fn mark_delivered(
        &self,
        sink: &str,
        seqs: &[i64],
        status: Option<i32>,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        use event_delivery::Column as D;
        for chunk in seqs.chunks(500) {
            self.count(1);
            event_delivery::Entity::update_many()
                .col_expr(D::State, Expr::value(DeliveryState::Delivered.as_str()))
                .col_expr(D::Attempts, Expr::col(D::Attempts).add(1))
                .col_expr(D::LastStatus, Expr::value(status))
                .col_expr(D::LastError, Expr::value(Option::<String>::None))
                .col_expr(D::LastAttemptAt, Expr::value(Some(now)))
                .filter(D::Sink.eq(sink))
                .filter(D::EventSeq.is_in(chunk.iter().copied()))
                .exec(self.db())
                .await?;
        }
        Ok(())
    }

    /// Records a failed attempt: tried again at `retry_at`, or, with
    /// `None`, given up (`failed`).
    pub async fn mark_attempt_failed(
        &self,
        sink: &str,
        seq: i64,
        status: Option<i32>,
        error: &str,
        now: DateTime<Utc>,
        retry_at: Option<DateTime<Utc>>,
    ) -> Result<(), StoreError> {
        use event_delivery::Column as D;
        let state = if retry_at.is_some() { DeliveryState::Pending } else { DeliveryState::Failed };
        self.count(1);
        event_delivery::Entity::update_many()
            .col_expr(D::State, Expr::value(state.as_str()))
            .col_expr(D::Attempts, Expr::col(D::Attempts).add(1))
            .col_expr(D::LastStatus, Expr::value(status))
            .col_expr(D::LastError, Expr::value(Some(error.to_owned())))
            .col_expr(D::LastAttemptAt, Expr::value(Some(now)))
            .col_expr(D::NextAttemptAt, Expr::value(retry_at.unwrap_or(now)))
            .filter(D::Sink.eq(sink))
            .filter(D::EventSeq.eq(seq))
            .exec(self.db())
            .await?;
        Ok(())
    }

    /// Queues `event_id` for `sink` again, from scratch; `false` if the
    /// event was never queued for it.
    pub async fn redeliver(
        &self,
        sink: &str,
        event_id: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        use event_delivery::Column as D;
        let Some(event) = self.find_event(None, event_id).await? else {
            return Ok(false);
        };
        self.count(1);
        let updated = event_delivery::Entity::update_many()
            .col_expr(D::State, Expr::value(DeliveryState::Pending.as_str()))
            .col_expr(D::Attempts, Expr::value(0))
            .col_expr(D::CreatedAt, Expr::value(now))
            .col_expr(D::NextAttemptAt, Expr::value(now))
            .filter(D::Sink.eq(sink))
            .filter(D::EventSeq.eq(event.seq))
            .exec(self.db())
            .await?
            .rows_affected;
        Ok(updated == 1)
    }

    /// `sink`'s deliveries, newest event first, before `before` (a seq).
    pub async fn list_deliveries(
        &self,
        sink: &str,
        before: Option<i64>,
        limit: u64,
    ) -> Result<Vec<Delivery>, StoreError> {
        use event_delivery::Column as D;
        let mut query = with_events().filter(D::Sink.eq(sink));
        if let Some(before) = before {
            query = query.filter(D::EventSeq.lt(before));
        }
        self.count_read();
        query
            .order_by_desc(D::EventSeq)
            .limit(limit)
            .into_model::<DueRow>()
            .all(self.db())
            .await?
            .into_iter()
            .map(|row| row.split().map(|due| due.delivery))
            .collect()
    }

    /// Forgets every delivery to `sink` (its endpoint is gone).
    pub(super) async fn drop_deliveries<C: ConnectionTrait>(db: &C, sink: &str) -> Result<(), StoreError> {
        event_delivery::Entity::delete_many().filter(event_delivery::Column::Sink.eq(sink)).exec(db).await?;
        Ok(())
    }

    /// Per sink, pending deliveries and the oldest one's queueing time;
    /// events not yet fanned out count for `unplaced`.
    pub async fn event_backlog(&self) -> Result<Vec<Backlog>, StoreError> {
        use event_delivery::Column as D;
        #[derive(Debug, FromQueryResult)]
        struct Row {
            sink: String,
            n: i64,
            oldest: Option<DateTime<Utc>>,
        }
        self.count(2);
        let mut backlog: Vec<Backlog> = event_delivery::Entity::find()
            .select_only()
            .column(D::Sink)
            .column_as(Expr::from(Func::count(Expr::col(D::EventSeq))), "n")
            .column_as(Expr::from(Func::min(Expr::col(D::CreatedAt))), "oldest")
            .filter(D::State.eq(DeliveryState::Pending.as_str()))
            .group_by(D::Sink)
            .into_model::<Row>()
            .all(self.db())
            .await?
            .into_iter()
            .map(|r| Backlog { sink: r.sink, pending: u64::try_from(r.n).unwrap_or(0), oldest: r.oldest })
            .collect();
        #[derive(Debug, FromQueryResult)]
        struct Unplaced {
            n: i64,
            oldest: Option<DateTime<Utc>>,
        }
        let unplaced = key_event::Entity::find()
            .select_only()
            .column_as(Expr::from(Func::count(Expr::col(key_event::Column::Seq))), "n")
            .column_as(Expr::from(Func::min(Expr::col(key_event::Column::Time))), "oldest")
            .filter(key_event::Column::Position.is_null())
            .into_model::<Unplaced>()
            .one(self.db())
            .await?;
        if let Some(u) = unplaced {
            backlog.push(Backlog {
                sink: "unplaced".into(),
                pending: u64::try_from(u.n).unwrap_or(0),
                oldest: u.oldest,
            });
        }
        Ok(backlog)
    }
}
