//! Every Verify produces a `keywarden.verify` span that says what its audit
//! row says, joined to the caller's W3C trace, and never carries the key;
//! admin spans name their actor and never carry an operator token.

use std::collections::HashMap;

use keywarden::api::pb;
use opentelemetry::{Value, trace::TraceId};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tonic::Request;
use tracing_subscriber::layer::SubscriberExt;

use crate::helpers::{Backend, MERCHANT, eventually, spawn_app};

once_tests!(
    verify_span_attributes_equal_the_audit_row_and_join_the_callers_trace_on_sqlite(current_thread),
    verify_span_attributes_equal_the_audit_row_and_join_the_callers_trace_on_postgres(
        postgres,
        current_thread
    ),
);

// Current-thread runtimes: the span subscriber below is this thread's
// default only, so the rest of the binary's tests run without span export,
// as a server without OTLP configured does.
async fn verify_span_attributes_equal_the_audit_row_and_join_the_callers_trace_on_sqlite() {
    verify_span_attributes_equal_the_audit_row_and_join_the_callers_trace(Backend::Sqlite).await;
}

async fn verify_span_attributes_equal_the_audit_row_and_join_the_callers_trace_on_postgres() {
    verify_span_attributes_equal_the_audit_row_and_join_the_callers_trace(Backend::postgres()).await;
}

/// Spans exported into memory, for as long as the guard lives, from this
/// thread only.
struct Capture {
    exporter: InMemorySpanExporter,
    _provider: SdkTracerProvider,
    _guard: tracing::subscriber::DefaultGuard,
}

fn capture() -> Capture {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder().with_simple_exporter(exporter.clone()).build();
    let subscriber = tracing_subscriber::registry()
        .with(keywarden::telemetry::spans_filter())
        .with(keywarden::telemetry::otel_layer(&provider));
    let guard = tracing::subscriber::set_default(subscriber);
    Capture { exporter, _provider: provider, _guard: guard }
}

fn attributes(span: &SpanData) -> HashMap<String, String> {
    span.attributes
        .iter()
        .map(|kv| {
            let value = match &kv.value {
                Value::I64(n) => n.to_string(),
                other => other.as_str().into_owned(),
            };
            (kv.key.as_str().to_owned(), value)
        })
        .collect()
}

async fn verify_span(capture: &Capture, audit_id: &str) -> SpanData {
    let is_the_span = |s: &SpanData| {
        s.name == "keywarden.verify"
            && attributes(s).get("keywarden.audit_event_id").map(String::as_str) == Some(audit_id)
    };
    eventually(&format!("the keywarden.verify span of {audit_id}"), || {
        capture.exporter.get_finished_spans().unwrap().into_iter().find(is_the_span)
    })
    .await
}

async fn verify_span_attributes_equal_the_audit_row_and_join_the_callers_trace(backend: Backend) {
    let capture = capture();
    let mut app = spawn_app(backend).await;
    // tracing caches each callsite's interest process-wide. A callsite first
    // hit on another test's thread while this test's subscriber was being
    // registered can keep the interest computed without it, and its spans
    // never reach this subscriber. So every callsite of a cold and a warm
    // Verify is registered first, then the cache is rebuilt with this
    // subscriber in it; nothing is registered concurrently after that.
    let (_, warm_up) = app.key_with_scopes(&["invoice:write"]).await;
    for scope in ["invoice:write", "sales:read"] {
        app.verify(&warm_up, "192.168.1.100", scope).await;
    }
    tracing::callsite::rebuild_interest_cache();
    let (_, key) = app.key_with_scopes(&["invoice:write"]).await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent_span = "00f067aa0ba902b7";
    let mut calls = Vec::new();
    for scope in ["invoice:write", "sales:read"] {
        let mut request = Request::new(pb::VerifyRequest {
            key: key.clone(),
            ip: "192.168.1.100".into(),
            required_scope: scope.into(),
            endpoint: "/public/api/v1/invoices".into(),
            method: "POST".into(),
            cost: 0,
        });
        request
            .metadata_mut()
            .insert("traceparent", format!("00-{trace_id}-{parent_span}-01").parse().unwrap());
        let r = app.verify.verify(request).await.unwrap().into_inner();
        eprintln!("verify {scope}: {} decision {}", r.audit_event_id, r.decision);
        calls.push(r);
    }
    app.settle().await;
    let events = app
        .admin
        .list_audit_events(pb::ListAuditEventsRequest { merchant_id: MERCHANT.into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .events;
    for call in calls {
        let row = events.iter().find(|e| e.id == call.audit_event_id).unwrap();
        let span = verify_span(&capture, &call.audit_event_id).await;
        let attrs = attributes(&span);
        assert_eq!(
            span.span_context.trace_id(),
            TraceId::from_hex(trace_id).unwrap(),
            "joins the caller's trace"
        );
        assert_eq!(span.parent_span_id.to_string(), parent_span);
        assert_eq!(row.trace_id, trace_id, "the audit row names the same trace");
        let ts = row.timestamp.as_ref().unwrap();
        let row_time = chrono::DateTime::from_timestamp(ts.seconds, ts.nanos as u32).unwrap();
        assert_eq!(attrs["keywarden.timestamp"], row_time.to_rfc3339());
        assert_eq!(attrs["keywarden.api_key_id"], row.api_key_id);
        assert_eq!(attrs["keywarden.api_key_name"], row.api_key_name);
        assert_eq!(attrs["keywarden.merchant_id"], row.merchant_id);
        assert_eq!(attrs["keywarden.endpoint"], row.endpoint);
        assert_eq!(attrs["keywarden.method"], row.method);
        assert_eq!(attrs["keywarden.ip"], row.ip);
        let decision = pb::Decision::try_from(row.decision)
            .unwrap()
            .as_str_name()
            .trim_start_matches("DECISION_")
            .to_owned();
        assert_eq!(attrs["keywarden.decision"], decision);
        if row.decision == pb::Decision::Deny as i32 {
            let reason = pb::DenyReason::try_from(row.deny_reason)
                .unwrap()
                .as_str_name()
                .trim_start_matches("DENY_REASON_")
                .to_owned();
            assert_eq!(attrs["keywarden.deny_reason"], reason);
            assert_eq!(attrs["keywarden.status"], row.status.to_string());
        } else {
            assert!(!attrs.contains_key("keywarden.deny_reason"));
        }
        let everything = format!("{span:?}");
        assert!(!everything.contains(&key[16..]), "the secret never reaches a span");
    }

    // An admin call by an operator token: its span names the token's name,
    // and no span carries the token.
    let (_, operator) =
        crate::helpers::issue_operator(&mut app.admin, "span-operator", pb::OperatorRole::Auditor, &[]).await;
    app.admin_as(&operator).list_scopes(pb::ListScopesRequest {}).await.unwrap();
    let spans = eventually("the operator's admin span", || {
        let spans = capture.exporter.get_finished_spans().unwrap();
        spans
            .iter()
            .any(|s| attributes(s).get("actor").map(String::as_str) == Some("span-operator"))
            .then_some(spans)
    })
    .await;
    assert!(!format!("{spans:?}").contains(&operator[16..]), "an operator token reached a span");
    app.stop().await;
}
