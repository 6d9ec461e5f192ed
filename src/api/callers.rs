//! Who may call KeyVerify: under mTLS with `KEYWARDEN_VERIFY_CALLERS` set,
//! only those client identities; anyone else gets PERMISSION_DENIED. (The
//! handshake has already refused clients without a certificate from the
//! client CA.)

use std::sync::Arc;

use tonic::{Request, Status, service::Interceptor};

use super::peer::PeerInfo;

#[derive(Debug, Clone, Default)]
pub struct VerifyCallers {
    /// Empty: every caller the transport let in.
    allowed: Arc<[String]>,
}

impl VerifyCallers {
    pub fn new(allowed: &[String]) -> Self {
        Self { allowed: allowed.into() }
    }
}

impl Interceptor for VerifyCallers {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        if self.allowed.is_empty() {
            return Ok(request);
        }
        let identity = request.extensions().get::<PeerInfo>().and_then(|p| p.identity.as_deref());
        match identity {
            Some(id) if self.allowed.iter().any(|a| a == id) => Ok(request),
            Some(_) => Err(Status::permission_denied("this client identity may not call KeyVerify")),
            None => Err(Status::permission_denied(
                "KeyVerify needs a client certificate naming an allowed identity (URI or DNS SAN)",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(allowed: &[&str], identity: Option<&str>) -> Result<(), tonic::Code> {
        let allowed: Vec<String> = allowed.iter().map(|s| s.to_string()).collect();
        let mut request = Request::new(());
        request.extensions_mut().insert(PeerInfo { addr: None, identity: identity.map(Arc::from) });
        VerifyCallers::new(&allowed).call(request).map(|_| ()).map_err(|s| s.code())
    }

    #[test]
    fn only_listed_identities_pass_when_a_list_is_set() {
        assert_eq!(call(&["spiffe://a/invoice"], Some("spiffe://a/invoice")), Ok(()));
        assert_eq!(
            call(&["spiffe://a/invoice"], Some("spiffe://a/other")),
            Err(tonic::Code::PermissionDenied)
        );
        assert_eq!(call(&["spiffe://a/invoice"], None), Err(tonic::Code::PermissionDenied));
        assert_eq!(call(&[], None), Ok(()));
    }
}
