//! Admin authentication: `authorization: Bearer <token>` against the
//! configured tokens. Tokens are compared as SHA-256 digests in constant
//! time, and the matching token's name becomes the request's [`Actor`].

use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::{Request, Status, service::Interceptor};

use crate::service::admin::Actor;

#[derive(Clone)]
pub struct AdminAuth {
    tokens: std::sync::Arc<Vec<(String, [u8; 32])>>,
}

impl std::fmt::Debug for AdminAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.tokens.iter().map(|(n, _)| n.as_str()).collect();
        f.debug_struct("AdminAuth").field("token_names", &names).finish()
    }
}

fn digest(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

impl AdminAuth {
    pub fn new(tokens: &[(String, SecretString)]) -> Self {
        let tokens =
            tokens.iter().map(|(name, t)| (name.clone(), digest(t.expose_secret().as_bytes()))).collect();
        Self { tokens: std::sync::Arc::new(tokens) }
    }

    /// The name of the token presented, if it is one of ours.
    fn authenticate(&self, presented: &[u8]) -> Option<&str> {
        let presented = digest(presented);
        let mut found = None;
        // Every configured token is compared, match or not.
        for (name, expected) in self.tokens.iter() {
            if bool::from(presented.ct_eq(expected)) && found.is_none() {
                found = Some(name.as_str());
            }
        }
        found
    }
}

impl Interceptor for AdminAuth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let header = request
            .metadata()
            .get("authorization")
            .ok_or_else(|| Status::unauthenticated("missing `authorization: Bearer <admin token>`"))?;
        let value = header.as_bytes();
        let token = value
            .get(..7)
            .filter(|scheme| scheme.eq_ignore_ascii_case(b"bearer "))
            .map(|_| value[7..].trim_ascii())
            .ok_or_else(|| Status::unauthenticated("authorization must be `Bearer <admin token>`"))?;
        let actor = self.authenticate(token).ok_or_else(|| Status::unauthenticated("invalid admin token"))?;
        let actor = Actor(actor.to_owned());
        request.extensions_mut().insert(actor);
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> AdminAuth {
        AdminAuth::new(&[
            ("admin".into(), SecretString::from("first-token-0123456789")),
            ("portal".into(), SecretString::from("second-token-0123456789")),
        ])
    }

    fn call(header: Option<&str>) -> Result<Actor, Status> {
        let mut request = Request::new(());
        if let Some(h) = header {
            request.metadata_mut().insert("authorization", h.parse().unwrap());
        }
        auth().call(request).map(|r| r.extensions().get::<Actor>().cloned().unwrap())
    }

    #[test]
    fn tokens_authenticate_as_their_names() {
        assert_eq!(call(Some("Bearer first-token-0123456789")).unwrap(), Actor("admin".into()));
        assert_eq!(call(Some("bearer second-token-0123456789")).unwrap(), Actor("portal".into()));
    }

    #[test]
    fn missing_malformed_and_wrong_tokens_are_unauthenticated() {
        for header in [None, Some("first-token-0123456789"), Some("Bearer nope"), Some("Basic Zm9vOmJhcg==")]
        {
            let status = call(header).unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{header:?}");
            assert!(!status.message().contains("first-token"));
        }
    }

    #[test]
    fn debug_shows_names_only() {
        let shown = format!("{:?}", auth());
        assert!(shown.contains("portal") && !shown.contains("token-0123"));
    }
}
