//! Conversions between protobuf messages and service types.

use chrono::{DateTime, Utc};

use super::pb;
use crate::{
    audit::{AuditKind, AuditRecord},
    keys::{
        Credits, Decision, DenyReason, KeyStatus, LimitStatus, Metadata, RateLimit, RateLimits,
        RefillInterval,
        operator::{OperatorRole, OperatorToken},
    },
    service::{
        ServiceError,
        admin::{CreditsRequest, KeyView},
        peppers::Generation,
        verify::{Verdict, Verifier, VerifyCall, VerifyInput},
    },
};

pub fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

fn opt_timestamp(t: Option<DateTime<Utc>>) -> Option<prost_types::Timestamp> {
    t.map(timestamp)
}

/// A request timestamp; out-of-range values are the caller's error.
pub fn timestamp_in(
    field: &str,
    t: Option<prost_types::Timestamp>,
) -> Result<Option<DateTime<Utc>>, ServiceError> {
    let Some(t) = t else { return Ok(None) };
    u32::try_from(t.nanos)
        .ok()
        .filter(|n| *n < 1_000_000_000)
        .and_then(|nanos| DateTime::from_timestamp(t.seconds, nanos))
        .map(Some)
        .ok_or_else(|| ServiceError::invalid(field, "is not a valid timestamp"))
}

pub fn duration_in(
    field: &str,
    d: Option<prost_types::Duration>,
) -> Result<Option<chrono::Duration>, ServiceError> {
    let Some(d) = d else { return Ok(None) };
    let invalid = || ServiceError::invalid(field, "is not a valid duration");
    if d.nanos.abs() >= 1_000_000_000 || (d.seconds > 0 && d.nanos < 0) || (d.seconds < 0 && d.nanos > 0) {
        return Err(invalid());
    }
    chrono::Duration::try_seconds(d.seconds)
        .and_then(|s| s.checked_add(&chrono::Duration::nanoseconds(i64::from(d.nanos))))
        .map(Some)
        .ok_or_else(invalid)
}

/// Rate limits as a request gives them. A window that is absent, negative
/// or not whole milliseconds becomes 0 ms, which validation refuses by
/// name (`rate_limits[i].window`).
pub fn rate_limits_in(limits: Vec<pb::RateLimit>) -> Vec<RateLimit> {
    limits
        .into_iter()
        .map(|l| RateLimit {
            name: l.name.into(),
            limit: l.limit,
            window_ms: l.window.map_or(0, |w| {
                let whole = w.nanos >= 0 && w.nanos % 1_000_000 == 0;
                u64::try_from(w.seconds)
                    .ok()
                    .filter(|_| whole)
                    .and_then(|s| s.checked_mul(1_000)?.checked_add(u64::try_from(w.nanos / 1_000_000).ok()?))
                    .unwrap_or(0)
            }),
        })
        .collect()
}

fn rate_limits_out(limits: &RateLimits) -> Vec<pb::RateLimit> {
    limits
        .iter()
        .map(|l| pb::RateLimit {
            name: l.name.to_string(),
            limit: l.limit,
            window: Some(prost_types::Duration {
                seconds: i64::try_from(l.window_ms / 1_000).unwrap_or(i64::MAX),
                nanos: i32::try_from(l.window_ms % 1_000).unwrap_or(0) * 1_000_000,
            }),
        })
        .collect()
}

pub fn rate_limit_status(s: &LimitStatus) -> pb::RateLimitStatus {
    pb::RateLimitStatus {
        name: s.name.to_string(),
        limit: s.limit,
        remaining: s.remaining,
        reset_at: Some(timestamp(s.reset_at)),
    }
}

fn status(s: KeyStatus) -> pb::KeyStatus {
    match s {
        KeyStatus::Active => pb::KeyStatus::Active,
        KeyStatus::Expired => pb::KeyStatus::Expired,
        KeyStatus::Revoked => pb::KeyStatus::Revoked,
        KeyStatus::Rotating => pb::KeyStatus::Rotating,
        KeyStatus::Disabled => pb::KeyStatus::Disabled,
    }
}

pub fn decision(d: Decision) -> pb::Decision {
    match d {
        Decision::Allow => pb::Decision::Allow,
        Decision::Deny => pb::Decision::Deny,
    }
}

pub fn deny_reason(r: DenyReason) -> pb::DenyReason {
    match r {
        DenyReason::Malformed => pb::DenyReason::Malformed,
        DenyReason::NotFound => pb::DenyReason::NotFound,
        DenyReason::Revoked => pb::DenyReason::Revoked,
        DenyReason::Expired => pb::DenyReason::Expired,
        DenyReason::IpNotAllowed => pb::DenyReason::IpNotAllowed,
        DenyReason::InsufficientScope => pb::DenyReason::InsufficientScope,
        DenyReason::Throttled => pb::DenyReason::Throttled,
        DenyReason::NoRoute => pb::DenyReason::NoRoute,
        DenyReason::RateLimited => pb::DenyReason::RateLimited,
        DenyReason::QuotaExhausted => pb::DenyReason::QuotaExhausted,
        DenyReason::MalformedRequest => pb::DenyReason::MalformedRequest,
        DenyReason::Disabled => pb::DenyReason::Disabled,
    }
}

fn kind(k: AuditKind) -> pb::AuditEventKind {
    match k {
        AuditKind::Verify => pb::AuditEventKind::Verify,
        AuditKind::KeyCreated => pb::AuditEventKind::KeyCreated,
        AuditKind::KeyUpdated => pb::AuditEventKind::KeyUpdated,
        AuditKind::KeyRevoked => pb::AuditEventKind::KeyRevoked,
        AuditKind::KeyRegenerated => pb::AuditEventKind::KeyRegenerated,
        AuditKind::AccessDenied => pb::AuditEventKind::AccessDenied,
        AuditKind::AuthenticationFailed => pb::AuditEventKind::AuthenticationFailed,
        AuditKind::OperatorTokenCreated => pb::AuditEventKind::OperatorTokenCreated,
        AuditKind::OperatorTokenRevoked => pb::AuditEventKind::OperatorTokenRevoked,
        AuditKind::VerifyRollup => pb::AuditEventKind::VerifyRollup,
        AuditKind::KeyDisabled => pb::AuditEventKind::KeyDisabled,
        AuditKind::KeyEnabled => pb::AuditEventKind::KeyEnabled,
        AuditKind::KeyLeaked => pb::AuditEventKind::KeyLeaked,
    }
}

/// A request's role; `None` when unspecified or unknown.
pub fn role_in(role: i32) -> Option<OperatorRole> {
    match pb::OperatorRole::try_from(role).ok()? {
        pb::OperatorRole::Unspecified => None,
        pb::OperatorRole::Admin => Some(OperatorRole::Admin),
        pb::OperatorRole::KeyManager => Some(OperatorRole::KeyManager),
        pb::OperatorRole::Auditor => Some(OperatorRole::Auditor),
        pb::OperatorRole::LeakReporter => Some(OperatorRole::LeakReporter),
    }
}

fn role_out(role: OperatorRole) -> pb::OperatorRole {
    match role {
        OperatorRole::Admin => pb::OperatorRole::Admin,
        OperatorRole::KeyManager => pb::OperatorRole::KeyManager,
        OperatorRole::Auditor => pb::OperatorRole::Auditor,
        OperatorRole::LeakReporter => pb::OperatorRole::LeakReporter,
    }
}

pub fn operator_token(t: OperatorToken) -> pb::OperatorToken {
    pb::OperatorToken {
        id: t.id,
        name: t.name,
        role: role_out(t.role).into(),
        merchant_ids: t.merchant_ids,
        created_by: t.created_by,
        created_at: Some(timestamp(t.created_at)),
        expires_at: t.expires_at.map(timestamp),
        revoked_at: t.revoked_at.map(timestamp),
    }
}

pub fn pepper_generation(g: Generation) -> pb::PepperGeneration {
    let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    pb::PepperGeneration {
        retirable: g.retirable(),
        id: g.id,
        configured: g.configured,
        current: g.current,
        live_keys: count(g.counts.live_keys),
        inactive_keys: count(g.counts.inactive_keys),
        live_operator_tokens: count(g.counts.live_operator_tokens),
        webhook_endpoints: count(g.counts.webhook_endpoints),
    }
}

pub fn api_key(view: KeyView) -> pb::ApiKey {
    let k = view.key;
    pb::ApiKey {
        id: k.id,
        merchant_id: k.merchant_id,
        name: k.name,
        prefix: k.prefix,
        scopes: k.scopes,
        allowed_cidrs: k.allowed_cidrs,
        rate_limits: rate_limits_out(&k.rate_limits),
        credits: credits_out(k.credits),
        expires_at: opt_timestamp(k.expires_at),
        created_at: Some(timestamp(k.created_at)),
        created_by: k.created_by,
        revoked_at: opt_timestamp(k.revoked_at),
        revoke_reason: k.revoke_reason.unwrap_or_default(),
        replaced_by_key_id: k.replaced_by_key_id.unwrap_or_default(),
        status: status(view.status).into(),
        last_used_at: opt_timestamp(k.last_used_at),
        request_count: k.request_count,
        denied_count: k.denied_count,
        updated_at: Some(timestamp(k.updated_at)),
        disabled_at: opt_timestamp(k.disabled_at),
        disabled_reason: k.disabled_reason.unwrap_or_default(),
        metadata: metadata_out(&k.metadata),
    }
}

pub fn metadata_out(m: &Metadata) -> std::collections::HashMap<String, String> {
    m.iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect()
}

pub fn audit_event(r: AuditRecord) -> pb::AuditEvent {
    pb::AuditEvent {
        id: r.id,
        timestamp: Some(timestamp(r.timestamp)),
        api_key_id: r.api_key_id.unwrap_or_default(),
        api_key_name: r.api_key_name.unwrap_or_default(),
        merchant_id: r.merchant_id.unwrap_or_default(),
        endpoint: r.endpoint.unwrap_or_default(),
        method: r.method.unwrap_or_default(),
        status: r.status.map_or(0, i32::from),
        ip: r.ip.map(|ip| ip.to_string()).unwrap_or_default(),
        kind: kind(r.kind).into(),
        decision: r.decision.map_or(pb::Decision::Unspecified, decision).into(),
        deny_reason: r.deny_reason.map_or(pb::DenyReason::Unspecified, deny_reason).into(),
        actor: r.actor.unwrap_or_default(),
        trace_id: r.trace_id.unwrap_or_default(),
        key_prefix: r.key_prefix.unwrap_or_default(),
        detail: r.detail.unwrap_or_default(),
        count: r.count.map_or(0, i64::from),
    }
}

/// A Verify request, checked into the call the pipeline runs on: fields
/// validated and named when bad, the key parsed.
pub fn verify_call(verifier: &Verifier, r: pb::VerifyRequest) -> Result<VerifyCall, ServiceError> {
    verifier.check(verify_input(r))
}

/// A Verify request's fields as sent.
pub fn verify_input(r: pb::VerifyRequest) -> VerifyInput {
    VerifyInput {
        key: r.key,
        ip: r.ip,
        required_scope: r.required_scope,
        endpoint: r.endpoint,
        method: r.method,
        cost: r.cost,
    }
}

/// Credits as a request gives them; an unknown interval number counts as
/// unspecified, which validation refuses by name.
pub fn credits_in(c: Option<pb::Credits>) -> Option<CreditsRequest> {
    c.map(|c| CreditsRequest {
        remaining: c.remaining,
        refill: c.refill.map(|r| {
            let interval = match pb::RefillInterval::try_from(r.interval) {
                Ok(pb::RefillInterval::Daily) => Some(RefillInterval::Daily),
                Ok(pb::RefillInterval::Monthly) => Some(RefillInterval::Monthly),
                _ => None,
            };
            (r.amount, interval)
        }),
    })
}

fn credits_out(c: Option<Credits>) -> Option<pb::Credits> {
    c.map(|c| pb::Credits {
        remaining: c.remaining,
        refill: c.refill.map(|r| pb::Refill {
            amount: r.amount,
            interval: match r.interval {
                RefillInterval::Daily => pb::RefillInterval::Daily,
                RefillInterval::Monthly => pb::RefillInterval::Monthly,
            }
            .into(),
        }),
    })
}

pub fn verdict(v: Verdict) -> pb::VerifyResponse {
    let rate_limit = v.rate_limit.as_ref().map(rate_limit_status);
    match v.outcome {
        Ok(grant) => pb::VerifyResponse {
            decision: pb::Decision::Allow.into(),
            deny_reason: pb::DenyReason::Unspecified.into(),
            merchant_id: grant.merchant_id,
            key_id: grant.key_id,
            key_name: grant.key_name,
            scopes: grant.scopes,
            expires_at: opt_timestamp(grant.expires_at),
            audit_event_id: v.audit_event_id,
            rate_limit,
            credits_remaining: v.credits_remaining,
            metadata: metadata_out(&grant.metadata),
        },
        Err(reason) => pb::VerifyResponse {
            decision: pb::Decision::Deny.into(),
            deny_reason: deny_reason(reason).into(),
            audit_event_id: v.audit_event_id,
            rate_limit,
            credits_remaining: v.credits_remaining,
            ..Default::default()
        },
    }
}

/// An event as ListEvents answers it: the CloudEvent's attributes and its
/// data as a Struct, from the stored body. A body that is not the JSON the
/// outbox wrote is a corrupt row.
pub fn event(
    id: String,
    kind: String,
    subject: String,
    time: DateTime<Utc>,
    body: &str,
) -> Result<pb::Event, crate::service::ServiceError> {
    let corrupt = || crate::service::ServiceError::Internal(format!("stored event {id} is not a CloudEvent"));
    let serde_json::Value::Object(mut body) = serde_json::from_str(body).map_err(|_| corrupt())? else {
        return Err(corrupt());
    };
    let source = match body.remove("source") {
        Some(serde_json::Value::String(s)) => s,
        _ => return Err(corrupt()),
    };
    let data = match body.remove("data") {
        Some(serde_json::Value::Object(map)) => Some(json_struct(map)),
        _ => None,
    };
    Ok(pb::Event { id, r#type: kind, source, subject, time: Some(timestamp(time)), data })
}

fn json_struct(map: serde_json::Map<String, serde_json::Value>) -> prost_types::Struct {
    prost_types::Struct { fields: map.into_iter().map(|(k, v)| (k, json_value(v))).collect() }
}

fn json_value(v: serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        serde_json::Value::String(s) => Kind::StringValue(s),
        serde_json::Value::Array(items) => {
            Kind::ListValue(prost_types::ListValue { values: items.into_iter().map(json_value).collect() })
        }
        serde_json::Value::Object(map) => Kind::StructValue(json_struct(map)),
    };
    prost_types::Value { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    // Tests read the real clock to build their inputs.
    #![allow(clippy::disallowed_methods)]

    use super::*;

    #[test]
    fn timestamps_round_trip_and_reject_garbage() {
        let now = crate::clock::now();
        assert_eq!(timestamp_in("t", Some(timestamp(now))).unwrap(), Some(now));
        assert!(timestamp_in("t", Some(prost_types::Timestamp { seconds: 0, nanos: -1 })).is_err());
        assert!(timestamp_in("t", Some(prost_types::Timestamp { seconds: i64::MAX, nanos: 0 })).is_err());
    }

    #[test]
    fn durations_convert_and_reject_mixed_signs() {
        let d = duration_in("g", Some(prost_types::Duration { seconds: 90, nanos: 5 })).unwrap().unwrap();
        assert_eq!(d, chrono::Duration::seconds(90) + chrono::Duration::nanoseconds(5));
        assert!(duration_in("g", Some(prost_types::Duration { seconds: 1, nanos: -1 })).is_err());
        assert!(duration_in("g", Some(prost_types::Duration { seconds: i64::MAX, nanos: 0 })).is_err());
    }

    #[test]
    fn rate_limit_windows_are_whole_milliseconds_or_refused_as_zero() {
        let window = |seconds, nanos| {
            let limit = pb::RateLimit {
                name: "l".into(),
                limit: 1,
                window: Some(prost_types::Duration { seconds, nanos }),
            };
            rate_limits_in(vec![limit])[0].window_ms
        };
        assert_eq!(window(10, 500_000_000), 10_500);
        assert_eq!(window(10, 1), 0);
        assert_eq!(window(-1, 0), 0);
        assert_eq!(window(i64::MAX, 0), 0);
        let limits = RateLimits::new(rate_limits_in(vec![pb::RateLimit {
            name: "l".into(),
            limit: 5,
            window: Some(prost_types::Duration { seconds: 1, nanos: 250_000_000 }),
        }]))
        .unwrap();
        assert_eq!(rate_limits_in(rate_limits_out(&limits)), limits.iter().cloned().collect::<Vec<_>>());
    }
}
