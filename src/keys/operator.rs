//! Operator credentials: the `kwop_` token format, roles, and what each role
//! may do.
//!
//! Operator tokens use the key format ([`PlainKey`]) with their own prefix,
//! so that secret scanners tell them from merchant keys and a typo never
//! costs a lookup. They are high-entropy (43 random base62 characters), so a
//! keyed SHA-256 is enough at rest; scrypt's cost buys nothing against a
//! 256-bit secret.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use subtle::ConstantTimeEq;

use super::{
    format::{KeyPrefix, Malformed, PlainKey, RandomnessUnavailable},
    hash::{PepperId, SubkeyMacs},
};

/// The prefix of every operator token.
pub const OPERATOR_PREFIX: &str = "kwop_";

fn prefix() -> KeyPrefix {
    // A constant that satisfies the prefix rules (unit-tested below).
    KeyPrefix::new(OPERATOR_PREFIX).unwrap_or_default()
}

/// An operator token as issued and stored: who it is for, what it may
/// do, and its digest (never the secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperatorToken {
    pub id: String,
    pub name: String,
    pub role: OperatorRole,
    /// Empty: every merchant.
    pub merchant_ids: Vec<String>,
    pub prefix: String,
    pub digest: Vec<u8>,
    /// The pepper generation `digest` was made under.
    pub pepper: PepperId,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// A well-formed operator token. Holds a secret: Debug shows the lookup prefix only.
#[derive(Clone)]
pub struct OperatorSecret(PlainKey);

impl OperatorSecret {
    pub fn generate() -> Result<Self, RandomnessUnavailable> {
        PlainKey::generate(&prefix()).map(Self)
    }

    /// Shape and checksum only: no store work for a typo or garbage.
    pub fn parse(presented: &str) -> Result<Self, Malformed> {
        PlainKey::parse(&prefix(), presented).map(Self)
    }

    /// Whether `presented` claims to be an operator token (it may still be malformed).
    pub fn looks_like(presented: &[u8]) -> bool {
        presented.starts_with(OPERATOR_PREFIX.as_bytes())
    }

    /// The store index, safe to display.
    pub fn lookup_prefix(&self) -> String {
        self.0.lookup_prefix().as_str().to_owned()
    }

    /// Shown once, to its creator.
    pub fn expose(&self) -> &str {
        self.0.expose()
    }
}

impl fmt::Debug for OperatorSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OperatorSecret({}…[redacted])", self.lookup_prefix())
    }
}

/// Digests operator tokens for storage under a key derived from the pepper,
/// so a database dump alone cannot be matched against guesses. New digests
/// use the current pepper; a stored digest names the generation it was
/// made under, and is checked under that one.
#[derive(Clone, Debug)]
pub struct TokenDigester(SubkeyMacs);

impl TokenDigester {
    pub fn new(macs: SubkeyMacs) -> Self {
        Self(macs)
    }

    /// The digest under the current pepper, and that pepper's id.
    pub fn digest(&self, token: &OperatorSecret) -> (PepperId, [u8; 32]) {
        let (id, mac) = self.0.current();
        (id.clone(), mac.digest(token.expose().as_bytes()))
    }

    /// Constant-time comparison of a token with a digest stored under
    /// generation `pepper`; never matches under a pepper not configured.
    pub fn matches(&self, token: &OperatorSecret, pepper: &PepperId, stored: &[u8]) -> bool {
        self.0.of(pepper).is_some_and(|mac| mac.digest(token.expose().as_bytes()).ct_eq(stored).into())
    }

    /// Whether a digest made under `pepper` is worth rewriting.
    pub fn is_current(&self, pepper: &PepperId) -> bool {
        self.0.current().0 == pepper
    }
}

/// What an operator may do. ADMIN is the bootstrap tokens' role too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OperatorRole {
    Admin,
    KeyManager,
    Auditor,
    /// Reports leaked keys of any merchant, and does nothing else.
    LeakReporter,
}

impl OperatorRole {
    pub const ALL: [Self; 4] = [Self::Admin, Self::KeyManager, Self::Auditor, Self::LeakReporter];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "ADMIN",
            Self::KeyManager => "KEY_MANAGER",
            Self::Auditor => "AUDITOR",
            Self::LeakReporter => "LEAK_REPORTER",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// Roles whose work spans every merchant, so a token of theirs is never
    /// limited to some.
    pub fn spans_merchants(self) -> bool {
        matches!(self, Self::Admin | Self::LeakReporter)
    }

    /// The permission matrix.
    pub fn allows(self, action: AdminAction) -> bool {
        use AdminAction::*;
        match self {
            Self::Admin => true,
            // A leak report revokes whichever merchant's key it proves, so
            // it is not a merchant-scoped manager's call.
            Self::KeyManager => !action.is_admin_only() && action != ReportLeakedKeys,
            Self::Auditor => {
                matches!(action, GetKey | ListKeys | GetKeyUsage | ListAuditEvents | ListScopes | ListEvents)
            }
            Self::LeakReporter => action == ReportLeakedKeys,
        }
    }
}

/// Every KeyAdmin RPC, as the permission matrix names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AdminAction {
    CreateKey,
    GetKey,
    ListKeys,
    UpdateKey,
    RevokeKey,
    RegenerateKey,
    GetKeyUsage,
    ListAuditEvents,
    ListScopes,
    CreateOperatorToken,
    ListOperatorTokens,
    RevokeOperatorToken,
    GetPepperStatus,
    ListEvents,
    CreateWebhookEndpoint,
    ListWebhookEndpoints,
    DeleteWebhookEndpoint,
    ListWebhookDeliveries,
    RedeliverEvent,
    DisableKey,
    EnableKey,
    ReportLeakedKeys,
}

impl AdminAction {
    pub const ALL: [Self; 22] = [
        Self::CreateKey,
        Self::GetKey,
        Self::ListKeys,
        Self::UpdateKey,
        Self::RevokeKey,
        Self::RegenerateKey,
        Self::GetKeyUsage,
        Self::ListAuditEvents,
        Self::ListScopes,
        Self::CreateOperatorToken,
        Self::ListOperatorTokens,
        Self::RevokeOperatorToken,
        Self::GetPepperStatus,
        Self::ListEvents,
        Self::CreateWebhookEndpoint,
        Self::ListWebhookEndpoints,
        Self::DeleteWebhookEndpoint,
        Self::ListWebhookDeliveries,
        Self::RedeliverEvent,
        Self::DisableKey,
        Self::EnableKey,
        Self::ReportLeakedKeys,
    ];

    /// The RPC's name, as audit rows and logs show it.
    pub fn rpc(self) -> &'static str {
        match self {
            Self::CreateKey => "CreateKey",
            Self::GetKey => "GetKey",
            Self::ListKeys => "ListKeys",
            Self::UpdateKey => "UpdateKey",
            Self::RevokeKey => "RevokeKey",
            Self::RegenerateKey => "RegenerateKey",
            Self::GetKeyUsage => "GetKeyUsage",
            Self::ListAuditEvents => "ListAuditEvents",
            Self::ListScopes => "ListScopes",
            Self::CreateOperatorToken => "CreateOperatorToken",
            Self::ListOperatorTokens => "ListOperatorTokens",
            Self::RevokeOperatorToken => "RevokeOperatorToken",
            Self::GetPepperStatus => "GetPepperStatus",
            Self::ListEvents => "ListEvents",
            Self::CreateWebhookEndpoint => "CreateWebhookEndpoint",
            Self::ListWebhookEndpoints => "ListWebhookEndpoints",
            Self::DeleteWebhookEndpoint => "DeleteWebhookEndpoint",
            Self::ListWebhookDeliveries => "ListWebhookDeliveries",
            Self::RedeliverEvent => "RedeliverEvent",
            Self::DisableKey => "DisableKey",
            Self::EnableKey => "EnableKey",
            Self::ReportLeakedKeys => "ReportLeakedKeys",
        }
    }

    /// Operator credentials, the deployment's secrets and where events
    /// go: ADMIN's alone.
    pub fn is_admin_only(self) -> bool {
        matches!(
            self,
            Self::CreateOperatorToken
                | Self::ListOperatorTokens
                | Self::RevokeOperatorToken
                | Self::GetPepperStatus
                | Self::CreateWebhookEndpoint
                | Self::ListWebhookEndpoints
                | Self::DeleteWebhookEndpoint
                | Self::ListWebhookDeliveries
                | Self::RedeliverEvent
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_operator_prefix_is_a_valid_key_prefix_distinct_from_merchant_keys() {
        assert!(KeyPrefix::new(OPERATOR_PREFIX).is_ok());
        assert_ne!(OPERATOR_PREFIX, KeyPrefix::default().as_str());
    }

    #[test]
    fn generated_tokens_parse_and_merchant_keys_do_not() {
        let token = OperatorSecret::generate().unwrap();
        assert!(token.expose().starts_with("kwop_"));
        assert!(OperatorSecret::parse(token.expose()).is_ok());
        let key = PlainKey::generate(&KeyPrefix::default()).unwrap();
        assert_eq!(OperatorSecret::parse(key.expose()).unwrap_err(), Malformed::Prefix);
        assert!(!format!("{token:?}").contains(&token.expose()[16..]));
    }

    #[test]
    fn the_matrix_is_the_documented_one() {
        use AdminAction::*;
        for action in AdminAction::ALL {
            assert!(OperatorRole::Admin.allows(action));
        }
        let manager: Vec<_> =
            AdminAction::ALL.into_iter().filter(|a| OperatorRole::KeyManager.allows(*a)).collect();
        assert_eq!(
            manager,
            [
                CreateKey,
                GetKey,
                ListKeys,
                UpdateKey,
                RevokeKey,
                RegenerateKey,
                GetKeyUsage,
                ListAuditEvents,
                ListScopes,
                ListEvents,
                DisableKey,
                EnableKey
            ]
        );
        let auditor: Vec<_> =
            AdminAction::ALL.into_iter().filter(|a| OperatorRole::Auditor.allows(*a)).collect();
        assert_eq!(auditor, [GetKey, ListKeys, GetKeyUsage, ListAuditEvents, ListScopes, ListEvents]);
        let reporter: Vec<_> =
            AdminAction::ALL.into_iter().filter(|a| OperatorRole::LeakReporter.allows(*a)).collect();
        assert_eq!(reporter, [ReportLeakedKeys], "a leak reporter reads nothing");
    }

    proptest! {
        #[test]
        fn parsing_never_panics_and_accepts_only_checksummed_tokens(s in "kwop_[0-9A-Za-z]{0,60}") {
            if let Ok(t) = OperatorSecret::parse(&s) {
                prop_assert_eq!(t.expose(), s.as_str());
            }
        }
    }
}
