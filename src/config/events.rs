//! Lifecycle-event settings: the CloudEvents source, NATS JetStream, the
//! webhooks' rules, the relay's lease and the expiry scan.

use std::{path::PathBuf, time::Duration};

use secrecy::SecretString;

use super::{ConfigError, Settings};

/// How events leave the service.
#[derive(Clone)]
pub struct EventSettings {
    /// Every event's CloudEvents `source`.
    pub source: String,
    pub nats: Option<NatsSettings>,
    /// Webhook URLs may be `http://` (tests, in-cluster receivers).
    pub webhook_allow_http: bool,
    /// How long a webhook delivery is retried before it is `failed`.
    pub webhook_max_age: Duration,
    /// How long one webhook POST may take.
    pub webhook_timeout: Duration,
    /// How often the delivering replica looks for new and due events.
    pub poll_interval: Duration,
    /// How long the delivering replica's lease lasts unrenewed: the bound
    /// on another replica taking over from one that died.
    pub lease: Duration,
    /// Before expiry, one `key.expiring` per lead.
    pub reminder_leads: Vec<Duration>,
    pub scan_interval: Duration,
    /// Delivered events older than this are deleted; `None` keeps them.
    pub retention: Option<Duration>,
}

impl std::fmt::Debug for EventSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventSettings")
            .field("source", &self.source)
            .field("nats", &self.nats)
            .field("webhook_allow_http", &self.webhook_allow_http)
            .field("webhook_max_age", &self.webhook_max_age)
            .field("poll_interval", &self.poll_interval)
            .field("lease", &self.lease)
            .field("reminder_leads", &self.reminder_leads)
            .field("scan_interval", &self.scan_interval)
            .field("retention", &self.retention)
            .finish_non_exhaustive()
    }
}

/// NATS JetStream, when configured. `Debug` shows no credential.
#[derive(Clone)]
pub struct NatsSettings {
    pub url: String,
    pub stream: String,
    /// A `.creds` file (JWT and NKey seed).
    pub creds_file: Option<PathBuf>,
    pub token: Option<SecretString>,
    pub user: Option<String>,
    pub password: Option<SecretString>,
    /// PEM roots the server's certificate must chain to; setting it
    /// requires TLS.
    pub tls_ca_file: Option<PathBuf>,
    /// Client certificate and key, for servers that ask for one.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    pub require_tls: bool,
}

impl std::fmt::Debug for NatsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsSettings")
            .field("url", &self.url)
            .field("stream", &self.stream)
            .field("creds_file", &self.creds_file)
            .field("require_tls", &self.require_tls)
            .finish_non_exhaustive()
    }
}

impl Settings {
    pub fn events(&self) -> Result<EventSettings, ConfigError> {
        let invalid = |setting: &str, why: String| ConfigError::Invalid(format!("{setting}: {why}"));
        if self.events_source.trim().is_empty() {
            return Err(invalid("events_source", "must not be empty".into()));
        }
        let mut leads = Vec::with_capacity(self.expiry_reminder_leads.len());
        for lead in &self.expiry_reminder_leads {
            let parsed = parse_duration(lead).map_err(|why| invalid("expiry_reminder_leads", why))?;
            if parsed.is_zero() {
                return Err(invalid("expiry_reminder_leads", format!("{lead:?} is not a lead time")));
            }
            leads.push(parsed);
        }
        leads.sort_unstable_by(|a, b| b.cmp(a));
        leads.dedup();
        let webhook_max_age =
            parse_duration(&self.webhook_max_age).map_err(|why| invalid("webhook_max_age", why))?;
        if self.expiry_scan_interval_ms == 0 {
            return Err(invalid("expiry_scan_interval_ms", "must be positive".into()));
        }
        // A tick delivers for a third of the lease, plus one POST that was
        // under way: the lease must outlast that with room to spare.
        if self.events_lease_ms < 2 * (self.events_poll_interval_ms.max(1) + self.webhook_timeout_ms) {
            return Err(invalid(
                "events_lease_ms",
                "must be at least twice events_poll_interval_ms plus webhook_timeout_ms".into(),
            ));
        }
        let retention = (self.events_retention_days > 0)
            .then(|| Duration::from_secs(u64::from(self.events_retention_days) * 86_400));
        // An occasion's event must outlive the window the scan looks in, or
        // the scan would write it again.
        let needed = leads.first().copied().unwrap_or_default() + Duration::from_secs(7 * 86_400);
        if retention.is_some_and(|r| r <= needed) {
            return Err(invalid(
                "events_retention_days",
                format!(
                    "must be more than the longest reminder lead plus 7 days ({} days)",
                    needed.as_secs() / 86_400
                ),
            ));
        }
        let nats = match self.events_nats_url.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(url) => {
                if !["nats://", "tls://", "nats+tls://"].iter().any(|s| url.starts_with(s))
                    && url.contains("://")
                {
                    return Err(invalid("events_nats_url", "use nats://host:port or tls://host:port".into()));
                }
                if self.events_nats_stream.is_empty()
                    || !self
                        .events_nats_stream
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                {
                    return Err(invalid("events_nats_stream", "letters, digits, '_' and '-' only".into()));
                }
                Some(NatsSettings {
                    url: url.to_owned(),
                    stream: self.events_nats_stream.clone(),
                    creds_file: self.events_nats_creds_file.clone(),
                    token: self.events_nats_token.clone(),
                    user: self.events_nats_user.clone(),
                    password: self.events_nats_password.clone(),
                    tls_ca_file: self.events_nats_tls_ca_file.clone(),
                    tls_cert_file: self.events_nats_tls_cert_file.clone(),
                    tls_key_file: self.events_nats_tls_key_file.clone(),
                    require_tls: url.starts_with("tls://") || self.events_nats_tls_ca_file.is_some(),
                })
            }
        };
        Ok(EventSettings {
            source: self.events_source.clone(),
            nats,
            webhook_allow_http: self.webhook_allow_http,
            webhook_max_age,
            webhook_timeout: Duration::from_millis(self.webhook_timeout_ms.max(1)),
            poll_interval: Duration::from_millis(self.events_poll_interval_ms.max(1)),
            lease: Duration::from_millis(self.events_lease_ms),
            reminder_leads: leads,
            scan_interval: Duration::from_millis(self.expiry_scan_interval_ms),
            retention,
        })
    }
}

/// `14d`, `36h`, `90m`, `10s`, `500ms`: a number and a unit.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().map_err(|_| format!("{text:?} is not a duration like 14d, 3h, 10s"))?;
    let unit_ms: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("{text:?} has no unit: use ms, s, m, h or d")),
    };
    n.checked_mul(unit_ms)
        .filter(|ms| *ms <= 10 * 365 * 86_400_000)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("{text:?} is longer than ten years"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn durations_take_a_number_and_a_unit() {
        assert_eq!(parse_duration("14d").unwrap(), Duration::from_secs(14 * 86_400));
        assert_eq!(parse_duration(" 10s ").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        for bad in ["", "d", "14", "1w", "-3d", "99999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn defaults_remind_fourteen_and_three_days_ahead_and_a_bad_lead_is_named() {
        let events = Settings::default().events().unwrap();
        assert_eq!(
            events.reminder_leads,
            [Duration::from_secs(14 * 86_400), Duration::from_secs(3 * 86_400)]
        );
        assert_eq!(events.webhook_max_age, Duration::from_secs(86_400));
        assert!(events.nats.is_none());
        let bad = Settings { expiry_reminder_leads: vec!["soon".into()], ..Settings::default() };
        assert!(bad.events().unwrap_err().to_string().contains("expiry_reminder_leads"));
        let short = Settings { events_retention_days: 20, ..Settings::default() };
        assert!(short.events().unwrap_err().to_string().contains("events_retention_days"));
        let url = Settings { events_nats_url: Some("http://x".into()), ..Settings::default() };
        assert!(url.events().unwrap_err().to_string().contains("events_nats_url"));
    }
}
