//! Verify-path settings: the verification cache, guess throttling and the
//! scrypt threads.

use std::time::Duration;

use super::Settings;

/// Guess throttling (see `throttle`).
#[derive(Debug, Clone)]
pub struct ThrottleSettings {
    /// Wrong secrets per lookup prefix per window before its uncached
    /// checks are refused; 0 turns the prefix limit off.
    pub per_prefix: u32,
    /// Wrong secrets per client IP per window; 0 turns the IP limit off.
    pub per_ip: u32,
    pub window: Duration,
}

#[derive(Debug, Clone)]
pub struct CacheSettings {
    /// Most keys whose identity and state are held.
    pub max_keys: u64,
    /// State older than this is re-read even without a change notice: a
    /// backstop for changes made behind the service's back.
    pub state_ttl: Duration,
    pub negative_max: u64,
    pub negative_ttl: Duration,
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self {
            max_keys: 1_000_000,
            state_ttl: Duration::from_secs(300),
            negative_max: 100_000,
            negative_ttl: Duration::from_secs(60),
        }
    }
}

impl Settings {
    pub fn cache(&self) -> CacheSettings {
        CacheSettings {
            max_keys: self.cache_max_keys,
            state_ttl: Duration::from_millis(self.cache_state_ttl_ms),
            negative_max: self.negative_cache_max,
            negative_ttl: Duration::from_millis(self.negative_cache_ttl_ms),
        }
    }

    pub fn throttle(&self) -> ThrottleSettings {
        ThrottleSettings {
            per_prefix: self.throttle_failures_per_prefix,
            per_ip: self.throttle_failures_per_ip,
            window: Duration::from_millis(self.throttle_window_ms.max(1)),
        }
    }

    pub fn hash_workers(&self) -> usize {
        if self.hash_workers > 0 {
            self.hash_workers
        } else {
            std::thread::available_parallelism().map_or(2, usize::from)
        }
    }
}
