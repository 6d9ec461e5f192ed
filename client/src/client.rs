//! The Verify call, and the statuses reported back in the background.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::sync::{mpsc, oneshot};
use tonic::{
    Code,
    transport::{Channel, Endpoint},
};

use crate::pb::{self, key_verify_client::KeyVerifyClient};

/// Most outcomes one RecordOutcomes call may carry (the server's limit).
const MAX_BATCH: usize = 1000;
/// Sends of one batch tried before it is given up (and counted).
const REPORT_ATTEMPTS: u32 = 5;

/// How a [`Client`] connects and reports.
#[derive(Debug, Clone)]
pub struct Builder {
    endpoint: Endpoint,
    timeout: Duration,
    connect_timeout: Duration,
    buffer: usize,
    flush_interval: Duration,
}

impl Builder {
    /// Each Verify and RecordOutcomes call's deadline (default 1 s). A
    /// Verify that misses it answers 503: the request is not let through.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How long connecting may take (default 1 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Most outcomes held for reporting (default 10,000); beyond it they are
    /// dropped and counted ([`Client::dropped_outcomes`]), so a keywarden
    /// that is down never costs the service unbounded memory.
    pub fn buffer(mut self, outcomes: usize) -> Self {
        self.buffer = outcomes.max(1);
        self
    }

    /// How often held outcomes are sent (default 1 s); a full batch of
    /// 1,000 goes at once.
    pub fn flush_interval(mut self, interval: Duration) -> Self {
        self.flush_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// The client, connecting on first use. Starts the reporting task, so
    /// it must be called within a Tokio runtime.
    pub fn connect_lazy(self) -> Client {
        let channel =
            self.endpoint.timeout(self.timeout).connect_timeout(self.connect_timeout).connect_lazy();
        let verify = KeyVerifyClient::new(channel);
        let (outcomes, outcomes_rx) = mpsc::channel(self.buffer);
        let (flushes, flushes_rx) = mpsc::channel(8);
        let counters = Arc::new(Counters { capacity: self.buffer, ..Counters::default() });
        let reporter = Reporter {
            verify: verify.clone(),
            counters: Arc::clone(&counters),
            pending: Vec::new(),
            attempts: 0,
        };
        tokio::spawn(reporter.run(outcomes_rx, flushes_rx, self.flush_interval));
        Client { verify, reports: Arc::new(Reports { outcomes, flushes }), counters }
    }
}

/// A keywarden KeyVerify client. Clones share one channel (HTTP/2
/// connection), one outcome buffer and one reporting task.
#[derive(Debug, Clone)]
pub struct Client {
    verify: KeyVerifyClient<Channel>,
    reports: Arc<Reports>,
    counters: Arc<Counters>,
}

#[derive(Debug)]
struct Reports {
    outcomes: mpsc::Sender<pb::Outcome>,
    flushes: mpsc::Sender<oneshot::Sender<()>>,
}

#[derive(Debug, Default)]
struct Counters {
    /// Outcomes reported and not yet sent or given up, at most `capacity`
    /// (whether in the channel or in the reporter's batch).
    held: AtomicUsize,
    capacity: usize,
    reported: AtomicU64,
    dropped: AtomicU64,
    failed: AtomicU64,
}

/// What keywarden decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Allow(Grant),
    Deny(Refusal),
}

/// Why a key was refused.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub reason: pb::DenyReason,
    /// On `DENY_REASON_RATE_LIMITED`, the limit that refused the call.
    pub rate_limit: Option<pb::RateLimitStatus>,
}

/// An allowed request's grant; [`crate::VerifyLayer`] puts it into the
/// request's extensions (axum: `Extension<Grant>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub merchant_id: String,
    pub key_id: String,
    pub key_name: String,
    /// Granted scopes, implications expanded.
    pub scopes: Vec<String>,
    /// The audit row of this use; its status is reported after the response.
    pub audit_id: String,
    /// The key's metadata, as an integrator labelled it (a plan, a team);
    /// never part of keywarden's decision.
    pub metadata: std::collections::HashMap<String, String>,
}

/// Why no decision came back.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// keywarden could not be reached, timed out or could not decide safely.
    #[error("keywarden could not decide: {0}")]
    Unavailable(tonic::Status),
    /// keywarden refused the call itself (an unknown scope in the route
    /// table, a caller not allowed on the verify listener): a
    /// configuration fault of this service.
    #[error("keywarden refused the verification call: {0}")]
    Refused(tonic::Status),
}

impl Client {
    /// A builder for a client of the KeyVerify service at `endpoint`
    /// (TLS, if any, is configured on the endpoint).
    pub fn builder(endpoint: Endpoint) -> Builder {
        Builder {
            endpoint,
            timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(1),
            buffer: 10_000,
            flush_interval: Duration::from_secs(1),
        }
    }

    /// Asks keywarden whether `request`'s key may be used. Every call goes to
    /// the server: nothing is cached here, so a revoked key is refused on
    /// its next use.
    pub async fn verify(&self, request: pb::VerifyRequest) -> Result<Decision, Error> {
        let response = self.verify.clone().verify(request).await.map_err(|status| match status.code() {
            Code::InvalidArgument | Code::PermissionDenied | Code::Unauthenticated | Code::Unimplemented => {
                Error::Refused(status)
            }
            _ => Error::Unavailable(status),
        })?;
        let response = response.into_inner();
        Ok(match response.decision() {
            pb::Decision::Allow => Decision::Allow(Grant {
                merchant_id: response.merchant_id,
                key_id: response.key_id,
                key_name: response.key_name,
                scopes: response.scopes,
                audit_id: response.audit_event_id,
                metadata: response.metadata,
            }),
            // An unknown decision is not an allow.
            _ => Decision::Deny(Refusal { reason: response.deny_reason(), rate_limit: response.rate_limit }),
        })
    }

    /// Reports the HTTP status answered for an allowed request, in the
    /// background. Never waits: with the buffer full the outcome is
    /// dropped and counted.
    pub fn report(&self, audit_id: String, status: u16) {
        let outcome = pb::Outcome { audit_event_id: audit_id, status: i32::from(status) };
        let counters = &self.counters;
        let room = counters.held.fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
            (held < counters.capacity).then_some(held + 1)
        });
        if room.is_err() || self.reports.outcomes.try_send(outcome).is_err() {
            if room.is_ok() {
                counters.held.fetch_sub(1, Ordering::AcqRel);
            }
            let dropped = self.counters.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if dropped.is_power_of_two() {
                tracing::warn!(dropped_total = dropped, "keywarden outcome buffer full: outcome dropped");
            }
        }
    }

    /// Sends every outcome reported so far, and returns once they are sent
    /// (or their send failed). Call it at shutdown.
    pub async fn flush(&self) {
        let (done, sent) = oneshot::channel();
        if self.reports.flushes.send(done).await.is_ok() {
            let _ = sent.await;
        }
    }

    /// Outcomes keywarden acknowledged.
    pub fn reported_outcomes(&self) -> u64 {
        self.counters.reported.load(Ordering::Relaxed)
    }

    /// Outcomes dropped because the buffer was full.
    pub fn dropped_outcomes(&self) -> u64 {
        self.counters.dropped.load(Ordering::Relaxed)
    }

    /// Outcomes given up after their batch failed to send repeatedly.
    pub fn failed_outcomes(&self) -> u64 {
        self.counters.failed.load(Ordering::Relaxed)
    }
}

/// The background task that batches outcomes into RecordOutcomes calls.
struct Reporter {
    verify: KeyVerifyClient<Channel>,
    counters: Arc<Counters>,
    /// The batch being filled or retried (at most [`MAX_BATCH`]).
    pending: Vec<pb::Outcome>,
    /// Failed sends of the batch in `pending`.
    attempts: u32,
}

impl Reporter {
    async fn run(
        mut self,
        mut outcomes: mpsc::Receiver<pb::Outcome>,
        mut flushes: mpsc::Receiver<oneshot::Sender<()>>,
        interval: Duration,
    ) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let room = MAX_BATCH - self.pending.len();
            tokio::select! {
                received = outcomes.recv_many(&mut self.pending, room), if room > 0 => {
                    if received == 0 {
                        // Every client is gone: what is held goes now.
                        while !self.pending.is_empty() && self.send().await {}
                        return;
                    }
                    if self.pending.len() == MAX_BATCH {
                        self.send().await;
                    }
                }
                _ = ticker.tick() => {
                    self.send().await;
                }
                Some(done) = flushes.recv() => {
                    // Everything reported before the flush was asked for.
                    loop {
                        while self.pending.len() < MAX_BATCH {
                            let Ok(outcome) = outcomes.try_recv() else { break };
                            self.pending.push(outcome);
                        }
                        if self.pending.is_empty() || !self.send().await {
                            break;
                        }
                    }
                    let _ = done.send(());
                }
            }
        }
    }

    /// Sends the pending batch; false if it failed (it is then kept for the
    /// next tick, up to [`REPORT_ATTEMPTS`] sends).
    async fn send(&mut self) -> bool {
        if self.pending.is_empty() {
            return true;
        }
        let request = pb::RecordOutcomesRequest { outcomes: self.pending.clone() };
        match self.verify.record_outcomes(request).await {
            Ok(_) => {
                self.counters.reported.fetch_add(self.pending.len() as u64, Ordering::Relaxed);
                self.counters.held.fetch_sub(self.pending.len(), Ordering::AcqRel);
                self.pending.clear();
                self.attempts = 0;
                true
            }
            Err(status) => {
                self.attempts += 1;
                if self.attempts >= REPORT_ATTEMPTS {
                    let lost = self.pending.len();
                    self.counters.failed.fetch_add(lost as u64, Ordering::Relaxed);
                    self.counters.held.fetch_sub(lost, Ordering::AcqRel);
                    tracing::warn!(error = %status, outcomes = lost, "keywarden RecordOutcomes kept failing: outcomes given up");
                    self.pending.clear();
                    self.attempts = 0;
                } else {
                    tracing::debug!(error = %status, "keywarden RecordOutcomes failed; retrying at the next flush");
                }
                false
            }
        }
    }
}
