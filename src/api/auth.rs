//! KeyAdmin authentication, as a tower layer around the KeyAdmin service:
//! every call's credentials (a bearer token, else the mTLS client identity)
//! become a [`Principal`](crate::service::access::Principal) in the request extensions before any handler
//! runs, or the call ends UNAUTHENTICATED. What the principal may do is the
//! service's decision ([`crate::service::access::Access::authorize`]).

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use tonic::{Status, body::Body, codegen::http, server::NamedService};
use tower::{Layer, Service};

use super::peer::PeerInfo;
use crate::{
    keys::operator::AdminAction,
    service::access::{Access, Credentials, Peer},
};

/// Authenticates every KeyAdmin call.
#[derive(Debug, Clone)]
pub struct AdminAuthLayer {
    access: Arc<Access>,
}

impl AdminAuthLayer {
    pub fn new(access: Arc<Access>) -> Self {
        Self { access }
    }
}

impl<S> Layer<S> for AdminAuthLayer {
    type Service = AdminAuth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AdminAuth { inner, access: Arc::clone(&self.access) }
    }
}

#[derive(Debug, Clone)]
pub struct AdminAuth<S> {
    inner: S,
    access: Arc<Access>,
}

impl<S: NamedService> NamedService for AdminAuth<S> {
    const NAME: &'static str = S::NAME;
}

/// The KeyAdmin RPC a path names.
fn action_of(path: &str) -> Option<AdminAction> {
    let method = path.strip_prefix("/keywarden.v1.KeyAdmin/")?;
    AdminAction::ALL.into_iter().find(|a| a.rpc() == method)
}

/// The token of an `authorization` header; `Err` for a header that is not
/// `Bearer <token>`.
fn bearer(value: &[u8]) -> Result<&[u8], Status> {
    value
        .get(..7)
        .filter(|scheme| scheme.eq_ignore_ascii_case(b"bearer "))
        .and_then(|_| value.get(7..))
        .map(<[u8]>::trim_ascii)
        .ok_or_else(|| Status::unauthenticated("authorization must be `Bearer <operator token>`"))
}

impl<S> Service<http::Request<Body>> for AdminAuth<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        // The clone that was made ready is the one that serves this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let access = Arc::clone(&self.access);
        Box::pin(async move {
            // Unknown methods fall through to the service's UNIMPLEMENTED.
            let Some(action) = action_of(request.uri().path()) else {
                return inner.call(request).await;
            };
            let info = request.extensions().get::<PeerInfo>().cloned().unwrap_or_default();
            let peer = Peer { identity: info.identity, ip: info.addr.map(|a| a.ip()) };
            let header = request.headers().get(http::header::AUTHORIZATION).map(|v| bearer(v.as_bytes()));
            let principal = match header.transpose() {
                Err(status) => Err(status),
                Ok(bearer) => {
                    access.authenticate(Credentials { bearer, peer }, action).await.map_err(Status::from)
                }
            };
            match principal {
                Ok(principal) => {
                    request.extensions_mut().insert(principal);
                    inner.call(request).await
                }
                Err(status) => Ok(status.into_http()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_read_case_insensitively_and_trimmed() {
        assert_eq!(bearer(b"Bearer kwop_x ").unwrap(), b"kwop_x");
        assert_eq!(bearer(b"bearer abc").unwrap(), b"abc");
        for bad in [&b"Basic Zm9vOmJhcg=="[..], b"kwop_x", b"Bear"] {
            assert_eq!(bearer(bad).unwrap_err().code(), tonic::Code::Unauthenticated);
        }
    }

    #[test]
    fn every_admin_rpc_has_a_path() {
        for action in AdminAction::ALL {
            assert_eq!(action_of(&format!("/keywarden.v1.KeyAdmin/{}", action.rpc())), Some(action));
        }
        assert_eq!(action_of("/keywarden.v1.KeyVerify/Verify"), None);
        assert_eq!(action_of("/keywarden.v1.KeyAdmin/Nope"), None);
    }
}
