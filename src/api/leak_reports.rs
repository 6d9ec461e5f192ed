//! The leak-report listener's one route, `POST /v1/leaks/github`, with
//! GitHub's secret-scanning partner contract: a JSON array of found tokens
//! (at most 1 MiB and 1,000 entries: 413 beyond), signed by one of
//! GitHub's keys (401 when the signature is missing, unknown or wrong, and
//! nothing is processed), answered with one label per token.
//!
//! The body carries live secrets: it is never logged, and neither is a
//! token; the answer names each by its SHA-256.

use std::sync::Arc;

use axum::{
    Router,
    body::Body,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::post,
};
use http_body_util::{BodyExt as _, Limited};
use serde::Deserialize;
use serde_json::json;

use crate::{
    metrics::Metrics,
    service::{
        ServiceError,
        leaks::{
            Leaks, MAX_TOKENS, Reported,
            github::{GithubKeys, SignatureError},
        },
    },
};

/// The route GitHub is registered to post to.
pub const GITHUB_PATH: &str = "/v1/leaks/github";
/// Largest report body.
pub const MAX_BODY: usize = 1 << 20;
pub const SIGNATURE_HEADER: &str = "github-public-key-signature";
pub const KEY_ID_HEADER: &str = "github-public-key-identifier";

/// What the route needs.
#[derive(Debug, Clone)]
pub struct LeakReportApi {
    pub leaks: Arc<Leaks>,
    pub keys: Arc<GithubKeys>,
    pub metrics: Arc<Metrics>,
}

/// The listener's routes; anything else is 404 (405 for another method).
pub fn router(api: LeakReportApi) -> Router {
    Router::new().route(GITHUB_PATH, post(github)).with_state(api)
}

/// One token as GitHub reports it.
#[derive(Debug, Deserialize)]
pub struct Found {
    pub token: String,
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub url: String,
    #[serde(default)]
    pub source: String,
}

/// Why a signed body is not a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyError {
    /// More than [`MAX_TOKENS`] entries: 413.
    TooMany,
    /// Not a JSON array of `{token, type, url, source}`: 400.
    NotAReport,
}

/// A report's entries. They are counted before anything is parsed, so a
/// huge report is refused without building its entries.
pub fn parse_report(body: &[u8]) -> Result<Vec<Found>, BodyError> {
    if count_entries(body) > MAX_TOKENS {
        return Err(BodyError::TooMany);
    }
    let found: Vec<Found> = serde_json::from_slice(body).map_err(|_| BodyError::NotAReport)?;
    // Only objects are counted, and only objects parse as entries.
    if found.len() > MAX_TOKENS {
        return Err(BodyError::TooMany);
    }
    Ok(found)
}

fn answer(status: StatusCode, error: &str) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], json!({ "error": error }).to_string())
        .into_response()
}

async fn github(State(api): State<LeakReportApi>, headers: HeaderMap, body: Body) -> Response {
    let too_large = || answer(StatusCode::PAYLOAD_TOO_LARGE, "a report is at most 1 MiB and 1000 tokens");
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return too_large();
    }
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => return too_large(),
        Err(_) => return answer(StatusCode::BAD_REQUEST, "the body could not be read"),
    };
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Err(refused) = api.keys.check(text(KEY_ID_HEADER), text(SIGNATURE_HEADER), &body).await {
        return match refused {
            SignatureError::KeysUnavailable(why) => {
                tracing::error!(why, "a leak report could not be checked: no signing keys");
                answer(StatusCode::SERVICE_UNAVAILABLE, "signing keys unavailable; try again later")
            }
            refused => {
                api.metrics.leak_signature_failures.inc();
                tracing::warn!(why = %refused, "leak report refused: signature");
                answer(StatusCode::UNAUTHORIZED, &refused.to_string())
            }
        };
    }
    let found = match parse_report(&body) {
        Ok(found) => found,
        Err(BodyError::TooMany) => return too_large(),
        Err(BodyError::NotAReport) => {
            return answer(
                StatusCode::BAD_REQUEST,
                "the body is not a JSON array of {token, type, url, source}",
            );
        }
    };
    let kinds: Vec<String> = found.iter().map(|f| f.kind.clone()).collect();
    let reported =
        found.into_iter().map(|f| Reported { token: f.token, source: f.source, url: f.url }).collect();
    match api.leaks.report_from_github(reported).await {
        Ok(findings) => {
            let labels: Vec<_> = findings
                .into_iter()
                .zip(kinds)
                .map(|(f, kind)| json!({ "token_hash": f.token_hash, "token_type": kind, "label": f.label.as_str() }))
                .collect();
            (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/json")],
                serde_json::Value::Array(labels).to_string(),
            )
                .into_response()
        }
        Err(ServiceError::Unavailable(why) | ServiceError::Overloaded(why) | ServiceError::Busy(why)) => {
            tracing::warn!(why, "a leak report could not be finished; its sender will deliver it again");
            answer(StatusCode::SERVICE_UNAVAILABLE, "try again later")
        }
        Err(e) => {
            tracing::error!(error = %e, "a leak report failed");
            answer(StatusCode::INTERNAL_SERVER_ERROR, "the report could not be processed")
        }
    }
}

/// The entries of a JSON array, counted without parsing them: objects at
/// depth one. A body that is not an array counts none, and fails parsing.
pub fn count_entries(body: &[u8]) -> usize {
    let (mut depth, mut in_string, mut escaped, mut entries) = (0usize, false, false, 0usize);
    for &b in body {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                if depth == 1 && b == b'{' {
                    entries += 1;
                }
                depth += 1;
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    entries
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_counted_at_the_top_level_only() {
        assert_eq!(count_entries(br#"[]"#), 0);
        assert_eq!(count_entries(br#"[{"token":"a{b}[c]\"{"},{"token":"x","n":{"d":1}}]"#), 2);
        assert_eq!(count_entries(br#"{"token":"x"}"#), 0);
        let many = format!("[{}]", vec![r#"{"token":"t"}"#; 1001].join(","));
        assert_eq!(count_entries(many.as_bytes()), 1001);
    }
}
