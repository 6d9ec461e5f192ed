//! Who a caller is under mTLS, as its client certificate says: typed by
//! the kind of name, so that configured allow-lists match only their own
//! kind. Free of I/O (the certificate is parsed in `api::peer`).

use std::sync::Arc;

/// A client certificate's identity, typed by the SAN it came from: an
/// allow-list entry with a scheme (`spiffe://…`) matches only a URI SAN,
/// a bare name only a DNS SAN, so a DNS SAN spelled like a URI matches
/// nothing it imitates.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ClientIdentity {
    Uri(Arc<str>),
    Dns(Arc<str>),
}

impl ClientIdentity {
    /// The name, as audit rows and logs show it.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Uri(s) | Self::Dns(s) => s,
        }
    }

    /// Whether an allow-list entry names this identity: an entry with a
    /// scheme names a URI SAN, any other entry a DNS SAN.
    pub fn matches(&self, entry: &str) -> bool {
        match self {
            Self::Uri(uri) => has_scheme(entry) && **uri == *entry,
            Self::Dns(name) => !has_scheme(entry) && **name == *entry,
        }
    }
}

/// `scheme:` before anything else, as RFC 3986 spells one.
pub fn has_scheme(s: &str) -> bool {
    s.split_once(':').is_some_and(|(scheme, _)| {
        scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme.chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
    })
}
