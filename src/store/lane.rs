//! Verify's share of database connections ([`DbLane`]): the rest of the
//! pool stays free for KeyAdmin, health checks and the writers, whatever
//! Verify traffic does. Identification's reads and RecordOutcomes' writes
//! share it.

use std::{sync::Arc, time::Duration};

use tokio::sync::{Semaphore, SemaphorePermit};

use crate::service::ServiceError;

/// How many database connections the Verify side may hold at once, and how
/// long a call waits for one.
#[derive(Debug, Clone)]
pub(crate) struct DbLane {
    permits: Arc<Semaphore>,
    wait: Duration,
}

impl DbLane {
    pub(crate) fn new(connections: usize, wait: Duration) -> Self {
        Self { permits: Arc::new(Semaphore::new(connections.max(1))), wait }
    }

    /// One connection's permit; BUSY when none frees up in time.
    pub(crate) async fn acquire(&self) -> Result<SemaphorePermit<'_>, ServiceError> {
        match tokio::time::timeout(self.wait, self.permits.acquire()).await {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_)) => Err(ServiceError::Unavailable("the server is shutting down".into())),
            Err(_) => Err(ServiceError::Busy(
                "Verify's share of database connections is busy; retry with backoff".into(),
            )),
        }
    }
}
