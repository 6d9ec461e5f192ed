//! The tower layer: a key from the request's headers, a scope from the
//! service's route function, a Verify call, and a grant or a denial.

use std::{
    borrow::Cow,
    fmt,
    future::Future,
    net::IpAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header, request::Parts};
use http_body_util::{Either, Full};
use tower_layer::Layer;
use tower_service::Service;

use crate::{
    client::{Client, Decision, Error, Refusal},
    pb::{DenyReason, VerifyRequest},
};

use keywarden_http::{AUTHORIZATION, KEY_HEADERS, X_API_KEY};

/// Longest key keywarden accepts; a longer one is malformed without a call.
const MAX_KEY: usize = 128;
/// Limits of Verify's audit fields.
const MAX_ENDPOINT: usize = 2048;
const MAX_METHOD: usize = 32;

/// What a route needs, as the service's route function says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    /// A key granting this scope.
    Scope(Cow<'static, str>),
    /// Any valid key, whatever its scopes.
    AnyValidKey,
    /// No such route: 403 without a Verify call.
    NoRoute,
}

impl Requirement {
    pub fn scope(scope: impl Into<Cow<'static, str>>) -> Self {
        Self::Scope(scope.into())
    }
}

type RouteFn = dyn Fn(&Method, &str) -> Requirement + Send + Sync;
type ClientIpFn = dyn Fn(&Parts) -> Option<IpAddr> + Send + Sync;

/// Verifies every request's key before the inner service sees it.
#[derive(Clone)]
pub struct VerifyLayer {
    client: Client,
    routes: Arc<RouteFn>,
    client_ip: Arc<ClientIpFn>,
}

impl fmt::Debug for VerifyLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifyLayer").field("client", &self.client).finish_non_exhaustive()
    }
}

impl VerifyLayer {
    /// `routes` says what each request (method, path without the query)
    /// needs.
    pub fn new(
        client: Client,
        routes: impl Fn(&Method, &str) -> Requirement + Send + Sync + 'static,
    ) -> Self {
        Self { client, routes: Arc::new(routes), client_ip: Arc::new(connection_ip) }
    }

    /// Where the client's address comes from. By default, the connection's
    /// peer: tonic's `TcpConnectInfo`, or axum's `ConnectInfo<SocketAddr>`
    /// with the `axum` feature. Behind proxies, read the entry your nearest
    /// trusted proxy wrote in `x-forwarded-for`, never the left-most one.
    pub fn client_ip(mut self, client_ip: impl Fn(&Parts) -> Option<IpAddr> + Send + Sync + 'static) -> Self {
        self.client_ip = Arc::new(client_ip);
        self
    }
}

impl<S> Layer<S> for VerifyLayer {
    type Service = VerifyService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        VerifyService { inner, layer: self.clone() }
    }
}

/// The service [`VerifyLayer`] wraps around another.
#[derive(Clone, Debug)]
pub struct VerifyService<S> {
    inner: S,
    layer: VerifyLayer,
}

type Answer<B> = Response<Either<B, Full<Bytes>>>;

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for VerifyService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send,
    ReqBody: Send + 'static,
    ResBody: 'static,
{
    type Response = Answer<ResBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        // The instance polled ready is the one called; its clone waits for
        // the next poll_ready.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        Box::pin(layer.handle(inner, request))
    }
}

impl VerifyLayer {
    async fn handle<S, ReqBody, ResBody>(
        self,
        mut inner: S,
        request: Request<ReqBody>,
    ) -> Result<Answer<ResBody>, S::Error>
    where
        S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    {
        let (mut parts, body) = request.into_parts();
        let required_scope = match (self.routes)(&parts.method, parts.uri.path()) {
            Requirement::NoRoute => return Ok(Denial::Denied(DenyReason::NoRoute).response()),
            Requirement::Scope(scope) => scope.into_owned(),
            Requirement::AnyValidKey => String::new(),
        };
        // A key in both headers: one of them would reach the handler
        // unchecked. Refused as the gateway refuses it.
        let Some(key) = presented_key(&parts.headers) else {
            return Ok(Denial::Denied(DenyReason::MalformedRequest).response());
        };
        if key.len() > MAX_KEY {
            return Ok(Denial::Denied(DenyReason::Malformed).response());
        }
        let call = VerifyRequest {
            key,
            ip: (self.client_ip)(&parts).map(|ip| ip.to_string()).unwrap_or_default(),
            required_scope,
            endpoint: audit_endpoint(parts.uri.path()),
            method: Some(parts.method.as_str())
                .filter(|m| m.len() <= MAX_METHOD)
                .unwrap_or_default()
                .to_owned(),
            cost: 1,
        };
        let grant = match self.client.verify(call).await {
            Ok(Decision::Allow(grant)) => grant,
            Ok(Decision::Deny(refusal)) => return Ok(Denial::from(refusal).response()),
            Err(e @ Error::Refused(_)) => {
                tracing::error!(error = %e, "keywarden refused to verify: answering 500");
                return Ok(Denial::Misconfigured.response());
            }
            Err(e @ Error::Unavailable(_)) => {
                tracing::warn!(error = %e, "keywarden could not decide: answering 503");
                return Ok(Denial::Unavailable.response());
            }
        };
        // The handler has the grant; the key stays out of its reach (and
        // logs), whichever header carried it.
        for name in KEY_HEADERS {
            parts.headers.remove(name);
        }
        let audit_id = grant.audit_id.clone();
        parts.extensions.insert(grant);
        let response = inner.call(Request::from_parts(parts, body)).await?;
        self.client.report(audit_id, response.status().as_u16());
        Ok(response.map(Either::Left))
    }
}

/// A refusal, answered as keywarden's gateway answers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    /// keywarden denied the key (or the layer found no key or no route).
    Denied(DenyReason),
    /// keywarden could not be reached or could not decide safely: 503.
    Unavailable,
    /// keywarden refused the call itself (e.g. an unknown scope): 500.
    Misconfigured,
    /// Over one of the key's rate limits: 429 with the IETF RateLimit
    /// header fields, as the gateway answers.
    RateLimited {
        limit: u32,
        remaining: u32,
        /// Seconds until the limit is full again.
        reset_secs: u64,
    },
}

impl From<Refusal> for Denial {
    fn from(refusal: Refusal) -> Self {
        match (refusal.reason, refusal.rate_limit) {
            (DenyReason::RateLimited, Some(status)) => {
                let reset_at = status.reset_at.unwrap_or_default();
                // The header is relative to now on this host, as the
                // HTTP client reading it counts.
                #[expect(
                    clippy::disallowed_methods,
                    reason = "an absolute reset time made relative for a header"
                )]
                let now =
                    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                let reset_ms = (i128::from(reset_at.seconds) * 1_000
                    + i128::from(reset_at.nanos / 1_000_000))
                    - i128::try_from(now.as_millis()).unwrap_or(i128::MAX);
                Self::RateLimited {
                    limit: status.limit,
                    remaining: status.remaining,
                    reset_secs: keywarden_http::reset_seconds(reset_ms),
                }
            }
            (reason, _) => Self::Denied(reason),
        }
    }
}

impl Denial {
    /// The same refusal in the contract keywarden's gateway answers by.
    fn contract(self) -> keywarden_http::Denial {
        use keywarden_http::Denial as Http;
        match self {
            // The generated enum and the contract share the wire names.
            Self::Denied(reason) => keywarden_http::DenyReason::from_wire_name(reason.as_str_name())
                .map_or(Http::Unspecified, Http::Denied),
            Self::RateLimited { .. } => Http::Denied(keywarden_http::DenyReason::RateLimited),
            Self::Unavailable => Http::Unavailable,
            Self::Misconfigured => Http::Misconfigured,
        }
    }

    pub fn status(self) -> StatusCode {
        StatusCode::from_u16(self.contract().status()).unwrap_or(StatusCode::FORBIDDEN)
    }

    /// The JSON body: `{"error": "<short text>", "reason": "DENY_REASON_…"}`.
    pub fn body(self) -> String {
        self.contract().body()
    }

    /// The response, with `www-authenticate: Bearer` on 401.
    pub fn response<B>(self) -> Response<Either<B, Full<Bytes>>> {
        let contract = self.contract();
        let mut response = Response::new(Either::Right(Full::new(Bytes::from(contract.body()))));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(keywarden_http::CONTENT_TYPE));
        if let Some((name, value)) = contract.challenge() {
            headers.insert(name, HeaderValue::from_static(value));
        }
        if let Self::RateLimited { limit, remaining, reset_secs } = self {
            let [limit_name, remaining_name, reset_name] = keywarden_http::RATELIMIT_HEADERS;
            headers.insert(limit_name, HeaderValue::from(limit));
            headers.insert(remaining_name, HeaderValue::from(remaining));
            headers.insert(reset_name, HeaderValue::from(reset_secs));
        }
        response
    }
}

/// The key a request presents, by the contract the gateway reads it with
/// (a header value that is not text counts as empty). `None` when both
/// key headers are sent.
fn presented_key(headers: &HeaderMap) -> Option<String> {
    let text = |name: &str| headers.get(name).map(|v| v.to_str().unwrap_or_default());
    keywarden_http::presented_key(text(AUTHORIZATION), text(X_API_KEY)).map(str::to_owned)
}

/// A path fit for Verify's audit field: no control characters, at most
/// its length limit.
fn audit_endpoint(path: &str) -> String {
    let mut endpoint: String = path.chars().filter(|c| !c.is_control()).collect();
    if endpoint.len() > MAX_ENDPOINT {
        let mut cut = MAX_ENDPOINT;
        while !endpoint.is_char_boundary(cut) {
            cut -= 1;
        }
        endpoint.truncate(cut);
    }
    endpoint
}

/// The connection's peer address, from what the server put into the
/// request's extensions.
fn connection_ip(parts: &Parts) -> Option<IpAddr> {
    #[cfg(feature = "axum")]
    if let Some(info) = parts.extensions.get::<axum::extract::ConnectInfo<std::net::SocketAddr>>() {
        return Some(info.0.ip());
    }
    parts
        .extensions
        .get::<tonic::transport::server::TcpConnectInfo>()
        .and_then(|info| info.remote_addr())
        .map(|addr| addr.ip())
}

#[cfg(test)]
mod tests {
    // Tests read the real clock to build their inputs.
    #![allow(clippy::disallowed_methods)]

    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_str(value).unwrap_or_else(|_| HeaderValue::from_static("")));
        }
        map
    }

    #[test]
    fn the_key_comes_from_one_header_and_two_are_refused() {
        fn key(h: &[(&'static str, &'static str)]) -> Option<String> {
            presented_key(&headers(h))
        }
        assert_eq!(key(&[("authorization", "Bearer sntr_a")]).as_deref(), Some("sntr_a"));
        assert_eq!(key(&[("authorization", "bearer  sntr_a ")]).as_deref(), Some("sntr_a"));
        assert_eq!(key(&[("x-api-key", " sntr_b")]).as_deref(), Some("sntr_b"));
        assert_eq!(key(&[("authorization", "Basic dXNlcg==")]).as_deref(), Some(""));
        assert_eq!(presented_key(&HeaderMap::new()).as_deref(), Some(""));
        // As the gateway: one of two would reach the handler unchecked.
        assert_eq!(key(&[("authorization", "Bearer sntr_a"), ("x-api-key", "sntr_b")]), None);
        assert_eq!(key(&[("authorization", "Basic dXNlcg=="), ("x-api-key", "sntr_b")]), None);
        assert_eq!(Denial::Denied(DenyReason::MalformedRequest).status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn denials_answer_the_gateways_statuses_and_bodies() {
        let revoked = Denial::Denied(DenyReason::Revoked);
        assert_eq!(revoked.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(revoked.body(), r#"{"error":"API key revoked","reason":"DENY_REASON_REVOKED"}"#);
        let response = revoked.response::<Full<Bytes>>();
        assert_eq!(response.headers()[header::WWW_AUTHENTICATE], "Bearer");
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
        assert_eq!(Denial::Denied(DenyReason::Throttled).status(), StatusCode::TOO_MANY_REQUESTS);
        let scope = Denial::Denied(DenyReason::InsufficientScope).response::<Full<Bytes>>();
        assert_eq!(scope.status(), StatusCode::FORBIDDEN);
        assert!(scope.headers().get(header::WWW_AUTHENTICATE).is_none());
        assert_eq!(Denial::Unavailable.status(), StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn a_rate_limited_refusal_carries_the_ratelimit_headers() {
        let in_ten_seconds =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 10;
        let refusal = Refusal {
            reason: DenyReason::RateLimited,
            rate_limit: Some(crate::pb::RateLimitStatus {
                name: "per-minute".into(),
                limit: 100,
                remaining: 0,
                reset_at: Some(prost_types::Timestamp { seconds: in_ten_seconds as i64, nanos: 0 }),
            }),
        };
        let response = Denial::from(refusal).response::<Full<Bytes>>();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()["ratelimit-limit"], "100");
        assert_eq!(response.headers()["ratelimit-remaining"], "0");
        let reset: u64 = response.headers()["ratelimit-reset"].to_str().unwrap().parse().unwrap();
        assert!((9..=10).contains(&reset), "{reset}");
        let body = Denial::Denied(DenyReason::RateLimited).body();
        assert_eq!(Denial::from(Refusal { reason: DenyReason::RateLimited, rate_limit: None }).body(), body);
    }

    #[test]
    fn audit_endpoints_lose_control_characters_and_stay_within_the_limit() {
        assert_eq!(audit_endpoint("/a\u{7f}/b\n"), "/a/b");
        let long = format!("/{}", "é".repeat(MAX_ENDPOINT));
        let cut = audit_endpoint(&long);
        assert!(cut.len() <= MAX_ENDPOINT && cut.len() > MAX_ENDPOINT - 2);
    }
}
