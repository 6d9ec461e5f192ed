//! Output of the client commands: aligned tables for people, JSON for
//! scripts. The plaintext key goes to stdout once, with a warning on stderr.

use serde_json::{Value, json};

use crate::api::pb;

fn time(t: Option<&prost_types::Timestamp>) -> Option<String> {
    t.and_then(|t| chrono::DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0)))
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
}

fn enum_name(name: Option<&str>, prefix: &str) -> String {
    name.map(|n| n.trim_start_matches(prefix).to_owned()).unwrap_or_default()
}

fn status(key: &pb::ApiKey) -> String {
    enum_name(pb::KeyStatus::try_from(key.status).ok().map(|s| s.as_str_name()), "KEY_STATUS_")
}

/// `name=limit/window` with the window in seconds, e.g. `per-minute=100/60s`.
fn rate_limits(key: &pb::ApiKey) -> Vec<String> {
    key.rate_limits
        .iter()
        .map(|l| {
            let w = l.window.unwrap_or_default();
            let ms = w.seconds.saturating_mul(1_000).saturating_add(i64::from(w.nanos / 1_000_000));
            let window = if ms % 1_000 == 0 { format!("{}s", ms / 1_000) } else { format!("{ms}ms") };
            format!("{}={}/{window}", l.name, l.limit)
        })
        .collect()
}

fn key_json(key: &pb::ApiKey) -> Value {
    json!({
        "id": key.id,
        "merchant_id": key.merchant_id,
        "name": key.name,
        "prefix": key.prefix,
        "scopes": key.scopes,
        "allowed_cidrs": key.allowed_cidrs,
        "rate_limits": rate_limits(key),
        "expires_at": time(key.expires_at.as_ref()),
        "created_at": time(key.created_at.as_ref()),
        "created_by": key.created_by,
        "revoked_at": time(key.revoked_at.as_ref()),
        "revoke_reason": key.revoke_reason,
        "replaced_by_key_id": key.replaced_by_key_id,
        "status": status(key),
        "last_used_at": time(key.last_used_at.as_ref()),
        "request_count": key.request_count,
        "denied_count": key.denied_count,
        "disabled_at": time(key.disabled_at.as_ref()),
        "disabled_reason": key.disabled_reason,
        "metadata": key.metadata.iter().collect::<std::collections::BTreeMap<_, _>>(),
    })
}

/// A leak report's answer: one row per reported token, in order.
pub fn leak_results(json: bool, results: &[pb::LeakResult]) {
    let label = |r: &pb::LeakResult| {
        enum_name(pb::LeakLabel::try_from(r.label).ok().map(|l| l.as_str_name()), "LEAK_LABEL_")
    };
    if json {
        let rows: Vec<Value> = results
            .iter()
            .map(|r| {
                json!({
                    "token_hash": r.token_hash,
                    "label": label(r),
                    "key_id": r.key_id,
                    "merchant_id": r.merchant_id,
                })
            })
            .collect();
        println!("{}", json!({ "results": rows }));
        return;
    }
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|r| {
            vec![
                r.token_hash.clone(),
                label(r),
                or_dash(Some(r.merchant_id.clone())),
                or_dash(Some(r.key_id.clone())),
            ]
        })
        .collect();
    table(&["TOKEN SHA-256", "LABEL", "MERCHANT", "KEY"], &rows);
}

/// Prints rows under headers, each column as wide as its widest cell.
fn table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(headers.iter().map(|h| (*h).to_owned()).collect());
    for row in rows {
        line(row.clone());
    }
}

fn or_dash(s: Option<String>) -> String {
    s.filter(|s| !s.is_empty()).unwrap_or_else(|| "-".to_owned())
}

fn key_rows(keys: &[&pb::ApiKey]) -> Vec<Vec<String>> {
    keys.iter()
        .map(|k| {
            vec![
                k.id.clone(),
                k.name.clone(),
                k.prefix.clone(),
                status(k),
                k.scopes.join(","),
                or_dash(Some(k.allowed_cidrs.join(","))),
                or_dash(Some(rate_limits(k).join(","))),
                or_dash(time(k.expires_at.as_ref())),
                or_dash(time(k.last_used_at.as_ref())),
                k.request_count.to_string(),
            ]
        })
        .collect()
}

const KEY_HEADERS: [&str; 10] = [
    "ID",
    "NAME",
    "PREFIX",
    "STATUS",
    "SCOPES",
    "ALLOWED IPS",
    "RATE LIMITS",
    "EXPIRES",
    "LAST USED",
    "REQUESTS",
];

pub fn key(json: bool, key: Option<&pb::ApiKey>) {
    let Some(key) = key else { return };
    if json {
        println!("{}", key_json(key));
    } else {
        table(&KEY_HEADERS, &key_rows(&[key]));
    }
}

pub fn key_list(json: bool, keys: &[pb::ApiKey], next: &str) {
    if json {
        println!(
            "{}",
            json!({ "api_keys": keys.iter().map(key_json).collect::<Vec<_>>(), "next_page_token": next })
        );
        return;
    }
    table(&KEY_HEADERS, &key_rows(&keys.iter().collect::<Vec<_>>()));
    if !next.is_empty() {
        println!("\nmore: --page-token {next}");
    }
}

/// A newly issued key: the only time its plaintext is shown.
pub fn issued(json: bool, key: Option<&pb::ApiKey>, plaintext: &str, previous: Option<&pb::ApiKey>) {
    eprintln!("keywarden: the key below is shown once and cannot be retrieved again; store it now.");
    if json {
        let mut doc = json!({ "api_key": key.map(key_json), "plaintext_key": plaintext });
        if let Some(previous) = previous {
            doc["previous_key"] = key_json(previous);
        }
        println!("{doc}");
        return;
    }
    if let Some(key) = key {
        table(&KEY_HEADERS, &key_rows(&[key]));
    }
    if let Some(previous) = previous {
        println!(
            "\nreplaces {} ({}, until {})",
            previous.id,
            status(previous),
            or_dash(time(previous.revoked_at.as_ref()))
        );
    }
    println!("\nkey: {plaintext}");
}

fn operator_json(t: &pb::OperatorToken) -> Value {
    json!({
        "id": t.id,
        "name": t.name,
        "role": role(t),
        "merchant_ids": t.merchant_ids,
        "created_by": t.created_by,
        "created_at": time(t.created_at.as_ref()),
        "expires_at": time(t.expires_at.as_ref()),
        "revoked_at": time(t.revoked_at.as_ref()),
    })
}

fn role(t: &pb::OperatorToken) -> String {
    enum_name(pb::OperatorRole::try_from(t.role).ok().map(|r| r.as_str_name()), "OPERATOR_ROLE_")
}

pub fn operators(json: bool, tokens: &[pb::OperatorToken], next: &str) {
    if json {
        println!(
            "{}",
            json!({ "operator_tokens": tokens.iter().map(operator_json).collect::<Vec<_>>(), "next_page_token": next })
        );
        return;
    }
    let rows: Vec<Vec<String>> = tokens
        .iter()
        .map(|t| {
            vec![
                t.id.clone(),
                t.name.clone(),
                role(t),
                if t.merchant_ids.is_empty() { "all".to_owned() } else { t.merchant_ids.join(",") },
                t.created_by.clone(),
                or_dash(time(t.expires_at.as_ref())),
                or_dash(time(t.revoked_at.as_ref())),
            ]
        })
        .collect();
    table(&["ID", "NAME", "ROLE", "MERCHANTS", "CREATED BY", "EXPIRES", "REVOKED"], &rows);
    if !next.is_empty() {
        println!("\nmore: --page-token {next}");
    }
}

/// A newly issued operator token: the only time its plaintext is shown.
pub fn operator_issued(json: bool, token: Option<&pb::OperatorToken>, plaintext: &str) {
    eprintln!("keywarden: the token below is shown once and cannot be retrieved again; store it now.");
    if json {
        println!("{}", json!({ "operator_token": token.map(operator_json), "plaintext_token": plaintext }));
        return;
    }
    if let Some(token) = token {
        operators(false, std::slice::from_ref(token), "");
    }
    println!("\ntoken: {plaintext}");
}

pub fn peppers(json: bool, generations: &[pb::PepperGeneration]) {
    if json {
        let items: Vec<Value> = generations
            .iter()
            .map(|g| {
                json!({
                    "id": g.id,
                    "configured": g.configured,
                    "current": g.current,
                    "live_keys": g.live_keys,
                    "inactive_keys": g.inactive_keys,
                    "live_operator_tokens": g.live_operator_tokens,
                    "webhook_endpoints": g.webhook_endpoints,
                    "retirable": g.retirable,
                })
            })
            .collect();
        println!("{}", json!({ "generations": items }));
        return;
    }
    let yes_no = |b: bool| if b { "yes" } else { "no" }.to_owned();
    let rows: Vec<Vec<String>> = generations
        .iter()
        .map(|g| {
            vec![
                g.id.clone(),
                yes_no(g.current),
                yes_no(g.configured),
                g.live_keys.to_string(),
                g.live_operator_tokens.to_string(),
                g.webhook_endpoints.to_string(),
                g.inactive_keys.to_string(),
                yes_no(g.retirable),
            ]
        })
        .collect();
    table(
        &[
            "PEPPER",
            "CURRENT",
            "CONFIGURED",
            "LIVE KEYS",
            "LIVE TOKENS",
            "WEBHOOKS",
            "INACTIVE KEYS",
            "RETIRABLE",
        ],
        &rows,
    );
}

pub fn usage(json: bool, usage: &pb::GetKeyUsageResponse) {
    if json {
        println!(
            "{}",
            json!({
                "last_used_at": time(usage.last_used_at.as_ref()),
                "request_count": usage.request_count,
                "denied_count": usage.denied_count,
            })
        );
        return;
    }
    table(
        &["LAST USED", "REQUESTS", "DENIED"],
        &[vec![
            or_dash(time(usage.last_used_at.as_ref())),
            usage.request_count.to_string(),
            usage.denied_count.to_string(),
        ]],
    );
}

fn event_json(e: &pb::AuditEvent) -> Value {
    json!({
        "id": e.id,
        "timestamp": time(e.timestamp.as_ref()),
        "kind": enum_name(pb::AuditEventKind::try_from(e.kind).ok().map(|k| k.as_str_name()), "AUDIT_EVENT_KIND_"),
        "api_key_id": e.api_key_id,
        "api_key_name": e.api_key_name,
        "merchant_id": e.merchant_id,
        "endpoint": e.endpoint,
        "method": e.method,
        "status": e.status,
        "ip": e.ip,
        "decision": enum_name(pb::Decision::try_from(e.decision).ok().map(|d| d.as_str_name()), "DECISION_"),
        "deny_reason": enum_name(pb::DenyReason::try_from(e.deny_reason).ok().map(|r| r.as_str_name()), "DENY_REASON_"),
        "actor": e.actor,
        "trace_id": e.trace_id,
        "key_prefix": e.key_prefix,
        "detail": e.detail,
        "count": e.count,
    })
}

pub fn audit(json: bool, events: &[pb::AuditEvent], next: &str) {
    let docs: Vec<Value> = events.iter().map(event_json).collect();
    if json {
        println!("{}", json!({ "events": docs, "next_page_token": next }));
        return;
    }
    // An enum's zero (no reason: created, allowed) reads as nothing.
    let cell = |d: &Value, k: &str| match &d[k] {
        Value::String(s) if !s.is_empty() && s != "UNSPECIFIED" => s.clone(),
        Value::Number(n) if n.as_i64() != Some(0) => n.to_string(),
        _ => "-".to_owned(),
    };
    let rows: Vec<Vec<String>> = docs
        .iter()
        .map(|d| {
            let what = match cell(d, "kind").as_str() {
                "VERIFY" => format!("VERIFY {}", cell(d, "decision")),
                "VERIFY_ROLLUP" => format!("VERIFY_ROLLUP ×{}", cell(d, "count")),
                other => other.to_owned(),
            };
            vec![
                cell(d, "timestamp"),
                what,
                cell(d, "deny_reason"),
                cell(d, "api_key_name"),
                format!("{} {}", cell(d, "method"), cell(d, "endpoint")),
                cell(d, "status"),
                cell(d, "ip"),
                cell(d, "actor"),
            ]
        })
        .collect();
    table(&["TIME", "EVENT", "REASON", "KEY", "REQUEST", "STATUS", "IP", "ACTOR"], &rows);
    if !next.is_empty() {
        println!("\nmore: --page-token {next}");
    }
}

pub fn verdict(json: bool, v: &pb::VerifyResponse) {
    let decision = enum_name(pb::Decision::try_from(v.decision).ok().map(|d| d.as_str_name()), "DECISION_");
    let reason =
        enum_name(pb::DenyReason::try_from(v.deny_reason).ok().map(|r| r.as_str_name()), "DENY_REASON_");
    if json {
        println!(
            "{}",
            json!({
                "decision": decision,
                "deny_reason": reason,
                "merchant_id": v.merchant_id,
                "key_id": v.key_id,
                "key_name": v.key_name,
                "scopes": v.scopes,
                "expires_at": time(v.expires_at.as_ref()),
                "audit_event_id": v.audit_event_id,
            })
        );
        return;
    }
    if decision == "ALLOW" {
        println!(
            "ALLOW  merchant {}  key {} ({})  scopes {}",
            v.merchant_id,
            v.key_id,
            v.key_name,
            v.scopes.join(",")
        );
    } else {
        println!("DENY  {reason}");
    }
    println!("audit event {}", v.audit_event_id);
}
