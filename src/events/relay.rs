//! The relay: one replica at a time (the holder of the `event-relay`
//! lease) places new outbox rows in order, queues one delivery per sink,
//! and delivers what is due: to NATS JetStream and to each webhook
//! endpoint, oldest first and never past an undelivered earlier event of
//! the same key. A replica that dies loses its lease when it lapses, and
//! the next replica to claim it carries on where the rows say.
//!
//! Every replica also reads the backlog per sink now and then, for the
//! metrics that say whether events are getting out.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use chrono::{DateTime, Utc};
use tokio::time::Instant;

use super::{
    nats::NatsSink,
    webhook::{self, Answer, Poster, SigningSecret},
};
use crate::{
    clock::DbClock,
    config::EventSettings,
    keys::{PepperId, hash::SubkeyMacs},
    store::{
        Store, StoreError,
        deliveries::{Backlog, DueDelivery},
        events::StoredEvent,
        webhooks::WebhookEndpoint,
    },
    task::{Stop, Task},
};

/// The lease's name in `event_leases`.
pub const LEASE: &str = "event-relay";
/// The NATS sink's name in `event_deliveries`.
pub const NATS_SINK: &str = "nats";
/// Rows read at once.
const BATCH: u64 = 500;
/// How often every replica reads the backlog for the metrics.
const BACKLOG_EVERY: Duration = Duration::from_secs(5);
/// How often the deliverer deletes events past their retention.
const PRUNE_EVERY: Duration = Duration::from_secs(600);
const LONGEST_RETRY: Duration = Duration::from_secs(3_600);

/// How long to wait after a delivery's `attempts`-th failed attempt: one
/// second, doubling, at most an hour.
pub fn retry_delay(attempts: i32) -> Duration {
    super::doubling_backoff(u32::try_from(attempts).unwrap_or(0), LONGEST_RETRY)
}

/// When a delivery that failed now is tried again, or `None` once its time
/// budget (`max_age` since it was queued) is spent.
pub fn next_attempt(
    attempts: i32,
    queued: DateTime<Utc>,
    now: DateTime<Utc>,
    max_age: Duration,
) -> Option<DateTime<Utc>> {
    let give_up = queued + chrono::Duration::from_std(max_age).unwrap_or(chrono::Duration::MAX);
    if now >= give_up {
        return None;
    }
    let retry = now + chrono::Duration::from_std(retry_delay(attempts)).unwrap_or(chrono::Duration::MAX);
    Some(retry.min(give_up))
}

/// A sink, its pending deliveries and the oldest one's age in seconds.
type SinkBacklog = (String, u64, Option<f64>);

/// What the metrics show of the relay.
#[derive(Debug, Default)]
pub struct EventStats {
    /// The backlog as last read, ages as of then, and when that was.
    backlog: Mutex<(Option<Instant>, Vec<SinkBacklog>)>,
    /// Whether this replica holds the lease.
    pub leading: AtomicBool,
    pub delivered: AtomicU64,
    pub failed_attempts: AtomicU64,
}

impl EventStats {
    /// Per sink: pending deliveries and the age of the oldest now, in
    /// seconds.
    pub fn backlog(&self) -> Vec<(String, u64, f64)> {
        let backlog = self.backlog.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let since = backlog.0.map_or(0.0, |read| read.elapsed().as_secs_f64());
        backlog
            .1
            .iter()
            .map(|(sink, pending, age)| (sink.clone(), *pending, age.map_or(0.0, |a| a + since)))
            .collect()
    }

    fn set_backlog(&self, backlog: Vec<Backlog>, now: DateTime<Utc>) {
        let ages = backlog
            .into_iter()
            .map(|b| {
                let age = b.oldest.map(|t| (now - t).num_milliseconds().max(0) as f64 / 1_000.0);
                (b.sink, b.pending, age)
            })
            .collect();
        *self.backlog.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
            (Some(Instant::now()), ages);
    }
}

/// One replica's relay.
#[derive(Debug)]
pub struct Relay {
    store: Store,
    clock: Arc<DbClock>,
    settings: EventSettings,
    holder: String,
    macs: SubkeyMacs,
    tls: Arc<rustls::ClientConfig>,
    stats: Arc<EventStats>,
    /// Sinks whose trouble has been logged: once per outage, not per tick.
    troubled: Mutex<HashSet<String>>,
}

/// What a run keeps between ticks: open connections, and when the lease
/// was last claimed.
#[derive(Debug, Default)]
struct Connections {
    nats: Option<NatsSink>,
    posters: HashMap<String, Poster>,
    claimed: Option<Instant>,
    pruned: Option<Instant>,
}

impl Relay {
    /// `macs` unseal webhook signing secrets.
    pub fn new(
        store: Store,
        clock: Arc<DbClock>,
        settings: EventSettings,
        macs: SubkeyMacs,
        stats: Arc<EventStats>,
    ) -> Arc<Self> {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "replica".into());
        let holder = format!("{host}/{}", uuid::Uuid::now_v7());
        Arc::new(Self {
            store,
            clock,
            settings,
            holder,
            macs,
            tls: webhook::client_tls(),
            stats,
            troubled: Mutex::default(),
        })
    }

    pub fn task(self: &Arc<Self>) -> Task {
        let relay = Arc::clone(self);
        Task::helper("event relay", move |stop| Arc::clone(&relay).run(stop))
    }

    async fn run(self: Arc<Self>, mut stop: Stop) {
        let mut connections =
            Connections { nats: self.settings.nats.clone().map(NatsSink::new), ..Default::default() };
        let mut backlog_due = Instant::now();
        let mut complained = false;
        loop {
            if Instant::now() >= backlog_due {
                backlog_due = Instant::now() + BACKLOG_EVERY;
                match self.store.event_backlog().await {
                    Ok(backlog) => self.stats.set_backlog(backlog, self.clock.now()),
                    Err(e) => tracing::debug!(error = %e, "event backlog not read"),
                }
            }
            match self.tick(&mut connections).await {
                Ok(()) => complained = false,
                // Once per outage: the backlog metric and its alert say the rest.
                Err(e) if !complained => {
                    complained = true;
                    tracing::warn!(error = %e, "event relay failed; retrying");
                }
                Err(_) => {}
            }
            tokio::select! {
                () = &mut stop => break,
                () = tokio::time::sleep(self.settings.poll_interval) => {}
            }
        }
        if self.stats.leading.swap(false, Ordering::Relaxed) {
            // Hand over at once rather than after the lease lapses.
            let _ = self.store.release_lease(LEASE, &self.holder, self.clock.now()).await;
        }
    }

    async fn tick(self: &Arc<Self>, connections: &mut Connections) -> Result<(), StoreError> {
        let started = Instant::now();
        // The lease is claimed (or renewed) a third of the way through it.
        if connections.claimed.is_none_or(|at| at.elapsed() >= self.settings.lease / 3) {
            let lease =
                chrono::Duration::from_std(self.settings.lease).unwrap_or(chrono::Duration::seconds(30));
            let leading = self.store.claim_lease(LEASE, &self.holder, self.clock.now(), lease).await?;
            connections.claimed = Some(started);
            if self.stats.leading.swap(leading, Ordering::Relaxed) != leading {
                tracing::info!(holder = %self.holder, leading, "event relay lease");
            }
        }
        if !self.stats.leading.load(Ordering::Relaxed) {
            return Ok(());
        }
        // Deliveries stop well before the lease could lapse under them.
        let budget = started + self.settings.lease / 3;
        self.place(connections.nats.is_some()).await?;
        if let Some(retention) = self.settings.retention
            && connections.pruned.is_none_or(|at| at.elapsed() >= PRUNE_EVERY)
        {
            connections.pruned = Some(started);
            self.prune(retention, budget).await?;
        }
        let hooks = self.store.list_webhooks().await?;
        connections.posters.retain(|id, _| hooks.iter().any(|h| &h.id == id));
        let mut running = tokio::task::JoinSet::new();
        for hook in hooks {
            let poster = connections.posters.remove(&hook.id);
            let relay = Arc::clone(self);
            running.spawn(async move {
                let mut poster = match poster {
                    Some(poster) => poster,
                    None => match webhook::check_url(&hook.url, relay.settings.webhook_allow_http) {
                        Ok(uri) => Poster::new(uri, Arc::clone(&relay.tls), relay.settings.webhook_timeout),
                        Err(why) => {
                            relay.trouble(&hook.sink(), Some(&format!("the URL is unusable: {why}")));
                            return (hook.id, None, Ok(()));
                        }
                    },
                };
                let done = relay.deliver_webhook(&hook, &mut poster, budget).await;
                (hook.id, Some(poster), done)
            });
        }
        let mut result = match connections.nats.as_mut() {
            Some(nats) => self.deliver_nats(nats, budget).await,
            None => Ok(()),
        };
        while let Some(joined) = running.join_next().await {
            if let Ok((id, poster, done)) = joined {
                if let Some(poster) = poster {
                    connections.posters.insert(id, poster);
                }
                result = result.and(done);
            }
        }
        result
    }

    /// Logs `sink`'s trouble when it starts (`Some(why)`) and when it ends
    /// (`None`), not at every tick in between: the backlog metric and its
    /// alert say how long it lasts.
    fn trouble(&self, sink: &str, why: Option<&str>) {
        let mut troubled = self.troubled.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match why {
            Some(why) if troubled.insert(sink.to_owned()) => {
                tracing::warn!(sink, why, "events held for a sink; retrying");
            }
            None if troubled.remove(sink) => tracing::info!(sink, "events flowing to the sink again"),
            _ => {}
        }
    }

    /// Deletes delivered events past `retention`, a batch at a time.
    async fn prune(&self, retention: Duration, budget: Instant) -> Result<(), StoreError> {
        let before =
            self.clock.now() - chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::MAX);
        let mut deleted = 0;
        while Instant::now() < budget {
            let n = self.store.prune_events(before, 1_000).await?;
            deleted += n;
            if n < 1_000 {
                break;
            }
        }
        if deleted > 0 {
            tracing::info!(deleted, "lifecycle events past their retention deleted");
        }
        Ok(())
    }

    /// Places every new event and queues its deliveries. The endpoints are
    /// read after the events: an endpoint gets every event that committed
    /// after it was created.
    async fn place(&self, nats: bool) -> Result<(), StoreError> {
        loop {
            let events = self.store.unplaced_events(BATCH).await?;
            if events.is_empty() {
                return Ok(());
            }
            let full = events.len() as u64 == BATCH;
            let hooks = self.store.list_webhooks().await?;
            self.store.fan_out(&events, |event: &StoredEvent| sinks(event, &hooks, nats)).await?;
            if !full {
                return Ok(());
            }
        }
    }

    async fn deliver_nats(&self, nats: &mut NatsSink, budget: Instant) -> Result<(), StoreError> {
        while Instant::now() < budget {
            let due = self.store.due_deliveries(NATS_SINK, self.clock.now(), BATCH).await?;
            let mut sent = Vec::with_capacity(due.len());
            let mut failure = None;
            for d in &due {
                if Instant::now() >= budget {
                    break;
                }
                match nats.publish(&d.delivery.kind, &d.delivery.event_id, &d.body).await {
                    Ok(()) => sent.push(d.delivery.event_seq),
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                }
            }
            self.store.mark_delivered(NATS_SINK, &sent, None, self.clock.now()).await?;
            self.stats.delivered.fetch_add(sent.len() as u64, Ordering::Relaxed);
            if let Some(e) = failure {
                // JetStream is down or refusing: everything after waits, in
                // order, for the next tick.
                self.stats.failed_attempts.fetch_add(1, Ordering::Relaxed);
                self.trouble(NATS_SINK, Some(&e));
                return Ok(());
            }
            if !sent.is_empty() {
                self.trouble(NATS_SINK, None);
            }
            if (due.len() as u64) < BATCH {
                return Ok(());
            }
        }
        Ok(())
    }

    async fn deliver_webhook(
        &self,
        hook: &WebhookEndpoint,
        poster: &mut Poster,
        budget: Instant,
    ) -> Result<(), StoreError> {
        let sink = hook.sink();
        let secret = PepperId::parse(&hook.pepper)
            .map_err(|_| format!("endpoint {} names a malformed pepper", hook.id))
            .and_then(|pepper| {
                SigningSecret::unseal(&self.macs, &hook.id, &pepper, &hook.sealed_secret)
                    .map_err(|e| e.to_string())
            });
        let secret = match secret {
            Ok(secret) => {
                self.trouble(&sink, None);
                secret
            }
            Err(why) => {
                self.trouble(&sink, Some(&format!("the signing secret cannot be unsealed: {why}")));
                return Ok(());
            }
        };
        while Instant::now() < budget && !poster.resting() {
            let due = self.store.due_deliveries(&sink, self.clock.now(), BATCH).await?;
            if due.is_empty() {
                return Ok(());
            }
            let mut blocked = HashSet::new();
            let mut delivered = Recorded::default();
            let mut progress = false;
            for d in &due {
                if Instant::now() >= budget {
                    break;
                }
                if blocked.contains(&d.delivery.key_id) {
                    continue;
                }
                progress = true;
                match self.post(poster, &secret, d).await {
                    Answer::Status(status) if (200..300).contains(&status) => {
                        delivered.add(status, d.delivery.event_seq);
                        if delivered.due() {
                            self.record(&sink, &mut delivered).await?;
                        }
                    }
                    answer => {
                        blocked.insert(d.delivery.key_id.clone());
                        let unanswered = matches!(answer, Answer::Failed(_));
                        self.failed(&sink, d, answer).await?;
                        if unanswered {
                            // Down for every key, not just this one.
                            break;
                        }
                    }
                }
            }
            self.record(&sink, &mut delivered).await?;
            if !progress || (due.len() as u64) < BATCH {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Writes down the deliveries made since the last time.
    async fn record(&self, sink: &str, delivered: &mut Recorded) -> Result<(), StoreError> {
        for (status, seqs) in std::mem::take(&mut delivered.by_status) {
            self.store.mark_delivered(sink, &seqs, Some(i32::from(status)), self.clock.now()).await?;
            self.stats.delivered.fetch_add(seqs.len() as u64, Ordering::Relaxed);
        }
        delivered.since = Instant::now();
        delivered.count = 0;
        Ok(())
    }

    async fn post(&self, poster: &mut Poster, secret: &SigningSecret, d: &DueDelivery) -> Answer {
        let timestamp = self.clock.now().timestamp();
        poster.post(secret, &d.delivery.event_id, timestamp, &d.body).await
    }

    async fn failed(&self, sink: &str, d: &DueDelivery, answer: Answer) -> Result<(), StoreError> {
        self.stats.failed_attempts.fetch_add(1, Ordering::Relaxed);
        let (status, error) = match answer {
            Answer::Status(status) => (Some(i32::from(status)), format!("HTTP {status}")),
            Answer::Failed(why) => (None, why),
        };
        let now = self.clock.now();
        let attempts = d.delivery.attempts + 1;
        let retry_at = next_attempt(attempts, d.delivery.created_at, now, self.settings.webhook_max_age);
        if retry_at.is_none() {
            tracing::warn!(sink, event_id = %d.delivery.event_id, attempts, "webhook delivery failed for good");
        }
        self.store.mark_attempt_failed(sink, d.delivery.event_seq, status, &error, now, retry_at).await
    }
}

/// Webhook deliveries made and not yet written down. They are written every
/// [`RECORD_EVERY`] deliveries or [`RECORD_AFTER`]: what a deliverer that
/// dies sends again is bounded by that, not by its batch.
#[derive(Debug)]
struct Recorded {
    by_status: BTreeMap<u16, Vec<i64>>,
    count: usize,
    since: Instant,
}

const RECORD_EVERY: usize = 32;
const RECORD_AFTER: Duration = Duration::from_millis(200);

impl Default for Recorded {
    fn default() -> Self {
        Self { by_status: BTreeMap::new(), count: 0, since: Instant::now() }
    }
}

impl Recorded {
    fn add(&mut self, status: u16, seq: i64) {
        self.by_status.entry(status).or_default().push(seq);
        self.count += 1;
    }

    fn due(&self) -> bool {
        self.count >= RECORD_EVERY || self.since.elapsed() >= RECORD_AFTER
    }
}

/// The sinks an event goes to: NATS if configured, and every endpoint
/// that wants its type and merchant.
fn sinks(event: &StoredEvent, hooks: &[WebhookEndpoint], nats: bool) -> Vec<String> {
    let mut sinks: Vec<String> = hooks
        .iter()
        .filter(|h| h.wants(&event.kind, &event.merchant_id))
        .map(WebhookEndpoint::sink)
        .collect();
    if nats {
        sinks.push(NATS_SINK.to_owned());
    }
    sinks
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::disallowed_methods)]

    use super::*;

    #[test]
    fn retries_wait_a_second_then_double_up_to_an_hour() {
        let waits: Vec<u64> = (1..=14).map(|n| retry_delay(n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 3600, 3600]);
        assert_eq!(retry_delay(i32::MAX).as_secs(), 3600);
    }

    #[test]
    fn a_delivery_is_given_up_when_its_day_is_spent() {
        let queued = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let day = Duration::from_secs(86_400);
        let soon = queued + chrono::Duration::seconds(10);
        assert_eq!(next_attempt(3, queued, soon, day), Some(soon + chrono::Duration::seconds(4)));
        let late = queued + chrono::Duration::seconds(86_000);
        assert_eq!(next_attempt(20, queued, late, day), Some(queued + chrono::Duration::seconds(86_400)));
        assert_eq!(next_attempt(21, queued, queued + chrono::Duration::seconds(86_400), day), None);
    }

    #[test]
    fn endpoints_take_the_types_and_merchants_they_asked_for() {
        let hook = |types: &[&str], merchant: &str| WebhookEndpoint {
            id: format!("{types:?}{merchant}"),
            url: "https://x".into(),
            event_types: types.iter().map(|t| (*t).to_owned()).collect(),
            merchant_id: merchant.into(),
            sealed_secret: String::new(),
            pepper: "1".into(),
            created_by: "a".into(),
            created_at: Utc::now(),
        };
        let hooks = [hook(&[], ""), hook(&["key.revoked"], ""), hook(&[], "m2")];
        let event = StoredEvent {
            seq: 1,
            id: "e".into(),
            kind: "key.created".into(),
            merchant_id: "m1".into(),
            key_id: "k".into(),
            time: Utc::now(),
            position: None,
            body: String::new(),
        };
        assert_eq!(sinks(&event, &hooks, true), [hooks[0].sink(), NATS_SINK.to_owned()]);
        let revoked = StoredEvent { kind: "key.revoked".into(), merchant_id: "m2".into(), ..event };
        assert_eq!(sinks(&revoked, &hooks, false), [hooks[0].sink(), hooks[1].sink(), hooks[2].sink()]);
    }
}
