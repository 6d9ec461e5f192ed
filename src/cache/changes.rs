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
use crate::{metrics::Metrics, store::CHANGES_CHANNEL};

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
    pub fn new(
        pool: PgPool,
        cache: Option<Arc<VerifyCache>>,
        freshness: Arc<Freshness>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self { pool, cache, freshness, metrics }
    }

    /// LISTENs until `stop`, reconnecting with backoff whenever the
    /// connection is lost.
    pub async fn run(self, stop: impl Future<Output = ()>) {
        tokio::pin!(stop);
        let mut backoff = Duration::from_millis(100);
        let mut first = true;
        loop {
            let listener = tokio::select! {
                () = &mut stop => return,
                connected = self.listen() => connected,
            };
            let mut listener = match listener {
                Ok(l) => l,
                Err(e) => {
                    self.freshness.listener_lost();
                    self.freshness.database_down();
                    tracing::warn!(error = %e, retry_ms = backoff.as_millis() as u64, "change listener cannot connect");
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
            self.freshness.database_up();
            self.freshness.listener_up();
            if first {
                tracing::info!(channel = CHANGES_CHANNEL, "listening for key changes");
                first = false;
            } else {
                self.metrics.listener_reconnects.inc();
                tracing::warn!("change listener reconnected; dropped all cached key state");
            }
            loop {
                let received = tokio::select! {
                    () = &mut stop => return,
                    received = listener.try_recv() => received,
                };
                match received {
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
        listener.listen(CHANGES_CHANNEL).await?;
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
