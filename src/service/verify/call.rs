//! The call the pipeline runs on ([`VerifyCall`]), typed at the boundary:
//! the key parsed or malformed, the client address and the required scope
//! parsed, the audit fields checked. The API checks the protocol's strings
//! into it ([`VerifyCall::check`]); the gateway builds it from its route
//! match.

use std::net::IpAddr;

use crate::{
    keys::{KeyPrefix, PlainKey, ScopeCatalogue, ScopeSet},
    service::{
        ServiceError,
        validate::{self, Violations},
    },
};

/// A Verify call as the protocol carries it, before any check.
#[derive(Clone)]
pub struct VerifyInput {
    pub key: String,
    pub ip: String,
    pub required_scope: String,
    pub endpoint: String,
    pub method: String,
    /// Credits an allowed call takes (0 means 1).
    pub cost: u32,
}

impl std::fmt::Debug for VerifyInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyInput")
            .field("key", &"[redacted]")
            .field("ip", &self.ip)
            .field("required_scope", &self.required_scope)
            .field("endpoint", &self.endpoint)
            .field("method", &self.method)
            .field("cost", &self.cost)
            .finish()
    }
}

/// The key a call presents: one in keywarden's format with a valid
/// checksum, or not (a verdict, decided without I/O).
#[derive(Debug, Clone)]
pub enum Presented {
    Key(PlainKey),
    Malformed,
}

impl Presented {
    pub fn parse(prefix: &KeyPrefix, key: &str) -> Self {
        PlainKey::parse(prefix, key).map_or(Self::Malformed, Self::Key)
    }
}

/// A Verify call, checked: what the pipeline runs on. The API builds it
/// from protobuf with [`VerifyCall::check`]; the gateway builds it from its
/// route match, whose scope and client address are already typed.
#[derive(Debug, Clone)]
pub struct VerifyCall {
    pub key: Presented,
    pub ip: Option<IpAddr>,
    pub required: Option<ScopeSet>,
    /// Fit for the audit row (validated, or cut by the gateway); may be
    /// empty.
    pub endpoint: String,
    pub method: String,
    /// Credits an allowed call takes (0 means 1).
    pub cost: u32,
}

impl VerifyCall {
    /// Validates a Verify request's fields, naming each bad one, and parses
    /// its key. A malformed key is a verdict, not an error.
    pub fn check(
        catalogue: &ScopeCatalogue,
        prefix: &KeyPrefix,
        input: VerifyInput,
    ) -> Result<Self, ServiceError> {
        let mut v = Violations::default();
        if input.key.len() > validate::MAX_PRESENTED_KEY {
            v.add("key", format!("must be at most {} characters", validate::MAX_PRESENTED_KEY));
        }
        let ip = match input.ip.as_str() {
            "" => None,
            text => text.parse::<IpAddr>().map_or_else(
                |_| {
                    v.add("ip", "is not an IPv4 or IPv6 address (leave it empty if unknown)");
                    None
                },
                Some,
            ),
        };
        let required = match input.required_scope.as_str() {
            "" => None,
            name => {
                let found = catalogue.required(name);
                if found.is_none() {
                    v.add(
                        "required_scope",
                        format!(
                            "unknown scope {}; ListScopes returns the catalogue",
                            validate::excerpt(name, validate::MAX_EXCERPT)
                        ),
                    );
                }
                found
            }
        };
        v.check("endpoint", validate::endpoint(&input.endpoint));
        v.check("method", validate::method(&input.method));
        v.into_result()?;
        Ok(Self {
            key: Presented::parse(prefix, &input.key),
            ip,
            required,
            endpoint: input.endpoint,
            method: input.method,
            cost: input.cost,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(key: &str, ip: &str, scope: &str) -> VerifyInput {
        VerifyInput {
            key: key.into(),
            ip: ip.into(),
            required_scope: scope.into(),
            endpoint: "/v1/invoices".into(),
            method: "GET".into(),
            cost: 0,
        }
    }

    #[test]
    fn a_checked_call_carries_typed_fields_and_a_parsed_key() {
        let catalogue = ScopeCatalogue::default();
        let prefix = KeyPrefix::new("sntr_").unwrap();
        let key = PlainKey::generate(&prefix).unwrap();
        let call =
            VerifyCall::check(&catalogue, &prefix, input(key.expose(), "::1", "invoice:read")).unwrap();
        assert!(matches!(call.key, Presented::Key(k) if k.expose() == key.expose()));
        assert_eq!(call.ip, Some("::1".parse().unwrap()));
        assert_eq!(call.required, catalogue.required("invoice:read"));
        let call = VerifyCall::check(&catalogue, &prefix, input("sntr_nope", "", "")).unwrap();
        assert!(matches!(call.key, Presented::Malformed));
        assert_eq!((call.ip, call.required), (None, None));
        let long = "k".repeat(validate::MAX_PRESENTED_KEY + 1);
        let Err(ServiceError::Invalid(fields)) = VerifyCall::check(&catalogue, &prefix, input(&long, "", ""))
        else {
            panic!("an overlong key is a bad field");
        };
        assert_eq!(fields[0].field, "key");
    }
}
