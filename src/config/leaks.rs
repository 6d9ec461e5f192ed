//! Leak-report settings: the listener GitHub's secret-scanning partner
//! program posts to, and where the keys that sign its reports come from.

use std::{net::SocketAddr, path::PathBuf};

use super::{ConfigError, Settings};

/// The leak-report listener, when configured.
#[derive(Debug, Clone)]
pub struct LeakReportSettings {
    pub listen_addr: SocketAddr,
    pub keys_file: Option<PathBuf>,
    /// `https://` (or `http://` to a loopback address, for tests).
    pub keys_url: Option<String>,
}

impl Settings {
    /// `None` without a listen address. A listener needs at least one
    /// source of keys, and TLS (or `allow_plaintext`) beyond loopback, as
    /// the gRPC listeners do.
    pub fn leak_reports(&self) -> Result<Option<LeakReportSettings>, ConfigError> {
        let invalid = |setting: &str, why: &str| ConfigError::Invalid(format!("{setting}: {why}"));
        let Some(listen_addr) = self.leak_report_listen_addr else {
            return Ok(None);
        };
        if self.leak_report_keys_file.is_none() && self.leak_report_keys_url.is_none() {
            return Err(invalid(
                "leak_report_listen_addr",
                "needs leak_report_keys_file or leak_report_keys_url: reports are accepted only when signed",
            ));
        }
        if let Some(url) = &self.leak_report_keys_url {
            check_keys_url(url).map_err(|why| invalid("leak_report_keys_url", &why))?;
        }
        if self.tls_cert_file.is_none() && !self.allow_plaintext && !listen_addr.ip().is_loopback() {
            return Err(invalid(
                "leak_report_listen_addr",
                "refusing plaintext beyond loopback: reports carry live keys; configure \
                 KEYWARDEN_TLS_CERT_FILE and KEYWARDEN_TLS_KEY_FILE, or set KEYWARDEN_ALLOW_PLAINTEXT=true",
            ));
        }
        Ok(Some(LeakReportSettings {
            listen_addr,
            keys_file: self.leak_report_keys_file.clone(),
            keys_url: self.leak_report_keys_url.clone(),
        }))
    }
}

/// `https://host/…`, or `http://` to a loopback address.
fn check_keys_url(url: &str) -> Result<(), String> {
    let uri: hyper::Uri = url.parse().map_err(|_| "is not a URL".to_owned())?;
    let host = uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err("has no host".into());
    }
    let loopback = host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
    match uri.scheme_str() {
        Some("https") => Ok(()),
        Some("http") if loopback => Ok(()),
        _ => Err("must be an https:// URL (http:// only to a loopback address)".into()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_listener_needs_keys_and_tls_beyond_loopback() {
        let open = Settings {
            leak_report_listen_addr: Some("0.0.0.0:8443".parse().unwrap()),
            ..Settings::default()
        };
        assert!(open.leak_reports().unwrap_err().to_string().contains("leak_report_keys_file"));
        let keyed = Settings { leak_report_keys_file: Some("keys.json".into()), ..open };
        assert!(keyed.leak_reports().unwrap_err().to_string().contains("plaintext"));
        let plain = Settings { allow_plaintext: true, ..keyed.clone() };
        assert!(plain.leak_reports().unwrap().is_some());
        let local = Settings { leak_report_listen_addr: Some("127.0.0.1:0".parse().unwrap()), ..keyed };
        assert!(local.leak_reports().unwrap().is_some());
        assert!(Settings::default().leak_reports().unwrap().is_none());
    }

    #[test]
    fn the_keys_url_is_https_or_loopback_http() {
        assert!(check_keys_url("https://api.github.com/meta/public_keys/secret_scanning").is_ok());
        assert!(check_keys_url("http://127.0.0.1:9000/keys").is_ok());
        assert!(check_keys_url("http://example.com/keys").is_err());
        assert!(check_keys_url("ftp://example.com/keys").is_err());
        assert!(check_keys_url("not a url").is_err());
    }
}
