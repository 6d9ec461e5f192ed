//! Input limits shared by the admin and verify use cases. Each check names
//! the offending field, so callers see exactly what to fix.

use super::FieldViolation;

pub const MAX_MERCHANT_ID: usize = 64;
pub const MAX_NAME: usize = 100;
pub const MAX_KEY_ID: usize = 64;
pub const MAX_REASON: usize = 500;
pub const MAX_PRESENTED_KEY: usize = 128;
pub const MAX_ENDPOINT: usize = 2048;
pub const MAX_METHOD: usize = 32;
pub use crate::keys::MAX_EXCERPT;

/// Most violations one error lists; a request with more gets the first
/// ones and a count, so the error stays small whatever the request holds.
pub const MAX_LISTED_VIOLATIONS: usize = 10;

/// Collects violations so one response can name every bad field (up to
/// [`MAX_LISTED_VIOLATIONS`]).
#[derive(Debug, Default)]
pub struct Violations {
    listed: Vec<FieldViolation>,
    unlisted: usize,
}

impl Violations {
    pub fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        if self.listed.len() < MAX_LISTED_VIOLATIONS {
            self.listed.push(FieldViolation::new(field, description));
        } else {
            self.unlisted += 1;
        }
    }

    pub fn check(&mut self, field: &str, result: Result<(), String>) {
        if let Err(description) = result {
            self.add(field, description);
        }
    }

    pub fn into_result(mut self) -> Result<(), super::ServiceError> {
        if self.unlisted > 0 {
            let more = format!("{} more invalid fields not listed", self.unlisted);
            self.listed.push(FieldViolation::new("request", more));
        }
        if self.listed.is_empty() { Ok(()) } else { Err(super::ServiceError::Invalid(self.listed)) }
    }
}

pub use crate::keys::excerpt;

pub fn merchant_id(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("is required".into());
    }
    if s.len() > MAX_MERCHANT_ID {
        return Err(format!("must be at most {MAX_MERCHANT_ID} characters"));
    }
    if !s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
        return Err("may only contain A-Z, a-z, 0-9, '_' and '-'".into());
    }
    Ok(())
}

pub fn key_id(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("is required".into());
    }
    if s.len() > MAX_KEY_ID || !s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err("is not a key id".into());
    }
    Ok(())
}

/// Free text shown to people: bounded, and no control characters that could
/// forge log lines or confuse terminals.
pub fn text(s: &str, max: usize, required: bool) -> Result<(), String> {
    if required && s.trim().is_empty() {
        return Err("is required".into());
    }
    if s.chars().count() > max {
        return Err(format!("must be at most {max} characters"));
    }
    if s.chars().any(char::is_control) {
        return Err("must not contain control characters".into());
    }
    Ok(())
}

pub fn endpoint(s: &str) -> Result<(), String> {
    if s.len() > MAX_ENDPOINT {
        return Err(format!("must be at most {MAX_ENDPOINT} bytes"));
    }
    if s.chars().any(char::is_control) {
        return Err("must not contain control characters".into());
    }
    Ok(())
}

/// An HTTP method is an RFC 9110 token.
pub fn method(s: &str) -> Result<(), String> {
    if s.len() > MAX_METHOD {
        return Err(format!("must be at most {MAX_METHOD} characters"));
    }
    let tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if !s.bytes().all(tchar) {
        return Err("must be an HTTP method token such as GET or POST".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merchant_ids() {
        assert!(merchant_id("cmm3zkkx000006ogg8arp52qb").is_ok());
        assert!(merchant_id("m_1-2").is_ok());
        assert!(merchant_id("").is_err());
        assert!(merchant_id(&"a".repeat(65)).is_err());
        assert!(merchant_id("a b").is_err());
        assert!(merchant_id("ä").is_err());
    }

    #[test]
    fn names() {
        assert!(text("OpenClaw Invoice Bot", MAX_NAME, true).is_ok());
        assert!(text("   ", MAX_NAME, true).is_err());
        assert!(text(&"é".repeat(100), MAX_NAME, true).is_ok());
        assert!(text(&"é".repeat(101), MAX_NAME, true).is_err());
        assert!(text("line\nbreak", MAX_NAME, true).is_err());
        assert!(text("", MAX_REASON, false).is_ok());
    }

    #[test]
    fn errors_list_a_bounded_number_of_fields() {
        let mut v = Violations::default();
        for i in 0..100_000 {
            v.add(format!("outcomes[{i}].status"), "bad");
        }
        let Err(super::super::ServiceError::Invalid(listed)) = v.into_result() else { panic!("invalid") };
        assert_eq!(listed.len(), MAX_LISTED_VIOLATIONS + 1);
        assert_eq!(listed[MAX_LISTED_VIOLATIONS].description, "99990 more invalid fields not listed");
    }

    #[test]
    fn excerpts_are_bounded_and_quoted() {
        assert_eq!(excerpt("abc", 8), "\"abc\"");
        assert_eq!(excerpt(&"é".repeat(1000), 4), "\"éééé\"…");
        assert_eq!(excerpt("a\nb", 8), "\"a\\nb\"");
    }

    #[test]
    fn methods_and_endpoints() {
        for ok in ["", "GET", "POST", "PATCH", "M-SEARCH"] {
            assert!(method(ok).is_ok(), "{ok}");
        }
        for bad in ["GET POST", "GE\nT", "(GET)", &"A".repeat(33)] {
            assert!(method(bad).is_err(), "{bad}");
        }
        assert!(endpoint("/public/api/v1/invoices?x=1").is_ok());
        assert!(endpoint("/a\r\nInjected: 1").is_err());
        assert!(endpoint(&"/".repeat(2049)).is_err());
    }
}
