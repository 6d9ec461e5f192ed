//! Who may call the verification surfaces under mTLS, per surface:
//! `KEYWARDEN_VERIFY_CALLERS` for Verify and Envoy's Check, and
//! `KEYWARDEN_OUTCOME_REPORTERS` (by default the same list) for
//! RecordOutcomes and Envoy's access-log stream, which write statuses onto
//! audit rows. Anyone else gets PERMISSION_DENIED. An empty list admits
//! every client the transport let in (the handshake has already refused
//! clients without a certificate from the client CA). Entries match typed
//! identities ([`ClientIdentity::matches`]).

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use tonic::{Status, body::Body, codegen::http};
use tower::{Layer, Service};

use super::peer::{ClientIdentity, PeerInfo};

/// The methods each list guards; every other method passes.
const VERIFY_METHODS: [&str; 2] =
    ["/keywarden.v1.KeyVerify/Verify", "/envoy.service.auth.v3.Authorization/Check"];
const REPORT_METHODS: [&str; 2] = [
    "/keywarden.v1.KeyVerify/RecordOutcomes",
    "/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs",
];

/// One surface's allowed identities; empty admits every client.
#[derive(Debug, Clone, Default)]
struct Allowed(Arc<[String]>);

impl Allowed {
    fn check(&self, identity: Option<&ClientIdentity>, surface: &str) -> Result<(), Status> {
        if self.0.is_empty() {
            return Ok(());
        }
        match identity {
            Some(id) if self.0.iter().any(|entry| id.matches(entry)) => Ok(()),
            Some(_) => Err(Status::permission_denied(format!("this client identity may not call {surface}"))),
            None => Err(Status::permission_denied(format!(
                "{surface} needs a client certificate naming an allowed identity (URI or DNS SAN)"
            ))),
        }
    }
}

/// The allow-lists of both surfaces.
#[derive(Debug, Clone, Default)]
pub struct Callers {
    verify: Allowed,
    reporters: Allowed,
}

impl Callers {
    /// `reporters` defaults to `verify` when `None`.
    pub fn new(verify: &[String], reporters: Option<&[String]>) -> Self {
        let verify = Allowed(verify.into());
        let reporters = reporters.map_or_else(|| verify.clone(), |r| Allowed(r.into()));
        Self { verify, reporters }
    }

    /// Whether `identity` may call `path`.
    pub fn check(&self, path: &str, identity: Option<&ClientIdentity>) -> Result<(), Status> {
        if VERIFY_METHODS.contains(&path) {
            self.verify.check(identity, "KeyVerify")
        } else if REPORT_METHODS.contains(&path) {
            self.reporters.check(identity, "RecordOutcomes and the access-log stream")
        } else {
            Ok(())
        }
    }
}

impl<S> Layer<S> for Callers {
    type Service = CallerCheck<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CallerCheck { inner, callers: self.clone() }
    }
}

#[derive(Debug, Clone)]
pub struct CallerCheck<S> {
    inner: S,
    callers: Callers,
}

impl<S> Service<http::Request<Body>> for CallerCheck<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let identity = request.extensions().get::<PeerInfo>().and_then(|p| p.identity.as_ref());
        match self.callers.check(request.uri().path(), identity) {
            Ok(()) => Box::pin(self.inner.call(request)),
            Err(status) => Box::pin(std::future::ready(Ok(status.into_http()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(entries: &[&str]) -> Vec<String> {
        entries.iter().map(|s| s.to_string()).collect()
    }

    fn code(callers: &Callers, path: &str, identity: Option<ClientIdentity>) -> Result<(), tonic::Code> {
        callers.check(path, identity.as_ref()).map_err(|s| s.code())
    }

    const VERIFY: &str = "/keywarden.v1.KeyVerify/Verify";
    const REPORT: &str = "/keywarden.v1.KeyVerify/RecordOutcomes";

    #[test]
    fn only_listed_identities_pass_when_a_list_is_set() {
        let uri = |s: &str| Some(ClientIdentity::Uri(s.into()));
        let callers = Callers::new(&list(&["spiffe://a/invoice"]), None);
        assert_eq!(code(&callers, VERIFY, uri("spiffe://a/invoice")), Ok(()));
        assert_eq!(code(&callers, VERIFY, uri("spiffe://a/other")), Err(tonic::Code::PermissionDenied));
        assert_eq!(code(&callers, VERIFY, None), Err(tonic::Code::PermissionDenied));
        // A DNS SAN that reads like the listed URI is not it.
        let spelled = Some(ClientIdentity::Dns("spiffe://a/invoice".into()));
        assert_eq!(code(&callers, VERIFY, spelled), Err(tonic::Code::PermissionDenied));
        assert_eq!(code(&Callers::default(), VERIFY, None), Ok(()));
        // Other methods are not this layer's business.
        assert_eq!(code(&callers, "/keywarden.v1.KeyAdmin/GetKey", None), Ok(()));
    }

    #[test]
    fn reporters_default_to_the_verify_callers_and_can_be_narrowed() {
        let uri = |s: &str| Some(ClientIdentity::Uri(s.into()));
        let same = Callers::new(&list(&["spiffe://a/envoy"]), None);
        assert_eq!(code(&same, REPORT, uri("spiffe://a/envoy")), Ok(()));
        let narrowed = Callers::new(
            &list(&["spiffe://a/envoy", "spiffe://a/checkout"]),
            Some(&list(&["spiffe://a/envoy"])),
        );
        assert_eq!(code(&narrowed, VERIFY, uri("spiffe://a/checkout")), Ok(()));
        assert_eq!(code(&narrowed, REPORT, uri("spiffe://a/checkout")), Err(tonic::Code::PermissionDenied));
        let stream = "/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs";
        assert_eq!(code(&narrowed, stream, uri("spiffe://a/checkout")), Err(tonic::Code::PermissionDenied));
        assert_eq!(code(&narrowed, stream, uri("spiffe://a/envoy")), Ok(()));
    }
}
