//! Envoy's external authorization, `envoy.service.auth.v3.Authorization/Check`,
//! on the Verify engine: same cache, revocation feed, throttle, audit row
//! and span. Decodes Envoy's HTTP attributes, asks [`Gateway`], and
//! answers the documented HTTP responses:
//!
//! - allowed: OK, `x-keywarden-{merchant-id,key-id,scopes,audit-id}` set
//!   (overwriting whatever the client sent), `x-keywarden-meta-<name>` set
//!   for each metadata entry whose value is printable ASCII (and every
//!   other `x-keywarden-meta-` header the client sent removed), and the
//!   key's header removed;
//! - denied: the status, JSON body and headers of the `keywarden-http`
//!   contract, which keywarden-client answers too (401 with
//!   `www-authenticate: Bearer` for a missing, malformed, unknown, revoked
//!   or expired key; 403 for scope, IP or an unmatched route; 429 when
//!   throttled or limited; 400 for a non-canonical request; 503 when
//!   keywarden cannot decide safely), with the matching gRPC status code.
//!
//! `dynamic_metadata` carries the decision for Envoy's own access log.

use std::{net::IpAddr, sync::Arc};

use envoy_types::{
    ext_authz::v3::{
        CheckResponseExt, DeniedHttpResponseBuilder, OkHttpResponseBuilder,
        pb::{Authorization, CheckRequest, CheckResponse, HeaderAppendAction, HttpStatusCode},
    },
    pb::{
        envoy::config::core::v3::address,
        google::protobuf::{Struct, Value, value::Kind},
    },
};
use keywarden_http::{self as http, Denial};
use tonic::{Code, Request, Response, Status};

use super::trace::{adopt_parent, traced};

use crate::{
    keys::{DenyReason, LimitStatus},
    service::{
        ServiceError,
        gateway::{Checked, Gateway, HttpCheck, KEY_HEADERS},
    },
    telemetry,
};

/// The headers an allowed request carries upstream.
pub const MERCHANT_HEADER: &str = "x-keywarden-merchant-id";
pub const KEY_ID_HEADER: &str = "x-keywarden-key-id";
pub const SCOPES_HEADER: &str = "x-keywarden-scopes";
pub const AUDIT_ID_HEADER: &str = "x-keywarden-audit-id";
/// Followed by a metadata entry's name.
pub const META_HEADER_PREFIX: &str = "x-keywarden-meta-";

#[derive(Debug, Clone)]
pub struct CheckService {
    gateway: Arc<Gateway>,
}

impl CheckService {
    pub fn new(gateway: Arc<Gateway>) -> Self {
        Self { gateway }
    }
}

/// The HTTP request Envoy describes, as the gateway needs it, and the
/// metadata headers the client sent itself (never passed upstream as if
/// keywarden had set them).
fn http_check(request: CheckRequest) -> (HttpCheck, Vec<String>) {
    let attributes = request.attributes.unwrap_or_default();
    let source = attributes.source.and_then(|peer| peer.address).and_then(|a| match a.address {
        Some(address::Address::SocketAddress(s)) => s.address.parse::<IpAddr>().ok(),
        _ => None,
    });
    let http = attributes.request.and_then(|r| r.http).unwrap_or_default();
    let mut headers = http.headers;
    // Envoy lower-cases header names; `header_map` is the newer form.
    if let Some(map) = http.header_map {
        for h in map.headers {
            let value = if h.raw_value.is_empty() {
                h.value
            } else {
                String::from_utf8_lossy(&h.raw_value).into_owned()
            };
            headers.entry(h.key.to_ascii_lowercase()).or_insert(value);
        }
    }
    let sent_meta = headers
        .keys()
        .filter(|name| {
            name.get(..META_HEADER_PREFIX.len()).is_some_and(|p| p.eq_ignore_ascii_case(META_HEADER_PREFIX))
        })
        .cloned()
        .collect();
    let check = HttpCheck {
        method: http.method,
        path: http.path,
        authorization: headers.remove(http::AUTHORIZATION),
        x_api_key: headers.remove(http::X_API_KEY),
        forwarded_for: headers.remove("x-forwarded-for"),
        source,
    };
    (check, sent_meta)
}

fn text(s: impl Into<String>) -> Value {
    Value { kind: Some(Kind::StringValue(s.into())) }
}

/// The decision for Envoy's access log (`envoy.filters.http.ext_authz`
/// namespace in dynamic metadata).
fn metadata(fields: &[(&str, String)]) -> Struct {
    Struct { fields: fields.iter().map(|(k, v)| ((*k).to_owned(), text(v.clone()))).collect() }
}

/// Envoy's status type for a denial's HTTP status, and the gRPC code that
/// goes with it.
fn deny_status(denial: Denial) -> (HttpStatusCode, Code) {
    match denial.status() {
        400 => (HttpStatusCode::BadRequest, Code::InvalidArgument),
        401 => (HttpStatusCode::Unauthorized, Code::Unauthenticated),
        429 => (HttpStatusCode::TooManyRequests, Code::ResourceExhausted),
        503 => (HttpStatusCode::ServiceUnavailable, Code::Unavailable),
        _ => (HttpStatusCode::Forbidden, Code::PermissionDenied),
    }
}

/// The IETF RateLimit header fields for a limit's status: its size, what
/// is left, and the seconds until it is full again, counted from the
/// instant the limiter decided on its own clock (another clock's reading
/// may be off by its skew).
pub fn ratelimit_headers(status: &LimitStatus) -> [(&'static str, String); 3] {
    let reset_ms = (status.reset_at - status.decided_at).num_milliseconds();
    let [limit, remaining, reset] = http::RATELIMIT_HEADERS;
    [
        (limit, status.limit.to_string()),
        (remaining, status.remaining.to_string()),
        (reset, http::reset_seconds(i128::from(reset_ms)).to_string()),
    ]
}

/// A denial as Envoy sends it back: the contract's status, headers and
/// body (`error` replaced by `error_text` when the server says why it
/// cannot decide).
fn denied(denial: Denial, error_text: Option<&str>, meta: Struct, extra: &[(&str, String)]) -> CheckResponse {
    let (status, code) = deny_status(denial);
    let error = error_text.unwrap_or(denial.error());
    let mut body = DeniedHttpResponseBuilder::new();
    body.set_http_status(status);
    body.add_header("content-type", http::CONTENT_TYPE, None, true);
    for (name, value) in extra {
        body.add_header(*name, value.clone(), None, true);
    }
    if let Some((name, value)) = denial.challenge() {
        body.add_header(name, value, None, true);
    }
    body.set_body(http::json_body(error, denial.reason()));
    let mut response = CheckResponse::with_status(Status::new(code, error));
    response.set_http_response(body).set_dynamic_metadata(Some(meta));
    response
}

fn respond(checked: Checked, sent_meta: Vec<String>) -> CheckResponse {
    let audit_id = checked.verdict.audit_event_id;
    match checked.verdict.outcome {
        Ok(grant) => {
            let mut ok = OkHttpResponseBuilder::new();
            let overwrite = Some(HeaderAppendAction::OverwriteIfExistsOrAdd);
            ok.add_header(MERCHANT_HEADER, grant.merchant_id.clone(), overwrite, true);
            ok.add_header(KEY_ID_HEADER, grant.key_id.clone(), overwrite, true);
            ok.add_header(SCOPES_HEADER, grant.scopes.join(","), overwrite, true);
            ok.add_header(AUDIT_ID_HEADER, audit_id.clone(), overwrite, true);
            let mut set = Vec::new();
            for (name, value) in grant.metadata.header_safe() {
                let header = format!("{META_HEADER_PREFIX}{name}");
                ok.add_header(header.clone(), value.to_owned(), overwrite, true);
                set.push(header);
            }
            // A client's own metadata header would reach upstream as if
            // the key carried it.
            for header in sent_meta.iter().filter(|h| !set.iter().any(|s| s.eq_ignore_ascii_case(h))) {
                ok.remove_header(header.as_str());
            }
            // Whichever header carried the key, neither goes upstream.
            for header in KEY_HEADERS {
                ok.remove_header(header);
            }
            let mut response = CheckResponse::with_status(Status::ok(""));
            response.set_http_response(ok).set_dynamic_metadata(Some(metadata(&[
                ("decision", "ALLOW".into()),
                ("merchant_id", grant.merchant_id),
                ("key_id", grant.key_id),
                ("audit_id", audit_id),
            ])));
            response
        }
        Err(reason) => {
            let denial = Denial::Denied(reason);
            let meta = metadata(&[
                ("decision", "DENY".into()),
                ("reason", denial.reason().to_owned()),
                ("audit_id", audit_id),
            ]);
            let limit_headers = match (reason, &checked.verdict.rate_limit) {
                (DenyReason::RateLimited, Some(status)) => ratelimit_headers(status).to_vec(),
                _ => Vec::new(),
            };
            denied(denial, None, meta, &limit_headers)
        }
    }
}

#[tonic::async_trait]
impl Authorization for CheckService {
    async fn check(&self, request: Request<CheckRequest>) -> Result<Response<CheckResponse>, Status> {
        let span = telemetry::verify_span();
        adopt_parent(&span, &request);
        let (check, sent_meta) = http_check(request.into_inner());
        match traced(&span, self.gateway.check(check, &span)).await {
            Ok(checked) => Ok(Response::new(respond(checked, sent_meta))),
            // Envoy fails closed on an error too, but a 503 it can pass on
            // says why.
            Err(ServiceError::Unavailable(why) | ServiceError::Overloaded(why) | ServiceError::Busy(why)) => {
                let meta = metadata(&[("decision", "UNAVAILABLE".into())]);
                Ok(Response::new(denied(Denial::Unavailable, Some(&why), meta, &[])))
            }
            Err(e) => Err(e.into()),
        }
    }
}
