//! How a replica learns that cached key state may be stale, and what it then
//! trusts.
//!
//! On PostgreSQL every key change commits a NOTIFY carrying the key id (see
//! `store::keys`); [`ChangeFeed`] LISTENs and drops that key's cached state.
//! A notice missed is a revocation missed, so [`Freshness`] tracks whether
//! notices are flowing:
//!
//! - listening: cached state is trusted;
//! - not listening, database reachable: state is read from the database on
//!   every Verify (correct, one indexed read) and not cached;
//! - not listening, database unreachable: cached state is served for at most
//!   the staleness bound after notices stopped, then Verify fails closed;
//! - listening again: every cached state is dropped first, since the replica
//!   cannot know what it missed.
//!
//! A listener connection can also die without telling anyone (half-open: the
//! peer or a middlebox gone, nothing closed). So each replica NOTIFYs a
//! channel of its own every heartbeat interval through its regular pool,
//! and a listener that has heard nothing, not even its own heartbeat, for
//! two intervals is declared dead: trust drops to read-through, and the
//! feed reconnects and drops every cached state on return. A dead listener
//! says nothing about the database: its reachability is the health
//! monitor's to judge.
//!
//! On SQLite (one process) changes are announced in-process and the cache is
//! always trusted.

use std::{
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use sea_orm::sqlx::postgres::{PgListener, PgPool};

use super::VerifyCache;
use crate::task::Task;
use crate::{
    metrics::Metrics,
    store::{CHANGES_CHANNEL, Store},
};

/// What cached key state may be used for right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trust {
    /// Change notices are flowing: serve and fill the cache.
    Trusted,
    /// Notices stopped but the database answers: read state from it.
    ReadThrough,
    /// Notices stopped and the database is down, within the staleness bound:
    /// serve what is cached, cache nothing new.
    Stale,
    /// Beyond the staleness bound: cached state is no longer served.
    Expired,
}

#[derive(Debug)]
pub struct Freshness {
    bound: Duration,
    /// When change notices stopped; `None` while they flow.
    stale_since: Mutex<Option<Instant>>,
    /// When the database stopped answering; `None` while it answers.
    db_down_since: Mutex<Option<Instant>>,
    listening: AtomicBool,
}

impl Freshness {
    /// For SQLite: changes are in-process, so state is always current.
    pub fn in_process(bound: Duration) -> Arc<Self> {
        Arc::new(Self {
            bound,
            stale_since: Mutex::new(None),
            db_down_since: Mutex::new(None),
            listening: AtomicBool::new(true),
        })
    }

    /// For PostgreSQL: stale until the change listener is up.
    pub fn awaiting_listener(bound: Duration) -> Arc<Self> {
        Arc::new(Self {
            bound,
            stale_since: Mutex::new(Some(Instant::now())),
            db_down_since: Mutex::new(None),
            listening: AtomicBool::new(false),
        })
    }

    pub fn trust(&self) -> Trust {
        if self.listening.load(Ordering::Acquire) {
            return Trust::Trusted;
        }
        let since =
            self.stale_since.lock().unwrap_or_else(PoisonError::into_inner).unwrap_or_else(Instant::now);
        if since.elapsed() >= self.bound {
            Trust::Expired
        } else if self.db_down_since.lock().unwrap_or_else(PoisonError::into_inner).is_some() {
            Trust::Stale
        } else {
            Trust::ReadThrough
        }
    }

    pub fn trusted(&self) -> bool {
        self.listening.load(Ordering::Acquire)
    }

    /// Notices stopped (the listener's connection was lost).
    pub fn listener_lost(&self) {
        self.listening.store(false, Ordering::Release);
        self.stale_since.lock().unwrap_or_else(PoisonError::into_inner).get_or_insert_with(Instant::now);
    }

    /// Notices flow again. Call only after dropping all cached state.
    pub fn listener_up(&self) {
        *self.stale_since.lock().unwrap_or_else(PoisonError::into_inner) = None;
        self.listening.store(true, Ordering::Release);
    }

    pub fn database_down(&self) {
        self.db_down_since.lock().unwrap_or_else(PoisonError::into_inner).get_or_insert_with(Instant::now);
    }

    pub fn database_up(&self) {
        *self.db_down_since.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }

    pub fn database_reachable(&self) -> bool {
        self.db_down_since.lock().unwrap_or_else(PoisonError::into_inner).is_none()
    }

    /// Health: SERVING while the database answers, or for the staleness bound
    /// after it stopped (cached keys still verify); NOT_SERVING after that.
    pub fn serving(&self) -> bool {
        match *self.db_down_since.lock().unwrap_or_else(PoisonError::into_inner) {
            None => true,
            Some(since) => since.elapsed() < self.bound,
        }
    }
}

/// The PostgreSQL change listener: one task per replica.
#[derive(Debug)]
pub struct ChangeFeed {
    pool: PgPool,
    cache: Option<Arc<VerifyCache>>,
    freshness: Arc<Freshness>,
    metrics: Arc<Metrics>,
    /// Where heartbeats are sent from: the regular pool, not the listener.
    store: Store,
    heartbeat: Duration,
    /// This replica's own heartbeat channel.
    own_channel: String,
}

/// NOTIFYs `channel` every `every` through the regular pool. A failure is
/// not the listener's (the health monitor judges the database): it only
/// means no heartbeat this time.
async fn heartbeats(store: Store, channel: String, every: Duration) {
    let mut beat = tokio::time::interval(every);
    loop {
        beat.tick().await;
        match tokio::time::timeout(every, store.notify(&channel)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "heartbeat not sent"),
            Err(_) => tracing::debug!("heartbeat not sent in time"),
        }
    }
}

/// A parsed notice: `<key id> <version> <sent at, µs since the epoch>`.
fn parse(payload: &str) -> Option<(&str, i64, i64)> {
    let mut parts = payload.split(' ');
    let key_id = parts.next().filter(|k| !k.is_empty())?;
    let version = parts.next()?.parse().ok()?;
    let sent = parts.next()?.parse().ok()?;
    Some((key_id, version, sent))
}

impl ChangeFeed {
    /// The feed as a background task: each run listens on a new
    /// connection, and while it is down the cache cannot be trusted to be
    /// current (notices may be missed until it listens again).
    pub fn task(
        pool: PgPool,
        cache: Option<Arc<VerifyCache>>,
        freshness: Arc<Freshness>,
        metrics: Arc<Metrics>,
        store: Store,
        heartbeat: Duration,
    ) -> Task {
        let lost = Arc::clone(&freshness);
        Task::helper("change feed", move |stop| {
            Self::new(
                pool.clone(),
                cache.clone(),
                Arc::clone(&freshness),
                Arc::clone(&metrics),
                store.clone(),
                heartbeat,
            )
            .run(stop)
        })
        .on_down(move || lost.listener_lost())
    }

    /// `heartbeat`: how often this replica NOTIFYs its own channel; two
    /// intervals without any notice and the listener is declared dead.
    pub fn new(
        pool: PgPool,
        cache: Option<Arc<VerifyCache>>,
        freshness: Arc<Freshness>,
        metrics: Arc<Metrics>,
        store: Store,
        heartbeat: Duration,
    ) -> Self {
        let own_channel = format!("keywarden_heartbeat_{}", uuid::Uuid::now_v7().simple());
        Self { pool, cache, freshness, metrics, store, heartbeat, own_channel }
    }

    /// LISTENs until `stop`, reconnecting with backoff whenever the
    /// connection is lost.
    pub async fn run(self, stop: impl Future<Output = ()>) {
        tokio::pin!(stop);
        let mut backoff = Duration::from_millis(100);
        let mut first = true;
        loop {
            // A connection that hangs (half-open) is given up on like one
            // that fails.
            let listener = tokio::select! {
                () = &mut stop => return,
                connected = tokio::time::timeout(self.heartbeat * 2, self.listen()) => connected,
            };
            let mut listener = match listener {
                Ok(Ok(l)) => l,
                failed => {
                    let error = match failed {
                        Ok(Err(e)) => e.to_string(),
                        _ => "timed out".to_owned(),
                    };
                    self.freshness.listener_lost();
                    tracing::warn!(
                        error,
                        retry_ms = backoff.as_millis() as u64,
                        "change listener cannot connect"
                    );
                    tokio::select! {
                        () = &mut stop => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            };
            backoff = Duration::from_millis(100);
            // Listening now; whatever changed before this point is unknown.
            if let Some(cache) = &self.cache {
                cache.invalidate_all();
            }
            self.freshness.listener_up();
            if first {
                tracing::info!(channel = CHANGES_CHANNEL, "listening for key changes");
                first = false;
            } else {
                self.metrics.listener_reconnects.inc();
                tracing::warn!("change listener reconnected; dropped all cached key state");
            }
            // Heartbeats go out from their own task, so that receiving is
            // never cancelled mid-message to send one; the set aborts it
            // with the connection it proves alive.
            let mut beating = tokio::task::JoinSet::new();
            beating.spawn(heartbeats(self.store.clone(), self.own_channel.clone(), self.heartbeat));
            let mut last_heard = tokio::time::Instant::now();
            loop {
                let silent_until = last_heard + self.heartbeat * 2;
                let received = tokio::select! {
                    () = &mut stop => return,
                    received = listener.try_recv() => received,
                    () = tokio::time::sleep_until(silent_until) => {
                        self.freshness.listener_lost();
                        self.metrics.listener_heartbeat_misses.inc();
                        tracing::warn!(
                            silent_ms = last_heard.elapsed().as_millis() as u64,
                            "change listener heard nothing, not even its own heartbeat, for two intervals; reconnecting"
                        );
                        break;
                    }
                };
                last_heard = tokio::time::Instant::now();
                match received {
                    Ok(Some(notice)) if notice.channel() == self.own_channel => {}
                    Ok(Some(notice)) => self.apply(notice.payload()),
                    Ok(None) => {
                        self.freshness.listener_lost();
                        tracing::warn!("change listener lost its connection; reconnecting");
                        break;
                    }
                    Err(e) => {
                        self.freshness.listener_lost();
                        tracing::warn!(error = %e, "change listener failed; reconnecting");
                        break;
                    }
                }
            }
        }
    }

    async fn listen(&self) -> Result<PgListener, sea_orm::sqlx::Error> {
        let mut listener = PgListener::connect_with(&self.pool).await?;
        // Report a lost connection instead of silently reconnecting: the
        // notices missed in between must be accounted for.
        listener.eager_reconnect(false);
        listener.listen_all([CHANGES_CHANNEL, self.own_channel.as_str()]).await?;
        Ok(listener)
    }

    fn apply(&self, payload: &str) {
        let Some((key_id, version, sent)) = parse(payload) else {
            tracing::warn!(payload, "unreadable key change notice; dropping all cached key state");
            if let Some(cache) = &self.cache {
                cache.invalidate_all();
            }
            return;
        };
        if let Some(cache) = &self.cache {
            cache.invalidate(key_id);
        }
        // A measurement across replicas' wall clocks, decided on by nobody.
        #[expect(clippy::disallowed_methods, reason = "a lag metric, not a decision")]
        let lag_us = (chrono::Utc::now().timestamp_micros() - sent).max(0);
        let lag = lag_us as f64 / 1_000_000.0;
        self.metrics.propagation_lag.observe(lag);
        tracing::debug!(key_id, version, propagation_lag_ms = lag * 1000.0, "key change received");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notices_parse_strictly() {
        assert_eq!(parse("k1 3 1700000000000000"), Some(("k1", 3, 1_700_000_000_000_000)));
        for bad in ["", "k1", "k1 x 1", "k1 3", " 3 4"] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn trust_follows_listener_and_database() {
        let f = Freshness::awaiting_listener(Duration::from_millis(50));
        assert_eq!(f.trust(), Trust::ReadThrough);
        f.listener_up();
        assert_eq!(f.trust(), Trust::Trusted);
        f.listener_lost();
        assert_eq!(f.trust(), Trust::ReadThrough);
        f.database_down();
        assert_eq!(f.trust(), Trust::Stale);
        assert!(f.serving());
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(f.trust(), Trust::Expired);
        assert!(!f.serving());
        f.database_up();
        f.listener_up();
        assert_eq!(f.trust(), Trust::Trusted);
        assert!(f.serving());
    }

    #[test]
    fn in_process_is_always_trusted() {
        let f = Freshness::in_process(Duration::from_millis(1));
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(f.trust(), Trust::Trusted);
    }
}
