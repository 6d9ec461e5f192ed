//! keywarden's HTTP contract, written once for both places that answer
//! HTTP for it: the server's gateway mode (Envoy ext_authz) and
//! keywarden-client's tower layer. A service behind either answers the
//! same request the same way.
//!
//! - [`presented_key`]: where a request's key comes from
//!   ([`KEY_HEADERS`]), and the refusal of a key presented twice.
//! - [`DenyReason`]: why a key was denied, with its wire name, HTTP status
//!   and short text.
//! - [`Denial`]: a refusal as HTTP: status, JSON body
//!   `{"error", "reason"}` and `www-authenticate: Bearer` on 401.
//! - The IETF RateLimit header fields of a 429 ([`RATELIMIT_HEADERS`],
//!   [`reset_seconds`]).
//!
//! It has no dependencies, so that neither side inherits anything from
//! the other through it.

/// The header carrying `Bearer <key>`.
pub const AUTHORIZATION: &str = "authorization";
/// The header carrying a bare key.
pub const X_API_KEY: &str = "x-api-key";
/// Every header a key may come in: all of them are removed before an
/// allowed request goes on, whichever carried the key.
pub const KEY_HEADERS: [&str; 2] = [AUTHORIZATION, X_API_KEY];

/// The content type of a denial's body.
pub const CONTENT_TYPE: &str = "application/json";
/// The challenge a 401 carries.
pub const WWW_AUTHENTICATE: (&str, &str) = ("www-authenticate", "Bearer");
/// The IETF RateLimit header fields (draft-ietf-httpapi-ratelimit-headers)
/// of a rate-limited denial: the limit, what is left, seconds until full.
pub const RATELIMIT_HEADERS: [&str; 3] = ["ratelimit-limit", "ratelimit-remaining", "ratelimit-reset"];

/// The key a request presents, given its `authorization` and `x-api-key`
/// header values (a value that is not text counts as empty):
/// `authorization: Bearer <key>` (scheme case-insensitive, key trimmed) or
/// `x-api-key`; empty for another scheme or no header. `None` when both
/// headers are sent: whichever was not checked would go on as if it had
/// been.
pub fn presented_key<'a>(authorization: Option<&'a str>, x_api_key: Option<&'a str>) -> Option<&'a str> {
    match (authorization, x_api_key) {
        (Some(_), Some(_)) => None,
        (Some(value), None) => Some(
            value
                .split_once(' ')
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                .map(|(_, key)| key.trim())
                .unwrap_or_default(),
        ),
        (None, Some(key)) => Some(key.trim()),
        (None, None) => Some(""),
    }
}

/// Why a verification was denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DenyReason {
    /// No key, or not in keywarden's format, or a bad checksum.
    Malformed,
    /// No key with this prefix and secret.
    NotFound,
    /// The key was revoked (or its rotation's grace period ended).
    Revoked,
    /// The key's expiry has passed.
    Expired,
    /// The caller's address is outside the key's allow-list.
    IpNotAllowed,
    /// The key lacks the scope the call needs.
    InsufficientScope,
    /// Too many wrong secrets lately on this prefix or from this client:
    /// refused without checking the secret.
    Throttled,
    /// Gateway mode: no route matched, and unmatched requests are denied.
    /// Decided before any key is looked at.
    NoRoute,
    /// One of the key's rate limits has no token left for this call.
    RateLimited,
    /// The key's credits cannot pay this call's cost.
    QuotaExhausted,
    /// Gateway mode: the HTTP request is not in the one form routes are
    /// matched in, or presents a key twice. Decided before any key is
    /// looked at.
    MalformedRequest,
    /// An operator disabled the key; it may be enabled again.
    Disabled,
}

impl DenyReason {
    /// Every reason, in declaration order (so `ALL[r as usize] == r`).
    pub const ALL: [DenyReason; 12] = [
        Self::Malformed,
        Self::NotFound,
        Self::Revoked,
        Self::Expired,
        Self::IpNotAllowed,
        Self::InsufficientScope,
        Self::Throttled,
        Self::NoRoute,
        Self::RateLimited,
        Self::QuotaExhausted,
        Self::MalformedRequest,
        Self::Disabled,
    ];

    /// The name stored in audit rows and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "MALFORMED",
            Self::NotFound => "NOT_FOUND",
            Self::Revoked => "REVOKED",
            Self::Expired => "EXPIRED",
            Self::IpNotAllowed => "IP_NOT_ALLOWED",
            Self::InsufficientScope => "INSUFFICIENT_SCOPE",
            Self::Throttled => "THROTTLED",
            Self::NoRoute => "NO_ROUTE",
            Self::RateLimited => "RATE_LIMITED",
            Self::QuotaExhausted => "QUOTA_EXHAUSTED",
            Self::MalformedRequest => "MALFORMED_REQUEST",
            Self::Disabled => "DISABLED",
        }
    }

    /// The reason named by [`as_str`](Self::as_str).
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// The protobuf enum value's name (`DENY_REASON_…`), the `reason` of a
    /// denial's body.
    pub fn wire_name(self) -> &'static str {
        match self {
            Self::Malformed => "DENY_REASON_MALFORMED",
            Self::NotFound => "DENY_REASON_NOT_FOUND",
            Self::Revoked => "DENY_REASON_REVOKED",
            Self::Expired => "DENY_REASON_EXPIRED",
            Self::IpNotAllowed => "DENY_REASON_IP_NOT_ALLOWED",
            Self::InsufficientScope => "DENY_REASON_INSUFFICIENT_SCOPE",
            Self::Throttled => "DENY_REASON_THROTTLED",
            Self::NoRoute => "DENY_REASON_NO_ROUTE",
            Self::RateLimited => "DENY_REASON_RATE_LIMITED",
            Self::QuotaExhausted => "DENY_REASON_QUOTA_EXHAUSTED",
            Self::MalformedRequest => "DENY_REASON_MALFORMED_REQUEST",
            Self::Disabled => "DENY_REASON_DISABLED",
        }
    }

    /// The reason named by [`wire_name`](Self::wire_name).
    pub fn from_wire_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.wire_name() == s)
    }

    /// The HTTP status the calling service answers: 400 when the request
    /// itself is refused, 401 when the caller is not authenticated, 403
    /// when it is but may not do this, 429 when it must slow down.
    pub fn http_status(self) -> u16 {
        match self {
            Self::MalformedRequest => 400,
            Self::Malformed | Self::NotFound | Self::Revoked | Self::Expired => 401,
            Self::IpNotAllowed | Self::InsufficientScope | Self::NoRoute | Self::Disabled => 403,
            Self::Throttled | Self::RateLimited | Self::QuotaExhausted => 429,
        }
    }

    /// The `error` text of a denial's body.
    pub fn short_text(self) -> &'static str {
        match self {
            Self::Malformed => "missing or malformed API key",
            Self::NotFound => "invalid API key",
            Self::Revoked => "API key revoked",
            Self::Expired => "API key expired",
            Self::IpNotAllowed => "client IP not allowed for this key",
            Self::InsufficientScope => "API key lacks the scope this route needs",
            Self::Throttled => "too many failed attempts; retry later",
            Self::NoRoute => "no such route",
            Self::RateLimited => "rate limit exceeded; retry later",
            Self::QuotaExhausted => "the key's credits are used up",
            Self::MalformedRequest => "request not in canonical form",
            Self::Disabled => "API key disabled",
        }
    }
}

/// A refusal, as HTTP answers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    /// keywarden denied the key, or the request was refused before a key
    /// was looked at.
    Denied(DenyReason),
    /// Denied for a reason this side does not know (a newer server): 403.
    Unspecified,
    /// keywarden could not be reached or could not decide safely: 503.
    Unavailable,
    /// keywarden refused the call itself (e.g. an unknown scope): 500.
    Misconfigured,
}

/// The `reason` of a denial that names none.
const UNSPECIFIED: &str = "DENY_REASON_UNSPECIFIED";

impl Denial {
    /// The HTTP status.
    pub fn status(self) -> u16 {
        match self {
            Self::Denied(reason) => reason.http_status(),
            Self::Unspecified => 403,
            Self::Unavailable => 503,
            Self::Misconfigured => 500,
        }
    }

    /// The body's `error` text.
    pub fn error(self) -> &'static str {
        match self {
            Self::Denied(reason) => reason.short_text(),
            Self::Unspecified => "API key refused",
            Self::Unavailable => "API key check unavailable",
            Self::Misconfigured => "API key check misconfigured",
        }
    }

    /// The body's `reason`: the protobuf enum value's name.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Denied(reason) => reason.wire_name(),
            Self::Unspecified | Self::Unavailable | Self::Misconfigured => UNSPECIFIED,
        }
    }

    /// The challenge header a 401 carries; no other status has one.
    pub fn challenge(self) -> Option<(&'static str, &'static str)> {
        (self.status() == 401).then_some(WWW_AUTHENTICATE)
    }

    /// The JSON body, `{"error":"…","reason":"DENY_REASON_…"}`.
    pub fn body(self) -> String {
        json_body(self.error(), self.reason())
    }
}

/// A denial's JSON body with another `error` text (the server says why it
/// cannot decide), escaped as JSON strings are.
pub fn json_body(error: &str, reason: &str) -> String {
    let mut body = String::with_capacity(24 + error.len() + reason.len());
    body.push_str(r#"{"error":"#);
    push_json_string(&mut body, error);
    body.push_str(r#","reason":"#);
    push_json_string(&mut body, reason);
    body.push('}');
    body
}

fn push_json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// `ratelimit-reset`: whole seconds until the limit is full again, rounded
/// up (a client that waits that long finds a token), never negative.
pub fn reset_seconds(millis_until_full: i128) -> u64 {
    u64::try_from((millis_until_full.max(0) + 999) / 1_000).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The contract, one row per deny reason: what the gateway and the
    /// tower layer both answer.
    #[test]
    fn every_deny_reason_has_its_status_text_name_and_challenge() {
        #[rustfmt::skip]
        let table: [(DenyReason, u16, &str, &str, bool); 12] = [
            (DenyReason::Malformed, 401, "missing or malformed API key", "DENY_REASON_MALFORMED", true),
            (DenyReason::NotFound, 401, "invalid API key", "DENY_REASON_NOT_FOUND", true),
            (DenyReason::Revoked, 401, "API key revoked", "DENY_REASON_REVOKED", true),
            (DenyReason::Expired, 401, "API key expired", "DENY_REASON_EXPIRED", true),
            (DenyReason::IpNotAllowed, 403, "client IP not allowed for this key", "DENY_REASON_IP_NOT_ALLOWED", false),
            (DenyReason::InsufficientScope, 403, "API key lacks the scope this route needs", "DENY_REASON_INSUFFICIENT_SCOPE", false),
            (DenyReason::Throttled, 429, "too many failed attempts; retry later", "DENY_REASON_THROTTLED", false),
            (DenyReason::NoRoute, 403, "no such route", "DENY_REASON_NO_ROUTE", false),
            (DenyReason::RateLimited, 429, "rate limit exceeded; retry later", "DENY_REASON_RATE_LIMITED", false),
            (DenyReason::QuotaExhausted, 429, "the key's credits are used up", "DENY_REASON_QUOTA_EXHAUSTED", false),
            (DenyReason::MalformedRequest, 400, "request not in canonical form", "DENY_REASON_MALFORMED_REQUEST", false),
            (DenyReason::Disabled, 403, "API key disabled", "DENY_REASON_DISABLED", false),
        ];
        assert_eq!(table.map(|row| row.0), DenyReason::ALL, "one row per reason, in order");
        for (i, (reason, status, text, name, challenged)) in table.into_iter().enumerate() {
            assert_eq!(reason as usize, i, "{reason:?} sits at its own index");
            let denial = Denial::Denied(reason);
            assert_eq!(denial.status(), status, "{reason:?}");
            assert_eq!(denial.error(), text, "{reason:?}");
            assert_eq!(denial.reason(), name, "{reason:?}");
            assert_eq!(denial.challenge().is_some(), challenged, "{reason:?}");
            assert_eq!(denial.body(), format!(r#"{{"error":"{text}","reason":"{name}"}}"#));
            assert_eq!(DenyReason::from_wire_name(name), Some(reason));
            assert_eq!(DenyReason::parse(reason.as_str()), Some(reason));
            assert_eq!(name, format!("DENY_REASON_{}", reason.as_str()));
        }
    }

    #[test]
    fn refusals_without_a_reason_answer_403_503_and_500() {
        assert_eq!((Denial::Unspecified.status(), Denial::Unspecified.reason()), (403, UNSPECIFIED));
        assert_eq!((Denial::Unavailable.status(), Denial::Unavailable.reason()), (503, UNSPECIFIED));
        assert_eq!((Denial::Misconfigured.status(), Denial::Misconfigured.reason()), (500, UNSPECIFIED));
        assert!(Denial::Unavailable.challenge().is_none());
        assert_eq!(DenyReason::from_wire_name(UNSPECIFIED), None);
    }

    #[test]
    fn the_key_comes_from_one_header_and_two_are_refused() {
        assert_eq!(presented_key(Some("Bearer sntr_a"), None), Some("sntr_a"));
        assert_eq!(presented_key(Some("bearer  sntr_a "), None), Some("sntr_a"));
        assert_eq!(presented_key(None, Some(" sntr_b")), Some("sntr_b"));
        assert_eq!(presented_key(Some("Basic dXNlcg=="), None), Some(""));
        assert_eq!(presented_key(Some("Bearer"), None), Some(""));
        assert_eq!(presented_key(None, None), Some(""));
        assert_eq!(presented_key(Some("Bearer sntr_a"), Some("sntr_b")), None);
        assert_eq!(presented_key(Some(""), Some("sntr_b")), None);
    }

    #[test]
    fn bodies_escape_what_json_strings_must() {
        assert_eq!(
            json_body("db \"down\"\\\n\u{1}", UNSPECIFIED),
            r#"{"error":"db \"down\"\\\n\u0001","reason":"DENY_REASON_UNSPECIFIED"}"#
        );
    }

    #[test]
    fn reset_seconds_round_up_and_never_go_negative() {
        assert_eq!(reset_seconds(-5_000), 0);
        assert_eq!(reset_seconds(0), 0);
        assert_eq!(reset_seconds(1), 1);
        assert_eq!(reset_seconds(1_000), 1);
        assert_eq!(reset_seconds(1_001), 2);
        assert_eq!(reset_seconds(i128::MAX - 1_000), u64::MAX);
    }
}
