//! Fleet settings: Redis, the secret replicas share through it, warm start,
//! and where rate limits are counted.

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::{ConfigError, Settings};

/// Where per-key rate limits are counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RateLimitMode {
    /// On each replica by itself: exact per replica, N replicas admit N times.
    Local,
    /// Fleet-wide through Redis, each replica holding a small lease of tokens.
    Redis,
}

/// What Redis-mode rate limits do while Redis cannot grant a lease.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnRedisFailure {
    /// Count on this replica alone until Redis answers again.
    #[default]
    Local,
    /// Admit every call a limit would have decided.
    Open,
    /// Refuse them (RATE_LIMITED), as a limit that cannot be checked.
    Closed,
}

/// Shortest fleet secret accepted, in bytes.
pub const MIN_FLEET_SECRET_LEN: usize = 32;

/// The fleet tier (Redis), when configured. Holds secrets: `Debug` shows
/// none of them.
#[derive(Clone)]
pub struct FleetSettings {
    pub redis_url: SecretString,
    pub redis_password: Option<SecretString>,
    pub redis_cluster: bool,
    /// Roots for a `rediss://` server, if not the system's.
    pub redis_ca_pem: Option<Vec<u8>>,
    pub redis_timeout: Duration,
    pub fleet_secret: SecretString,
    pub warm_start_ttl: Duration,
}

impl std::fmt::Debug for FleetSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetSettings")
            .field("redis_cluster", &self.redis_cluster)
            .field("redis_timeout", &self.redis_timeout)
            .field("warm_start_ttl", &self.warm_start_ttl)
            .finish_non_exhaustive()
    }
}

impl Settings {
    /// Where rate limits are counted: `redis` needs `redis_url`.
    pub fn rate_limit_mode(&self) -> Result<RateLimitMode, ConfigError> {
        match (self.rate_limit_mode, &self.redis_url) {
            (Some(RateLimitMode::Redis), None) => Err(ConfigError::Invalid(
                "rate_limit_mode (KEYWARDEN_RATE_LIMIT_MODE) is redis but redis_url is not set".into(),
            )),
            (Some(mode), _) => Ok(mode),
            (None, Some(_)) => Ok(RateLimitMode::Redis),
            (None, None) => Ok(RateLimitMode::Local),
        }
    }

    /// The fleet tier's settings, when Redis is configured.
    pub fn fleet(&self) -> Result<Option<FleetSettings>, ConfigError> {
        let Some(url) = &self.redis_url else {
            return Ok(None);
        };
        let Some(secret) = &self.fleet_secret else {
            return Err(ConfigError::Invalid(
                "fleet_secret (KEYWARDEN_FLEET_SECRET) is required with redis_url".into(),
            ));
        };
        if secret.expose_secret().len() < MIN_FLEET_SECRET_LEN {
            return Err(ConfigError::Invalid(format!(
                "fleet_secret (KEYWARDEN_FLEET_SECRET) is shorter than {MIN_FLEET_SECRET_LEN} bytes"
            )));
        }
        if self.warm_start_ttl_secs < 86_400 {
            return Err(ConfigError::Invalid(
                "warm_start_ttl_secs (KEYWARDEN_WARM_START_TTL_SECS) must be at least 86400 (a day)".into(),
            ));
        }
        if self.redis_timeout_ms == 0 {
            return Err(ConfigError::Invalid(
                "redis_timeout_ms (KEYWARDEN_REDIS_TIMEOUT_MS) must be at least 1".into(),
            ));
        }
        let redis_ca_pem = match &self.redis_ca_file {
            None => None,
            Some(_) if !url.expose_secret().starts_with("rediss://") => {
                return Err(ConfigError::Invalid(
                    "redis_ca_file (KEYWARDEN_REDIS_CA_FILE) needs a rediss:// redis_url".into(),
                ));
            }
            Some(path) => Some(std::fs::read(path).map_err(|e| {
                ConfigError::Invalid(format!(
                    "redis_ca_file (KEYWARDEN_REDIS_CA_FILE): cannot read {}: {e}",
                    path.display()
                ))
            })?),
        };
        Ok(Some(FleetSettings {
            redis_url: url.clone(),
            redis_password: self.redis_password.clone(),
            redis_cluster: self.redis_cluster,
            redis_ca_pem,
            redis_timeout: Duration::from_millis(self.redis_timeout_ms),
            fleet_secret: secret.clone(),
            warm_start_ttl: Duration::from_secs(self.warm_start_ttl_secs),
        }))
    }
}

#[cfg(test)]
mod tests {
    use figment::{
        Figment,
        providers::{Format, Toml},
    };

    use super::*;

    #[test]
    fn redis_needs_a_long_fleet_secret_and_errors_never_quote_either() {
        let url = "redis://:hunter2-password@redis:6379";
        let mut settings = Settings { redis_url: Some(url.into()), ..Settings::default() };
        let missing = settings.fleet().unwrap_err().to_string();
        assert!(missing.contains("KEYWARDEN_FLEET_SECRET") && !missing.contains("hunter2"), "{missing}");
        settings.fleet_secret = Some("short-secret".into());
        let short = settings.fleet().unwrap_err().to_string();
        assert!(short.contains("32 bytes") && !short.contains("short-secret"), "{short}");
        settings.fleet_secret = Some("f".repeat(32).into());
        settings.warm_start_ttl_secs = 3_600;
        assert!(settings.fleet().unwrap_err().to_string().contains("KEYWARDEN_WARM_START_TTL_SECS"));
        settings.warm_start_ttl_secs = 86_400;
        let fleet = settings.fleet().unwrap().expect("configured");
        assert!(!format!("{fleet:?}").contains("hunter2"));
        assert_eq!(Settings::default().fleet().unwrap().map(|_| ()), None, "no Redis by default");
    }

    #[test]
    fn a_redis_ca_file_needs_tls_and_must_be_readable() {
        let mut settings = Settings {
            redis_url: Some("redis://:hunter2@redis:6379".into()),
            fleet_secret: Some("f".repeat(32).into()),
            redis_ca_file: Some("/nonexistent/redis-ca.pem".into()),
            ..Settings::default()
        };
        let plain = settings.fleet().unwrap_err().to_string();
        assert!(plain.contains("KEYWARDEN_REDIS_CA_FILE") && plain.contains("rediss://"), "{plain}");
        assert!(!plain.contains("hunter2"), "{plain}");
        settings.redis_url = Some("rediss://:hunter2@redis:6380".into());
        let unreadable = settings.fleet().unwrap_err().to_string();
        assert!(
            unreadable.contains("/nonexistent/redis-ca.pem") && !unreadable.contains("hunter2"),
            "{unreadable}"
        );
        let dir = tempfile::tempdir().unwrap();
        let pem = dir.path().join("ca.pem");
        std::fs::write(&pem, "-----BEGIN CERTIFICATE-----\n").unwrap();
        settings.redis_ca_file = Some(pem);
        let fleet = settings.fleet().unwrap().expect("configured");
        assert_eq!(fleet.redis_ca_pem.as_deref(), Some(&b"-----BEGIN CERTIFICATE-----\n"[..]));
    }

    #[test]
    fn rate_limits_go_to_redis_by_default_only_when_it_is_configured() {
        let mut settings = Settings::default();
        assert_eq!(settings.rate_limit_mode().unwrap(), RateLimitMode::Local);
        settings.rate_limit_mode = Some(RateLimitMode::Redis);
        assert!(settings.rate_limit_mode().unwrap_err().to_string().contains("KEYWARDEN_RATE_LIMIT_MODE"));
        settings.redis_url = Some("redis://127.0.0.1".into());
        settings.rate_limit_mode = None;
        assert_eq!(settings.rate_limit_mode().unwrap(), RateLimitMode::Redis);
        settings.rate_limit_mode = Some(RateLimitMode::Local);
        assert_eq!(settings.rate_limit_mode().unwrap(), RateLimitMode::Local);
        let parsed: Settings = Figment::new()
            .merge(Toml::string("rate_limit_mode = \"redis\"\nrate_limit_on_redis_failure = \"closed\""))
            .extract()
            .unwrap();
        assert_eq!(
            (parsed.rate_limit_mode, parsed.rate_limit_on_redis_failure),
            (Some(RateLimitMode::Redis), OnRedisFailure::Closed)
        );
    }
}
