//! Rollups: Verify calls that belong to no merchant (a malformed key, an
//! unknown prefix, a throttled check) are counted, not queued. Each minute
//! and distinct (reason, ip, endpoint, method, key prefix) is one row with
//! a count, written again with its count so far every few seconds (an
//! upsert on its id, so retries are harmless) until its minute is over.
//!
//! Garbage therefore costs one map update instead of a row in the audit
//! queue, and cannot take the queue's room from real keys' rows. Memory is
//! bounded: past [`MAX_GROUPS`] groups, further calls are counted in one
//! group per minute and reason with the request details left out.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use chrono::{DateTime, DurationRound as _, TimeDelta, Utc};

use super::{AuditKind, AuditRecord, new_event_id};
use crate::task::Task;
use crate::{
    clock::DbClock,
    keys::{Decision, DenyReason},
    store::Store,
};

/// Most groups held at once, open and not yet written.
pub const MAX_GROUPS: usize = 10_000;
/// Endpoints are cut to this many bytes in a rollup's group.
pub const MAX_ENDPOINT: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Group {
    minute: DateTime<Utc>,
    reason: DenyReason,
    ip: Option<std::net::IpAddr>,
    endpoint: Option<String>,
    method: Option<String>,
    prefix: Option<String>,
}

#[derive(Debug)]
struct Tally {
    id: String,
    count: u32,
    written: u32,
    trace_id: Option<String>,
}

/// The open rollups of this replica.
#[derive(Debug, Default)]
pub struct Rollups {
    groups: Mutex<HashMap<Group, Tally>>,
}

fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl Rollups {
    /// Counts a denied call that belongs to no merchant; returns the id of
    /// the rollup row that stands for it.
    pub fn add(&self, row: &AuditRecord, reason: DenyReason) -> String {
        let minute = row.timestamp.duration_trunc(TimeDelta::minutes(1)).unwrap_or(row.timestamp);
        let mut group = Group {
            minute,
            reason,
            ip: row.ip,
            endpoint: row.endpoint.as_deref().map(|e| cut(e, MAX_ENDPOINT).to_owned()),
            method: row.method.clone(),
            prefix: row.key_prefix.clone(),
        };
        let mut groups = self.groups.lock().unwrap_or_else(PoisonError::into_inner);
        // Only a full map needs the extra lookup.
        if groups.len() >= MAX_GROUPS && !groups.contains_key(&group) {
            group = Group { minute, reason, ip: None, endpoint: None, method: None, prefix: None };
        }
        let tally = groups.entry(group).or_insert_with(|| Tally {
            id: new_event_id(),
            count: 0,
            written: 0,
            trace_id: row.trace_id.clone(),
        });
        tally.count = tally.count.saturating_add(1);
        tally.id.clone()
    }

    /// The rows whose count changed since they were last written.
    pub fn due(&self) -> Vec<AuditRecord> {
        let groups = self.groups.lock().unwrap_or_else(PoisonError::into_inner);
        groups
            .iter()
            .filter(|(_, t)| t.count != t.written)
            .map(|(g, t)| AuditRecord {
                id: t.id.clone(),
                ip: g.ip,
                endpoint: g.endpoint.clone(),
                method: g.method.clone(),
                key_prefix: g.prefix.clone(),
                decision: Some(Decision::Deny),
                deny_reason: Some(g.reason),
                status: Some(g.reason.http_status()),
                count: Some(t.count),
                ..AuditRecord::new(AuditKind::VerifyRollup, g.minute, t.trace_id.clone())
            })
            .collect()
    }

    /// Notes `rows` (from [`Rollups::due`]) as stored, and forgets the
    /// groups of minutes before `now`'s that have nothing left to write.
    pub fn written(&self, rows: &[AuditRecord], now: DateTime<Utc>) {
        let minute = now.duration_trunc(TimeDelta::minutes(1)).unwrap_or(now);
        let stored: HashMap<&str, u32> =
            rows.iter().filter_map(|r| Some((r.id.as_str(), r.count?))).collect();
        let mut groups = self.groups.lock().unwrap_or_else(PoisonError::into_inner);
        groups.retain(|g, t| {
            if let Some(count) = stored.get(t.id.as_str()) {
                t.written = *count;
            }
            g.minute >= minute || t.count != t.written
        });
    }

    /// Groups held (open, or not yet written).
    pub fn len(&self) -> usize {
        self.groups.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Rollups {
    /// Writes what changed; on failure, everything stays for the next try.
    async fn write(&self, store: &Store, clock: &DbClock) -> bool {
        let due = self.due();
        if due.is_empty() {
            return true;
        }
        match store.upsert_audit_rows(&due).await {
            Ok(()) => {
                self.written(&due, clock.now());
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, rows = due.len(), "writing audit rollups failed; retrying");
                false
            }
        }
    }

    /// The rollup writer as a background task ([`Rollups::run`]).
    pub fn task(
        self: &Arc<Self>,
        store: Store,
        clock: Arc<DbClock>,
        interval: Duration,
        final_deadline: Duration,
    ) -> Task {
        let rollups = Arc::clone(self);
        Task::flusher("audit rollup writer", "{n} audit rows", move |stop| {
            Arc::clone(&rollups).run(store.clone(), Arc::clone(&clock), interval, stop, final_deadline)
        })
    }

    /// Writes rollups every `interval` until `stop`, then once more (retrying
    /// until `final_deadline` passes). Returns how many rows could not be
    /// written (0 is the only good answer).
    pub async fn run(
        self: Arc<Self>,
        store: Store,
        clock: Arc<DbClock>,
        interval: Duration,
        stop: impl Future<Output = ()>,
        final_deadline: Duration,
    ) -> usize {
        tokio::pin!(stop);
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = &mut stop => break,
                _ = ticker.tick() => {
                    self.write(&store, &clock).await;
                }
            }
        }
        let give_up = tokio::time::Instant::now() + final_deadline;
        let mut backoff = Duration::from_millis(50);
        loop {
            match tokio::time::timeout_at(give_up, self.write(&store, &clock)).await {
                Ok(true) => return 0,
                Ok(false) if tokio::time::Instant::now() + backoff < give_up => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
                _ => {
                    let lost = self.due().len();
                    tracing::error!(rows = lost, "audit rollups could not be written before shutdown");
                    return lost;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    // Tests read the real clock to build their inputs.
    #![allow(clippy::disallowed_methods)]

    use super::*;

    fn call(at: DateTime<Utc>, ip: &str, endpoint: &str) -> AuditRecord {
        AuditRecord {
            ip: Some(ip.parse().unwrap()),
            endpoint: Some(endpoint.into()),
            method: Some("GET".into()),
            ..AuditRecord::new(AuditKind::Verify, at, None)
        }
    }

    #[test]
    fn one_row_per_minute_and_distinct_request_with_its_count() {
        let r = Rollups::default();
        let at = DateTime::parse_from_rfc3339("2026-12-03T12:00:10Z").unwrap().to_utc();
        let a = r.add(&call(at, "203.0.113.1", "/x"), DenyReason::Malformed);
        assert_eq!(r.add(&call(at + TimeDelta::seconds(30), "203.0.113.1", "/x"), DenyReason::Malformed), a);
        let b = r.add(&call(at, "203.0.113.2", "/x"), DenyReason::Malformed);
        let c = r.add(&call(at + TimeDelta::minutes(1), "203.0.113.1", "/x"), DenyReason::Malformed);
        assert!(a != b && a != c && b != c);
        let mut due = r.due();
        due.sort_by_key(|row| (row.timestamp, row.ip));
        let counts: Vec<_> = due.iter().map(|row| (row.id.as_str(), row.count)).collect();
        assert_eq!(counts, [(a.as_str(), Some(2)), (b.as_str(), Some(1)), (c.as_str(), Some(1))]);
        assert_eq!(due[0].timestamp.to_rfc3339(), "2026-12-03T12:00:00+00:00");
        assert_eq!((due[0].kind, due[0].status), (AuditKind::VerifyRollup, Some(401)));
        // Written at 12:01:30: the 12:00 groups are done, 12:01's stays open.
        r.written(&due, at + TimeDelta::seconds(80));
        assert_eq!(r.len(), 1);
        assert!(r.due().is_empty(), "nothing changed since");
        r.add(&call(at + TimeDelta::seconds(70), "203.0.113.1", "/x"), DenyReason::Malformed);
        assert_eq!(r.due()[0].count, Some(2), "written again with its count so far");
    }

    #[test]
    fn distinct_requests_past_the_bound_share_one_group() {
        let r = Rollups::default();
        let at = Utc::now();
        for i in 0..MAX_GROUPS + 500 {
            r.add(
                &call(at, &format!("10.0.{}.{}", i / 256, i % 256), &"/a".repeat(2000)),
                DenyReason::NotFound,
            );
        }
        assert_eq!(r.len(), MAX_GROUPS + 1);
        let due = r.due();
        let overflow = due.iter().find(|row| row.ip.is_none()).expect("the overflow group");
        assert_eq!(overflow.count, Some(500));
        assert!(due.iter().all(|row| row.endpoint.as_ref().is_none_or(|e| e.len() <= MAX_ENDPOINT)));
        assert_eq!(due.iter().map(|row| row.count.unwrap()).sum::<u32>() as usize, MAX_GROUPS + 500);
    }

    #[test]
    fn unwritten_groups_of_past_minutes_are_kept() {
        let r = Rollups::default();
        let at = Utc::now();
        r.add(&call(at, "203.0.113.1", "/x"), DenyReason::Throttled);
        r.written(&[], at + TimeDelta::minutes(5));
        assert_eq!(r.due().len(), 1, "a failed write loses nothing");
    }
}
