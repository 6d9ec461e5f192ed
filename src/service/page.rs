//! Opaque page tokens: base64url of `<micros since epoch>.<id>`, the position
//! of the last item of a newest-first page.

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{DateTime, Utc};

use super::ServiceError;

pub const DEFAULT_PAGE_SIZE: u64 = 50;
pub const MAX_PAGE_SIZE: u64 = 500;

/// 0 means the default; above the maximum is coerced down to it.
pub fn page_size(requested: i32) -> Result<u64, ServiceError> {
    match requested {
        n if n < 0 => Err(ServiceError::invalid("page_size", "must not be negative")),
        0 => Ok(DEFAULT_PAGE_SIZE),
        n => Ok(u64::try_from(n).unwrap_or(MAX_PAGE_SIZE).min(MAX_PAGE_SIZE)),
    }
}

/// Drops the look-ahead row (a page is read with `limit + 1`) and returns
/// the token for the next page, empty on the last.
pub fn next_token<T>(rows: &mut Vec<T>, limit: u64, token: impl Fn(&T) -> String) -> String {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    if rows.len() > limit {
        rows.truncate(limit);
        rows.last().map(token).unwrap_or_default()
    } else {
        String::new()
    }
}

pub fn encode(at: DateTime<Utc>, id: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("{}.{id}", at.timestamp_micros()))
}

pub fn decode(token: &str) -> Result<Option<(DateTime<Utc>, String)>, ServiceError> {
    if token.is_empty() {
        return Ok(None);
    }
    let invalid = || ServiceError::invalid("page_token", "is not a token from a previous page");
    let raw = URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid())?;
    let raw = String::from_utf8(raw).map_err(|_| invalid())?;
    let (micros, id) = raw.split_once('.').ok_or_else(invalid)?;
    let at = micros.parse::<i64>().ok().and_then(DateTime::from_timestamp_micros).ok_or_else(invalid)?;
    if id.is_empty() || id.len() > 64 {
        return Err(invalid());
    }
    Ok(Some((at, id.to_owned())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_to_the_microsecond() {
        let at = DateTime::from_timestamp_micros(1_780_000_000_123_456).unwrap();
        assert_eq!(decode(&encode(at, "abc-1")).unwrap(), Some((at, "abc-1".into())));
        assert_eq!(decode("").unwrap(), None);
    }

    #[test]
    fn garbage_tokens_are_invalid_arguments() {
        for bad in ["!!", "bm9wZQ", &URL_SAFE_NO_PAD.encode("x.y"), &URL_SAFE_NO_PAD.encode("12.")] {
            assert!(
                matches!(decode(bad), Err(ServiceError::Invalid(v)) if v[0].field == "page_token"),
                "{bad}"
            );
        }
    }

    #[test]
    fn page_sizes() {
        assert_eq!(page_size(0).unwrap(), 50);
        assert_eq!(page_size(7).unwrap(), 7);
        assert_eq!(page_size(10_000).unwrap(), 500);
        assert!(page_size(-1).is_err());
    }
}
