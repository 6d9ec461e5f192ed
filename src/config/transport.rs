//! Transport settings: the TLS material and who may call under mTLS, the
//! plaintext guard, and the bounds on connections and calls.

use std::{path::PathBuf, time::Duration};

use serde::Deserialize;

use super::{ConfigError, Settings};
use crate::keys::operator::OperatorRole;

/// Where the TLS material is and how often it is re-read.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// When set, clients must present a certificate chaining to it (mTLS).
    pub client_ca_file: Option<PathBuf>,
    /// PEM CRLs: a client certificate they revoke is refused (mTLS only).
    pub client_crl_file: Option<PathBuf>,
    pub reload_interval: Duration,
}

/// Under mTLS: a client identity that authenticates as an operator by its
/// certificate alone.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityGrant {
    /// The certificate's URI SAN, else its first DNS SAN.
    pub identity: String,
    pub role: OperatorRole,
    /// Empty: every merchant (required for `admin`).
    #[serde(default)]
    pub merchant_ids: Vec<String>,
}

impl Settings {
    /// The TLS settings, if TLS is configured, checked for consistency.
    pub fn tls(&self) -> Result<Option<TlsSettings>, ConfigError> {
        let tls = match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(cert), Some(key)) => Some(TlsSettings {
                cert_file: cert.clone(),
                key_file: key.clone(),
                client_ca_file: self.tls_client_ca_file.clone(),
                client_crl_file: self.tls_client_crl_file.clone(),
                reload_interval: Duration::from_millis(self.tls_reload_interval_ms.max(100)),
            }),
            (None, None) => None,
            _ => {
                return Err(ConfigError::Invalid(
                    "KEYWARDEN_TLS_CERT_FILE and KEYWARDEN_TLS_KEY_FILE go together: set both or neither"
                        .into(),
                ));
            }
        };
        let mtls = tls.as_ref().is_some_and(|t| t.client_ca_file.is_some());
        if self.tls_client_ca_file.is_some() && tls.is_none() {
            return Err(ConfigError::Invalid(
                "KEYWARDEN_TLS_CLIENT_CA_FILE needs KEYWARDEN_TLS_CERT_FILE and KEYWARDEN_TLS_KEY_FILE"
                    .into(),
            ));
        }
        if !mtls && self.outcome_reporters.is_some() {
            return Err(ConfigError::Invalid(
                "KEYWARDEN_OUTCOME_REPORTERS needs mTLS (KEYWARDEN_TLS_CLIENT_CA_FILE): reporters are certificate identities"
                    .into(),
            ));
        }
        if !mtls && self.tls_client_crl_file.is_some() {
            return Err(ConfigError::Invalid(
                "KEYWARDEN_TLS_CLIENT_CRL_FILE needs mTLS (KEYWARDEN_TLS_CLIENT_CA_FILE)".into(),
            ));
        }
        if !mtls && !self.verify_callers.is_empty() {
            return Err(ConfigError::Invalid(
                "KEYWARDEN_VERIFY_CALLERS needs mTLS (KEYWARDEN_TLS_CLIENT_CA_FILE): callers are certificate identities"
                    .into(),
            ));
        }
        if !mtls && !self.operator_identities.is_empty() {
            return Err(ConfigError::Invalid(
                "operator_identities needs mTLS (KEYWARDEN_TLS_CLIENT_CA_FILE): they are certificate identities".into(),
            ));
        }
        for grant in &self.operator_identities {
            if grant.identity.is_empty() {
                return Err(ConfigError::Invalid("operator_identities: identity is required".into()));
            }
            if grant.role.spans_merchants() && !grant.merchant_ids.is_empty() {
                return Err(ConfigError::Invalid(format!(
                    "operator_identities: {:?} is {}, which cannot be limited to merchants",
                    grant.identity,
                    grant.role.as_str().to_ascii_lowercase()
                )));
            }
        }
        if tls.is_none() && !self.allow_plaintext {
            let exposed: Vec<String> = [Some(self.listen_addr), self.admin_listen_addr]
                .into_iter()
                .flatten()
                .filter(|a| !a.ip().is_loopback())
                .map(|a| a.to_string())
                .collect();
            if !exposed.is_empty() {
                return Err(ConfigError::Invalid(format!(
                    "refusing to serve keys and admin tokens in plaintext on {}: configure \
                     KEYWARDEN_TLS_CERT_FILE and KEYWARDEN_TLS_KEY_FILE, or set KEYWARDEN_ALLOW_PLAINTEXT=true \
                     (e.g. behind a mesh sidecar that terminates mTLS)",
                    exposed.join(", ")
                )));
            }
        }
        Ok(tls)
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms.max(1))
    }

    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms.max(1))
    }

    pub fn idle_connection_timeout(&self) -> Option<Duration> {
        (self.idle_connection_timeout_ms > 0).then(|| Duration::from_millis(self.idle_connection_timeout_ms))
    }

    pub fn access_log_stream_max_age(&self) -> Duration {
        Duration::from_millis(self.access_log_stream_max_age_ms.max(1))
    }

    pub fn http2_keepalive_interval(&self) -> Option<Duration> {
        (self.http2_keepalive_interval_ms > 0)
            .then(|| Duration::from_millis(self.http2_keepalive_interval_ms))
    }

    pub fn http2_keepalive_timeout(&self) -> Duration {
        Duration::from_millis(self.http2_keepalive_timeout_ms.max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_settings_are_checked_together() {
        let tls = |cert: bool, key: bool, ca: bool| Settings {
            tls_cert_file: cert.then(|| "c.pem".into()),
            tls_key_file: key.then(|| "k.pem".into()),
            tls_client_ca_file: ca.then(|| "ca.pem".into()),
            ..Settings::default()
        };
        assert!(tls(true, true, true).tls().unwrap().is_some());
        assert!(tls(false, false, false).tls().unwrap().is_none());
        for (c, k, ca) in [(true, false, false), (false, true, false), (false, false, true)] {
            assert!(tls(c, k, ca).tls().is_err(), "{c} {k} {ca}");
        }
        let callers_without_mtls =
            Settings { verify_callers: vec!["spiffe://x".into()], ..tls(true, true, false) };
        assert!(callers_without_mtls.tls().unwrap_err().to_string().contains("KEYWARDEN_VERIFY_CALLERS"));
    }

    #[test]
    fn plaintext_beyond_loopback_must_be_asked_for() {
        let open = Settings { listen_addr: "0.0.0.0:50051".parse().unwrap(), ..Settings::default() };
        assert!(open.tls().unwrap_err().to_string().contains("KEYWARDEN_ALLOW_PLAINTEXT"));
        assert!(Settings { allow_plaintext: true, ..open }.tls().is_ok());
        let admin_open =
            Settings { admin_listen_addr: Some("10.0.0.1:50052".parse().unwrap()), ..Settings::default() };
        assert!(admin_open.tls().is_err());
    }
}
