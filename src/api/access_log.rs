//! Envoy's access-log stream, `envoy.service.accesslog.v3.AccessLogService/
//! StreamAccessLogs`: the HTTP status Envoy answered for each request Check
//! allowed goes onto that request's audit row, as RecordOutcomes does. An
//! entry names its row by the `audit_id` Check put in its dynamic metadata,
//! which Envoy logs under `envoy.filters.http.ext_authz`
//! ([`AUDIT_ID_NAMESPACE`]). Never by a request header: a client writes
//! those, and on a denied request Check does not overwrite them. Entries
//! without an id, or without a usable status, are counted and skipped.
//!
//! A stream lives as long as Envoy keeps it open, up to its maximum age
//! (`access_log_stream_max_age_ms`) or the start of the drain, when it is
//! ended cleanly and Envoy opens another; the request timeout does not
//! apply to it (`api::lifetime`). It holds at most one batch of outcomes in
//! memory ([`MAX_OUTCOMES`]), written when full, when the stream pauses
//! for [`LINGER`], and whenever and however it ends, cancelled included.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use envoy_types::pb::envoy::service::accesslog::v3::{
    StreamAccessLogsMessage, StreamAccessLogsResponse, access_log_service_server::AccessLogService,
    stream_access_logs_message::LogEntries,
};
use tokio::sync::watch;
use tonic::{Request, Response, Status, Streaming};

use crate::service::{outcomes::MAX_OUTCOMES, verify::Verifier};
use envoy_types::pb::{envoy::data::accesslog::v3::HttpAccessLogEntry, google::protobuf::value::Kind};

/// The filter-metadata namespace Envoy files ext_authz's dynamic metadata
/// under.
pub const AUDIT_ID_NAMESPACE: &str = "envoy.filters.http.ext_authz";

/// The audit id Check gave this request, as Envoy logged it.
fn audit_id(entry: &mut HttpAccessLogEntry) -> Option<String> {
    let metadata = entry.common_properties.as_mut()?.metadata.as_mut()?;
    let fields = &mut metadata.filter_metadata.get_mut(AUDIT_ID_NAMESPACE)?.fields;
    match fields.remove("audit_id")?.kind? {
        Kind::StringValue(id) => Some(id),
        _ => None,
    }
}

/// How long a partial batch waits for more entries before it is written.
pub const LINGER: Duration = Duration::from_millis(100);

#[derive(Debug, Default)]
pub struct AccessLogCounters {
    /// Entries whose status was handed to the audit trail.
    pub recorded: AtomicU64,
    /// Entries without an audit id or a usable status.
    pub skipped: AtomicU64,
    /// Outcomes lost because their batch could not be written.
    pub failed: AtomicU64,
}

#[derive(Debug, Clone)]
pub struct AccessLogSink {
    verifier: Arc<Verifier>,
    counters: Arc<AccessLogCounters>,
    max_age: Duration,
    draining: watch::Receiver<bool>,
}

impl AccessLogSink {
    /// `counters` are shared with the metrics endpoint; a stream ends after
    /// `max_age`, or when `draining` turns true.
    pub fn new(
        verifier: Arc<Verifier>,
        counters: Arc<AccessLogCounters>,
        max_age: Duration,
        draining: watch::Receiver<bool>,
    ) -> Self {
        Self { verifier, counters, max_age, draining }
    }

    /// Takes a message's HTTP entries into `batch`, writing it whenever it
    /// fills.
    async fn take(&self, message: StreamAccessLogsMessage, batch: &mut Vec<(String, i32)>) {
        let Some(LogEntries::HttpLogs(logs)) = message.log_entries else { return };
        for mut entry in logs.log_entry {
            let id = audit_id(&mut entry);
            let status = entry.response.and_then(|r| r.response_code).map(|c| c.value);
            match (id, status.and_then(|s| i32::try_from(s).ok())) {
                (Some(id), Some(status))
                    if !id.is_empty() && id.len() <= 64 && (100..=599).contains(&status) =>
                {
                    batch.push((id, status));
                    if batch.len() >= MAX_OUTCOMES {
                        self.flush(batch).await;
                    }
                }
                _ => {
                    self.counters.skipped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    async fn flush(&self, batch: &mut Vec<(String, i32)>) {
        if batch.is_empty() {
            return;
        }
        let n = batch.len() as u64;
        match self.verifier.outcomes().record(std::mem::take(batch)).await {
            Ok(_) => {
                self.counters.recorded.fetch_add(n, Ordering::Relaxed);
            }
            Err(e) => {
                self.counters.failed.fetch_add(n, Ordering::Relaxed);
                tracing::warn!(error = %e, outcomes = n, "access-log statuses could not be recorded");
            }
        }
    }
}

/// The outcomes a stream holds and has not written. Whatever ends the
/// stream (its end, an error, the client cancelling, the connection
/// dropping) writes them: on drop they are handed to a task.
struct Held {
    sink: AccessLogSink,
    batch: Vec<(String, i32)>,
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let (sink, mut batch) = (self.sink.clone(), std::mem::take(&mut self.batch));
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { sink.flush(&mut batch).await });
        } else {
            sink.counters.failed.fetch_add(batch.len() as u64, Ordering::Relaxed);
        }
    }
}

#[tonic::async_trait]
impl AccessLogService for AccessLogSink {
    async fn stream_access_logs(
        &self,
        request: Request<Streaming<StreamAccessLogsMessage>>,
    ) -> Result<Response<StreamAccessLogsResponse>, Status> {
        let mut stream = request.into_inner();
        let mut held = Held { sink: self.clone(), batch: Vec::with_capacity(MAX_OUTCOMES) };
        // Past its age, or once the drain starts, the stream ends cleanly
        // and Envoy opens another (on another replica, when draining).
        let ends = tokio::time::sleep(self.max_age);
        tokio::pin!(ends);
        let mut draining = self.draining.clone();
        let drained = async move {
            let _ = draining.wait_for(|d| *d).await;
        };
        tokio::pin!(drained);
        loop {
            tokio::select! {
                () = &mut ends => break,
                () = &mut drained => break,
                next = tokio::time::timeout(LINGER, stream.message()) => match next {
                    Ok(Ok(Some(message))) => self.take(message, &mut held.batch).await,
                    Ok(Ok(None)) => break,
                    Ok(Err(status)) => {
                        self.flush(&mut held.batch).await;
                        return Err(status);
                    }
                    Err(_) => self.flush(&mut held.batch).await,
                },
            }
        }
        self.flush(&mut held.batch).await;
        Ok(Response::new(StreamAccessLogsResponse {}))
    }
}
