//! Keyset pages of newest-first listings (keys, operator tokens, audit
//! events), written once: [`keyset`] reads one page. Page tokens are
//! opaque: base64url of `<micros since epoch>.<id>`, the position of the
//! last item of the page before.

use std::future::Future;

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{DateTime, Utc};

use super::ServiceError;
use crate::store::{Cursor, StoreError};

/// One page of a listing.
#[derive(Debug)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// Empty on the last page.
    pub next_page_token: String,
}

impl<T> Page<T> {
    pub fn map<U>(self, f: impl FnMut(T) -> U) -> Page<U> {
        Page { items: self.items.into_iter().map(f).collect(), next_page_token: self.next_page_token }
    }
}

/// Reads one page: checks the size and token, asks `read` for one row
/// more than the page after the token's position (so the last page is
/// known without a second query), and makes the next token from the last
/// row kept, whose time and id `position` gives.
pub async fn keyset<T, F>(
    page_size: i32,
    page_token: &str,
    read: impl FnOnce(Option<Cursor>, u64) -> F,
    position: impl Fn(&T) -> (DateTime<Utc>, &str),
) -> Result<Page<T>, ServiceError>
where
    F: Future<Output = Result<Vec<T>, StoreError>>,
{
    let limit = page_size_of(page_size)?;
    let cursor = decode(page_token)?.map(|(at, id)| Cursor { at, id });
    let mut items = read(cursor, limit + 1).await?;
    let next_page_token = next_token(&mut items, limit, |item| {
        let (at, id) = position(item);
        encode(at, id)
    });
    Ok(Page { items, next_page_token })
}

/// [`keyset`] for a listing ordered by a number, descending (deliveries
/// by event sequence): `read` gets the number to stay below.
pub async fn by_number<T, F>(
    page_size: i32,
    page_token: &str,
    read: impl FnOnce(Option<i64>, u64) -> F,
    position: impl Fn(&T) -> i64,
) -> Result<Page<T>, ServiceError>
where
    F: Future<Output = Result<Vec<T>, StoreError>>,
{
    let limit = page_size_of(page_size)?;
    let before = if page_token.is_empty() {
        None
    } else {
        let invalid = || ServiceError::invalid("page_token", "is not a token from a previous page");
        let raw = URL_SAFE_NO_PAD.decode(page_token).map_err(|_| invalid())?;
        Some(String::from_utf8(raw).ok().and_then(|s| s.parse::<i64>().ok()).ok_or_else(invalid)?)
    };
    let mut items = read(before, limit + 1).await?;
    let next_page_token =
        next_token(&mut items, limit, |item| URL_SAFE_NO_PAD.encode(position(item).to_string()));
    Ok(Page { items, next_page_token })
}

pub const DEFAULT_PAGE_SIZE: u64 = 50;
pub const MAX_PAGE_SIZE: u64 = 500;

/// A requested page size, checked: 0 means the default; above the maximum
/// is coerced down to it.
pub fn page_size_of(requested: i32) -> Result<u64, ServiceError> {
    match requested {
        n if n < 0 => Err(ServiceError::invalid("page_size", "must not be negative")),
        0 => Ok(DEFAULT_PAGE_SIZE),
        n => Ok(u64::try_from(n).unwrap_or(MAX_PAGE_SIZE).min(MAX_PAGE_SIZE)),
    }
}

/// Drops the look-ahead row (a page is read with `limit + 1`) and returns
/// the token for the next page, empty on the last.
fn next_token<T>(rows: &mut Vec<T>, limit: u64, token: impl Fn(&T) -> String) -> String {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    if rows.len() > limit {
        rows.truncate(limit);
        rows.last().map(token).unwrap_or_default()
    } else {
        String::new()
    }
}

fn encode(at: DateTime<Utc>, id: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("{}.{id}", at.timestamp_micros()))
}

fn decode(token: &str) -> Result<Option<(DateTime<Utc>, String)>, ServiceError> {
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
        assert_eq!(page_size_of(0).unwrap(), 50);
        assert_eq!(page_size_of(7).unwrap(), 7);
        assert_eq!(page_size_of(10_000).unwrap(), 500);
        assert!(page_size_of(-1).is_err());
    }
}
