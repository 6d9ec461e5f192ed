//! keywarden-client's tower layer end to end: the example axum service
//! (examples/merchant_api.rs) served over HTTP in front of a real
//! keywarden, and the layer around a bare handler where what the handler
//! receives is the point.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use keywarden::api::pb;
use keywarden_client::{Builder, Client, Grant, Requirement, VerifyLayer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Endpoint;
use tower::{Layer, ServiceExt};

use crate::helpers::{Backend, MERCHANT, TestApp, revoke, spawn_app, wrong_secret};

#[allow(dead_code, unreachable_pub)] // its `main` is the example's own
#[path = "../../examples/merchant_api.rs"]
mod merchant_api;

backend_tests!(
    allowed_requests_reach_the_handler_with_their_grant_and_their_status_reaches_the_audit_row,
    denied_requests_never_reach_the_handler_and_are_answered_like_the_gateway,
    outcomes_beyond_the_buffer_are_dropped_and_counted,
);

/// Every deny reason the server has is answered by the layer with the
/// gateway's status and body, so a service answers as Envoy in front of it
/// would.
#[test]
fn the_layer_answers_each_deny_reason_as_the_gateway_does() {
    use keywarden::keys::decision::DenyReason;
    use keywarden_client::{Denial, pb::DenyReason as ClientReason};
    for reason in DenyReason::ALL {
        let name = format!("DENY_REASON_{}", reason.as_str());
        let client = ClientReason::from_str_name(&name).unwrap_or_else(|| panic!("the client lacks {name}"));
        let denial = Denial::Denied(client);
        assert_eq!(denial.status().as_u16(), reason.http_status(), "{name}");
        let gateway = serde_json::json!({ "error": reason.short_text(), "reason": name });
        assert_eq!(serde_json::from_str::<serde_json::Value>(&denial.body()).unwrap(), gateway);
    }
}

/// The example service on a local port, verifying against `app`.
struct MerchantApi {
    addr: SocketAddr,
    keywarden: Client,
    server: tokio::task::JoinHandle<()>,
}

impl MerchantApi {
    async fn start(app: &TestApp, builder: impl FnOnce(Builder) -> Builder) -> Self {
        let endpoint = Endpoint::from_shared(format!("http://{}", app.addr)).unwrap();
        let keywarden = builder(Client::builder(endpoint)).connect_lazy();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = merchant_api::app(keywarden.clone(), merchant_api::Invoices::default())
            .into_make_service_with_connect_info::<SocketAddr>();
        let server = tokio::spawn(async move { axum::serve(listener, service).await.unwrap() });
        Self { addr, keywarden, server }
    }

    /// One HTTP/1.1 request: (status, headers, JSON body).
    async fn send(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> HttpAnswer {
        let mut stream = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nhost: merchant-api\r\nconnection: close\r\n\
             content-type: application/json\r\ncontent-length: {}\r\n",
            body.len()
        );
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        stream.write_all(format!("{head}\r\n{body}").as_bytes()).await.unwrap();
        let mut raw = String::new();
        stream.read_to_string(&mut raw).await.unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP answer");
        let mut lines = head.lines();
        let status = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|s| s.parse().ok()).unwrap();
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        HttpAnswer { status, headers, body: serde_json::from_str(body).unwrap_or(serde_json::Value::Null) }
    }
}

#[derive(Debug)]
struct HttpAnswer {
    status: u16,
    headers: HashMap<String, String>,
    body: serde_json::Value,
}

impl HttpAnswer {
    /// A denial: (status, reason, www-authenticate), after checking its shape.
    fn denial(&self) -> (u16, &str, Option<&str>) {
        assert_eq!(self.headers.get("content-type").map(String::as_str), Some("application/json"));
        assert!(self.body["error"].as_str().is_some_and(|e| !e.is_empty()), "{:?}", self.body);
        (
            self.status,
            self.body["reason"].as_str().unwrap_or_default(),
            self.headers.get("www-authenticate").map(String::as_str),
        )
    }
}

type Seen = (Option<Grant>, bool);

/// POST /invoices with `authorization: <auth>`.
async fn api_post(api: &MerchantApi, auth: &str) -> HttpAnswer {
    api.send("POST", "/invoices", &[("authorization", auth)], r#"{"amount_cents": 500}"#).await
}

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

/// Every Verify audit row of `key_id`, by id: (status, endpoint, method).
async fn audit_rows(app: &mut TestApp, key_id: &str) -> HashMap<String, (i32, String, String)> {
    app.audit_of(key_id)
        .await
        .into_iter()
        .filter(|e| e.kind == pb::AuditEventKind::Verify as i32)
        .map(|e| (e.id, (e.status, e.endpoint, e.method)))
        .collect()
}

async fn allowed_requests_reach_the_handler_with_their_grant_and_their_status_reaches_the_audit_row(
    backend: Backend,
) {
    let mut app = spawn_app(backend).await;
    let (key, plaintext) = app
        .create_key(pb::CreateKeyRequest {
            merchant_id: MERCHANT.into(),
            name: "test key".into(),
            scopes: vec!["invoice:write".into()],
            metadata: [("plan".to_owned(), "gold".to_owned())].into(),
            ..Default::default()
        })
        .await;
    let api = MerchantApi::start(&app, |b| b).await;

    let created = api
        .send(
            "POST",
            "/invoices?draft=1",
            &[("authorization", &bearer(&plaintext))],
            r#"{"amount_cents": 1200}"#,
        )
        .await;
    assert_eq!(created.status, 201, "{created:?}");
    assert_eq!(created.body["merchant_id"], MERCHANT);
    assert_eq!(created.body["created_by_key"], key.id.as_str());
    let created_row = created.body["audit_id"].as_str().unwrap().to_owned();

    // The handler chooses its status; the layer reports whatever it was.
    let refused = api.send("POST", "/invoices", &[("x-api-key", &plaintext)], r#"{"amount_cents": 0}"#).await;
    assert_eq!(refused.status, 422, "{refused:?}");

    let listed = api.send("GET", "/invoices", &[("x-api-key", &plaintext)], "").await;
    assert_eq!(listed.status, 200);
    assert_eq!(listed.body["invoices"].as_array().map(Vec::len), Some(1));
    let whoami = api.send("GET", "/whoami", &[("authorization", &bearer(&plaintext))], "").await;
    assert_eq!(whoami.body["key_id"], key.id.as_str());
    assert_eq!(whoami.body["scopes"], serde_json::json!(["invoice:read", "invoice:write"]));
    assert_eq!(
        whoami.body["metadata"],
        serde_json::json!({"plan": "gold"}),
        "the grant carries the key's metadata"
    );

    // Reported in the background; a flush sends what is held now.
    api.keywarden.flush().await;
    app.settle().await;
    let rows = audit_rows(&mut app, &key.id).await;
    assert_eq!(rows.len(), 4, "one audit row per verified request: {rows:?}");
    assert_eq!(
        rows[&created_row],
        (201, "/invoices".to_owned(), "POST".to_owned()),
        "the query is not audited"
    );
    let mut statuses: Vec<i32> = rows.values().map(|r| r.0).collect();
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 200, 201, 422]);
    assert_eq!((api.keywarden.reported_outcomes(), api.keywarden.dropped_outcomes()), (4, 0));
    api.server.abort();
    app.stop().await;
}

async fn denied_requests_never_reach_the_handler_and_are_answered_like_the_gateway(backend: Backend) {
    let mut app = spawn_app(backend).await;
    let (_, writer) = app.key_with_scopes(&["invoice:write"]).await;
    let (_, reader) = app.key_with_scopes(&["invoice:read"]).await;
    let (revoked, revoked_key) = app.key_with_scopes(&["invoice:write"]).await;
    revoke(&mut app.admin, &revoked.id).await;
    let api = MerchantApi::start(&app, |b| b).await;

    let unauthenticated = |reason| (401, reason, Some("Bearer"));
    let forbidden = |reason| (403, reason, None);
    assert_eq!(
        api.send("POST", "/invoices", &[], r#"{"amount_cents": 500}"#).await.denial(),
        unauthenticated("DENY_REASON_MALFORMED")
    );
    assert_eq!(
        api_post(&api, &bearer(&wrong_secret(&writer, 1))).await.denial(),
        unauthenticated("DENY_REASON_NOT_FOUND")
    );
    assert_eq!(api_post(&api, &bearer(&revoked_key)).await.denial(), unauthenticated("DENY_REASON_REVOKED"));
    assert_eq!(api_post(&api, &bearer(&reader)).await.denial(), forbidden("DENY_REASON_INSUFFICIENT_SCOPE"));
    assert_eq!(
        api.send("DELETE", "/invoices", &[("authorization", &bearer(&writer))], "").await.denial(),
        forbidden("DENY_REASON_NO_ROUTE")
    );
    // Guessing a key's secret is throttled by the server: 429.
    let (_, guessed) = app.key_with_scopes(&["invoice:write"]).await;
    let mut throttled = None;
    for n in 0..40 {
        let answer = api_post(&api, &bearer(&wrong_secret(&guessed, n))).await;
        if answer.status == 429 {
            throttled = Some(answer.denial().1.to_owned());
            break;
        }
    }
    assert_eq!(throttled.as_deref(), Some("DENY_REASON_THROTTLED"));

    // None of them reached the handler: no invoice exists.
    let listed = api.send("GET", "/invoices", &[("authorization", &bearer(&reader))], "").await;
    assert_eq!(listed.status, 200);
    assert_eq!(listed.body["invoices"], serde_json::json!([]));
    // The same text as the gateway's for the same reason (api::ext_authz).
    let revoked_body = api_post(&api, &bearer(&revoked_key)).await.body;
    assert_eq!(
        revoked_body,
        serde_json::json!({ "error": "API key revoked", "reason": "DENY_REASON_REVOKED" })
    );

    // A handler never sees the key, whichever header carried it; a
    // keywarden it cannot reach answers 503 and lets nothing through.
    // Per request the handler ran for: its grant, and whether it saw a key.
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let handler = {
        let seen = Arc::clone(&seen);
        tower::service_fn(move |request: axum::http::Request<String>| {
            let seen = Arc::clone(&seen);
            async move {
                let carries_key =
                    ["authorization", "x-api-key"].iter().any(|h| request.headers().contains_key(*h));
                seen.lock().unwrap().push((request.extensions().get::<Grant>().cloned(), carries_key));
                Ok::<_, std::convert::Infallible>(axum::http::Response::new(String::new()))
            }
        })
    };
    let endpoint = Endpoint::from_shared(format!("http://{}", app.addr)).unwrap();
    let layer =
        VerifyLayer::new(Client::builder(endpoint).connect_lazy(), |_: &axum::http::Method, _: &str| {
            Requirement::AnyValidKey
        });
    for header in ["authorization", "x-api-key"] {
        let value = if header == "authorization" { bearer(&writer) } else { writer.clone() };
        let request = axum::http::Request::builder()
            .uri("/anything")
            .header(header, value)
            .body(String::new())
            .unwrap();
        let answer = layer.layer(handler.clone()).oneshot(request).await.unwrap();
        assert_eq!(answer.status(), 200);
    }
    assert!(seen.lock().unwrap().iter().all(|(grant, carries_key)| grant.is_some() && !carries_key));
    // A key in both headers is refused before keywarden is asked, as the
    // gateway refuses it; the handler does not run.
    let both = axum::http::Request::builder()
        .uri("/anything")
        .header("authorization", bearer(&writer))
        .header("x-api-key", "sntr_unchecked")
        .body(String::new())
        .unwrap();
    let answer = layer.layer(handler.clone()).oneshot(both).await.unwrap();
    assert_eq!(answer.status(), 400);
    assert_eq!(seen.lock().unwrap().len(), 2, "the handler ran for a request with two keys");
    let unreachable = {
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        let endpoint = Endpoint::from_shared(format!("http://{closed}")).unwrap();
        let client = Client::builder(endpoint).timeout(Duration::from_millis(500)).connect_lazy();
        VerifyLayer::new(client, |_: &axum::http::Method, _: &str| Requirement::AnyValidKey)
    };
    let request = axum::http::Request::builder()
        .uri("/anything")
        .header("x-api-key", writer.clone())
        .body(String::new())
        .unwrap();
    let answer = unreachable.layer(handler.clone()).oneshot(request).await.unwrap();
    assert_eq!(answer.status(), 503);
    assert_eq!(seen.lock().unwrap().len(), 2, "the handler ran without a decision");
    api.server.abort();
    app.stop().await;
}

async fn outcomes_beyond_the_buffer_are_dropped_and_counted(backend: Backend) {
    let mut app = spawn_app(backend).await;
    let (key, plaintext) = app.key_with_scopes(&["invoice:read"]).await;
    // Room for two outcomes, and no flush before the test asks for one.
    let api = MerchantApi::start(&app, |b| b.buffer(2).flush_interval(Duration::from_secs(3600))).await;
    for _ in 0..5 {
        assert_eq!(api.send("GET", "/invoices", &[("x-api-key", &plaintext)], "").await.status, 200);
    }
    // Two are held until sent; the other three are counted, never waited for.
    assert_eq!((api.keywarden.dropped_outcomes(), api.keywarden.reported_outcomes()), (3, 0));
    api.keywarden.flush().await;
    assert_eq!(api.keywarden.reported_outcomes(), 2);
    app.settle().await;
    let rows = audit_rows(&mut app, &key.id).await;
    assert_eq!(rows.len(), 5, "every request was verified and audited");
    let statuses: Vec<i32> = rows.values().map(|r| r.0).filter(|s| *s != 0).collect();
    assert_eq!(statuses, [200, 200], "the held outcomes reached their rows: {rows:?}");
    // With room again, the next answer is held, not dropped.
    assert_eq!(api.send("GET", "/invoices", &[("x-api-key", &plaintext)], "").await.status, 200);
    api.keywarden.flush().await;
    assert_eq!((api.keywarden.dropped_outcomes(), api.keywarden.reported_outcomes()), (3, 3));
    api.server.abort();
    app.stop().await;
}
