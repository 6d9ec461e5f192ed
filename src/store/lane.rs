//! Verify's share of database connections ([`DbLane`]): the rest of the
//! pool stays free for KeyAdmin, health checks and the writers, whatever
//! Verify traffic does. Identification's reads, RecordOutcomes' writes
//! and the fleet credits' seed reads share it.

use std::{sync::Arc, time::Duration};

use thiserror::Error;
use tokio::sync::{Semaphore, SemaphorePermit};

/// Why no connection of the lane was had.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum LaneError {
    #[error("Verify's share of database connections is busy; retry with backoff")]
    Busy,
    #[error("the server is shutting down")]
    Closed,
}

/// How many database connections the Verify side may hold at once, and how
/// long a call waits for one.
#[derive(Debug, Clone)]
pub struct DbLane {
    permits: Arc<Semaphore>,
    wait: Duration,
}

impl DbLane {
    pub fn new(connections: usize, wait: Duration) -> Self {
        Self { permits: Arc::new(Semaphore::new(connections.max(1))), wait }
    }

    /// One connection's permit; busy when none frees up in time.
    pub async fn acquire(&self) -> Result<SemaphorePermit<'_>, LaneError> {
        match tokio::time::timeout(self.wait, self.permits.acquire()).await {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_)) => Err(LaneError::Closed),
            Err(_) => Err(LaneError::Busy),
        }
    }
}
