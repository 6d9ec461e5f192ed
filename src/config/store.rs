//! Store settings: which database, its connections (and Verify's share),
//! and how its health and the change feed are watched.

use std::time::Duration;

use super::{DATABASE_FILE, Settings};

impl Settings {
    pub fn is_embedded(&self) -> bool {
        self.database_url.as_deref().is_none_or(|u| u.starts_with("sqlite:"))
    }

    pub fn database_url(&self) -> String {
        match &self.database_url {
            Some(url) => url.clone(),
            None => format!("sqlite://{}?mode=rwc", self.data_dir.join(DATABASE_FILE).display()),
        }
    }

    /// Connections Verify may hold at once: the pool less the reserve, at
    /// least one.
    pub fn db_verify_connections(&self) -> usize {
        self.db_max_connections.saturating_sub(self.db_reserved_connections).max(1) as usize
    }

    pub fn db_acquire_timeout(&self) -> Duration {
        Duration::from_millis(self.db_acquire_timeout_ms.max(1))
    }

    pub fn staleness_bound(&self) -> Duration {
        Duration::from_millis(self.staleness_bound_ms)
    }

    pub fn health_check_interval(&self) -> Duration {
        Duration::from_millis(self.health_check_interval_ms.max(10))
    }

    pub fn feed_heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.feed_heartbeat_interval_ms.max(10))
    }
}
