//! Gateway mode: an HTTP request, as Envoy's ext_authz describes it, decided
//! by the Verify engine. The route table says which scope the method and
//! path need; the key comes from `authorization: Bearer` or `x-api-key`;
//! the client IP from the source address or, behind trusted proxies, from
//! `x-forwarded-for`. Every check is audited as a Verify is (same row, same
//! span), with the method and the path without its query.

use std::{net::IpAddr, sync::Arc};

use tokio::sync::watch;

use super::{
    ServiceError, validate,
    verify::{Presented, Verdict, Verifier, VerifyCall},
};
use crate::{
    keys::DenyReason,
    routes::{Requirement, RouteTable, strip_query},
};

/// The headers a key may come in (the shared HTTP contract's).
pub use keywarden_http::KEY_HEADERS;

/// What the gateway sees of one HTTP request.
#[derive(Clone, Default)]
pub struct HttpCheck {
    pub method: String,
    /// The request target: path and query.
    pub path: String,
    /// The value of `authorization`, if sent.
    pub authorization: Option<String>,
    pub x_api_key: Option<String>,
    pub forwarded_for: Option<String>,
    /// The downstream connection's address, as Envoy saw it.
    pub source: Option<IpAddr>,
}

impl std::fmt::Debug for HttpCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpCheck")
            .field("method", &self.method)
            .field("path", &self.path)
            .field("key", &"[redacted]")
            .field("forwarded_for", &self.forwarded_for)
            .field("source", &self.source)
            .finish()
    }
}

/// The gateway's decision. On ALLOW both [`KEY_HEADERS`] are removed
/// before the request goes upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    pub verdict: Verdict,
}

/// The key a request presents, by the contract keywarden-client shares
/// ([`keywarden_http::presented_key`]). `None` when both headers are sent:
/// whichever was not checked would reach upstream as if it had been.
pub fn presented_key(check: &HttpCheck) -> Option<String> {
    keywarden_http::presented_key(check.authorization.as_deref(), check.x_api_key.as_deref())
        .map(str::to_owned)
}

/// The client's address: the source address with no trusted proxies;
/// behind `hops` of them, the `hops`-th entry of `x-forwarded-for` from the
/// right (what the nearest trusted proxy saw), or the source address when
/// the header has fewer entries. Entries further left were written by the
/// client and are never used.
pub fn client_ip(forwarded_for: Option<&str>, source: Option<IpAddr>, hops: usize) -> Option<IpAddr> {
    if hops == 0 {
        return source;
    }
    let entries: Vec<&str> = forwarded_for.map(|h| h.split(',').map(str::trim).collect()).unwrap_or_default();
    match entries.len().checked_sub(hops) {
        Some(i) => entries[i].parse().ok(),
        None => source,
    }
}

/// A request path fit for an audit row: no query, no control characters,
/// at most the endpoint limit.
fn audit_endpoint(path: &str) -> String {
    let mut endpoint: String = strip_query(path).chars().filter(|c| !c.is_control()).collect();
    if endpoint.len() > validate::MAX_ENDPOINT {
        let mut cut = validate::MAX_ENDPOINT;
        while !endpoint.is_char_boundary(cut) {
            cut -= 1;
        }
        endpoint.truncate(cut);
    }
    endpoint
}

/// Decides gateway checks on the Verify engine.
#[derive(Debug)]
pub struct Gateway {
    verifier: Arc<Verifier>,
    routes: watch::Receiver<Arc<RouteTable>>,
    trusted_hops: usize,
}

impl Gateway {
    /// `routes` holds the current table (replaced whole on reload).
    pub fn new(
        verifier: Arc<Verifier>,
        routes: watch::Receiver<Arc<RouteTable>>,
        trusted_hops: usize,
    ) -> Self {
        Self { verifier, routes, trusted_hops }
    }

    pub async fn check(&self, check: HttpCheck, span: &tracing::Span) -> Result<Checked, ServiceError> {
        let ip = client_ip(check.forwarded_for.as_deref(), check.source, self.trusted_hops);
        let table = Arc::clone(&self.routes.borrow());
        let requirement = table.requirement(&check.method, &check.path);
        // Refused before any key is looked at: audited in a rollup row.
        let refuse = |reason| {
            let method =
                if validate::method(&check.method).is_ok() { check.method.clone() } else { String::new() };
            let verdict = self.verifier.refuse(audit_endpoint(&check.path), method, ip, reason, span);
            Ok(Checked { verdict })
        };
        // The route match holds the scope, and the address is parsed: the
        // call is built typed, with nothing to parse again.
        let required = match requirement {
            Requirement::Scope { scope, .. } => Some(scope),
            Requirement::AnyValidKey => None,
            Requirement::Denied => return refuse(DenyReason::NoRoute),
            Requirement::Malformed(_) => return refuse(DenyReason::MalformedRequest),
        };
        let Some(key) = presented_key(&check) else { return refuse(DenyReason::MalformedRequest) };
        let call = VerifyCall {
            // A key too long to be one is malformed, whatever it holds.
            key: if key.len() > validate::MAX_PRESENTED_KEY {
                Presented::Malformed
            } else {
                Presented::parse(self.verifier.prefix(), &key)
            },
            ip,
            required,
            endpoint: audit_endpoint(&check.path),
            // Canonical (routes::canonical), so an uppercase token within
            // the method limit.
            method: check.method,
            // A request through the gateway costs one credit.
            cost: 1,
        };
        let verdict = self.verifier.verify(call, span).await?;
        Ok(Checked { verdict })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn trusted_hops_pick_the_entry_the_nearest_trusted_proxy_saw() {
        let source = Some(ip("192.0.2.1"));
        let xff = Some("evil, 10.0.0.5");
        assert_eq!(client_ip(xff, source, 0), source);
        assert_eq!(client_ip(xff, source, 1), Some(ip("10.0.0.5")));
        // The client-written entry is never trusted to be an address.
        assert_eq!(client_ip(xff, source, 2), None);
        assert_eq!(client_ip(xff, source, 3), source, "too few entries: the source address");
        assert_eq!(client_ip(None, source, 1), source);
    }

    #[test]
    fn the_key_comes_from_a_bearer_authorization_or_x_api_key() {
        let check = |authorization: Option<&str>, x_api_key: Option<&str>| HttpCheck {
            authorization: authorization.map(str::to_owned),
            x_api_key: x_api_key.map(str::to_owned),
            ..HttpCheck::default()
        };
        let key = |a, x| presented_key(&check(a, x));
        assert_eq!(key(Some("Bearer sntr_a"), None).as_deref(), Some("sntr_a"));
        assert_eq!(key(Some("bearer  sntr_a "), None).as_deref(), Some("sntr_a"));
        assert_eq!(key(None, Some("sntr_b")).as_deref(), Some("sntr_b"));
        assert_eq!(key(Some("Basic abc"), None).as_deref(), Some(""));
        assert_eq!(key(None, None).as_deref(), Some(""));
        // Two headers: one would go upstream unchecked.
        assert_eq!(key(Some("Bearer sntr_a"), Some("sntr_b")), None);
        assert_eq!(key(Some("Basic abc"), Some("sntr_b")), None);
        assert!(!format!("{:?}", check(Some("Bearer sntr_secret"), None)).contains("sntr_secret"));
    }

    #[test]
    fn audit_endpoints_drop_the_query_and_stay_bounded() {
        assert_eq!(audit_endpoint("/v1/invoices?token=abc"), "/v1/invoices");
        assert_eq!(audit_endpoint("/a\u{7}b#frag"), "/ab");
        assert_eq!(audit_endpoint(&"é".repeat(5000)).len(), validate::MAX_ENDPOINT);
    }

    proptest! {
        #[test]
        fn a_client_written_entry_is_never_chosen_past_the_trusted_hops(
            client in proptest::collection::vec("[0-9a-z.:]{0,15}", 0..4),
            proxies in proptest::collection::vec(any::<std::net::Ipv4Addr>(), 1..4),
        ) {
            let hops = proxies.len();
            let header = client.iter().cloned().chain(proxies.iter().map(ToString::to_string)).collect::<Vec<_>>().join(", ");
            let chosen = client_ip(Some(&header), None, hops);
            prop_assert_eq!(chosen, Some(IpAddr::V4(proxies[0])));
        }
    }
}
