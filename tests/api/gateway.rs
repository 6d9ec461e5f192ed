//! Gateway mode: Envoy's ext_authz Check, called through envoy-types'
//! generated client as Envoy would, against a real server with a route
//! file.

use std::collections::HashMap;

use envoy_types::pb::envoy::{
    config::core::v3::{
        Address, SocketAddress, address, header_value_option::HeaderAppendAction, socket_address,
    },
    service::auth::v3::{
        AttributeContext, CheckRequest, CheckResponse,
        attribute_context::{HttpRequest, Peer, Request},
        authorization_client::AuthorizationClient,
        check_response::HttpResponse,
    },
};
use keywarden::{api::pb, config::Settings};
use tonic::transport::Channel;

use crate::helpers::{
    Backend, MERCHANT, TestApp, create_sales_key, eventually, revoke, spawn_app_on, spawn_app_over,
    spawn_app_with, until, wrong_secret,
};

backend_tests!(
    every_decision_answers_its_http_status_body_headers_and_grpc_code,
    routes_decide_the_scope_and_a_changed_file_takes_effect_unless_invalid,
    trusted_hops_choose_the_client_ip_a_cidr_limited_key_is_judged_on,
    the_access_log_stream_fills_the_status_of_every_checked_request,
    only_canonical_requests_are_matched_so_a_narrow_key_reaches_no_other_route,
    a_rows_status_is_written_once_by_the_party_that_saw_it,
    metadata_reaches_upstream_as_headers_and_a_clients_own_are_removed,
);
once_tests!(
    a_key_revoked_on_another_replica_is_denied_by_check_within_the_fleet_bound(postgres),
    past_the_staleness_bound_with_the_database_away_check_answers_503(postgres),
);

/// The route table docs/gateway.md shows (its first TOML block): the
/// documented values are the tested ones.
fn documented_routes() -> String {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/gateway.md")).unwrap();
    let block = doc.split("```toml\n").nth(1).expect("docs/gateway.md shows a route table");
    block.split("```").next().unwrap().to_owned()
}

/// A route file in its own directory (kept alive by the returned guard).
fn route_file(text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("routes.toml");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

fn with_routes(path: &std::path::Path) -> impl FnOnce(&mut Settings) + use<> {
    let path = path.to_owned();
    move |s: &mut Settings| {
        s.routes_file = Some(path);
        s.routes_reload_interval_ms = 50;
    }
}

fn client(app: &TestApp) -> AuthorizationClient<Channel> {
    AuthorizationClient::new(Channel::from_shared(format!("http://{}", app.addr)).unwrap().connect_lazy())
}

/// What Envoy sends for `method path` from `source` with `headers`.
fn request(method: &str, path: &str, headers: &[(&str, &str)], source: &str) -> CheckRequest {
    let address = Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: source.into(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(40_000)),
            ..Default::default()
        })),
    };
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(Peer { address: Some(address), ..Default::default() }),
            request: Some(Request {
                http: Some(HttpRequest {
                    method: method.into(),
                    path: path.into(),
                    headers: headers.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

async fn check(client: &mut AuthorizationClient<Channel>, req: CheckRequest) -> CheckResponse {
    client.check(req).await.expect("Check answers").into_inner()
}

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

/// An allowed answer: the headers it sets (name → (value, overwrites)) and
/// the headers it removes.
fn allowed(r: &CheckResponse) -> (HashMap<String, (String, bool)>, Vec<String>) {
    assert_eq!(r.status.as_ref().map(|s| s.code), Some(0), "{r:?}");
    let Some(HttpResponse::OkResponse(ok)) = &r.http_response else { panic!("not an OK response: {r:?}") };
    let set = ok
        .headers
        .iter()
        .filter_map(|h| {
            let header = h.header.as_ref()?;
            let overwrites = h.append_action == HeaderAppendAction::OverwriteIfExistsOrAdd as i32;
            Some((header.key.clone(), (header.value.clone(), overwrites)))
        })
        .collect();
    (set, ok.headers_to_remove.clone())
}

/// A denied answer: (HTTP status, gRPC code, body's reason, www-authenticate).
fn denied(r: &CheckResponse) -> (i32, i32, String, Option<String>) {
    let Some(HttpResponse::DeniedResponse(d)) = &r.http_response else { panic!("not a denial: {r:?}") };
    let header = |name: &str| {
        d.headers.iter().filter_map(|h| h.header.as_ref()).find(|h| h.key == name).map(|h| h.value.clone())
    };
    assert_eq!(header("content-type").as_deref(), Some("application/json"));
    let body: serde_json::Value = serde_json::from_str(&d.body).expect("a JSON body");
    assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()), "{body}");
    (
        d.status.as_ref().map_or(0, |s| s.code),
        r.status.as_ref().map_or(0, |s| s.code),
        body["reason"].as_str().unwrap_or_default().to_owned(),
        header("www-authenticate"),
    )
}

/// The headers a key may come in; Check removes both on ALLOW.
const KEY_HEADERS: [&str; 2] = ["authorization", "x-api-key"];

/// The audit id Check put in its dynamic metadata, which Envoy files under
/// `envoy.filters.http.ext_authz` and logs with the request.
fn metadata_audit_id(r: &CheckResponse) -> Option<String> {
    use envoy_types::pb::google::protobuf::value::Kind;
    match r.dynamic_metadata.as_ref()?.fields.get("audit_id")?.kind.as_ref()? {
        Kind::StringValue(id) => Some(id.clone()),
        _ => None,
    }
}

const UNAUTHENTICATED: i32 = tonic::Code::Unauthenticated as i32;
const INVALID_ARGUMENT: i32 = tonic::Code::InvalidArgument as i32;
const PERMISSION_DENIED: i32 = tonic::Code::PermissionDenied as i32;
const RESOURCE_EXHAUSTED: i32 = tonic::Code::ResourceExhausted as i32;

async fn every_decision_answers_its_http_status_body_headers_and_grpc_code(backend: Backend) {
    let (_dir, path) = route_file(&documented_routes());
    let mut app = spawn_app_with(backend, with_routes(&path)).await;
    let (reader, read_key) = app.key_with_scopes(&["invoice:read"]).await;
    let mut gateway = client(&app);
    let source = "192.0.2.10";

    // Allowed, key in `authorization`: the grant travels upstream, the key does not.
    let r = check(
        &mut gateway,
        request(
            "GET",
            "/public/api/v1/invoices/42?expand=lines",
            &[("authorization", &bearer(&read_key)), ("x-keywarden-merchant-id", "forged")],
            source,
        ),
    )
    .await;
    let (set, removed) = allowed(&r);
    assert_eq!(
        set["x-keywarden-merchant-id"],
        (MERCHANT.to_owned(), true),
        "overwrites what the client sent"
    );
    assert_eq!(set["x-keywarden-key-id"], (reader.id.clone(), true));
    assert_eq!(set["x-keywarden-scopes"], ("invoice:read".to_owned(), true));
    let audit_id = set["x-keywarden-audit-id"].0.clone();
    assert!(!audit_id.is_empty());
    assert_eq!(removed, KEY_HEADERS, "neither key header goes upstream");
    assert_eq!(metadata_audit_id(&r).as_deref(), Some(audit_id.as_str()), "the access log's id");

    // Key in `x-api-key`: both headers are removed all the same.
    let r =
        check(&mut gateway, request("GET", "/public/api/v1/invoices/7", &[("x-api-key", &read_key)], source))
            .await;
    assert_eq!(allowed(&r).1, KEY_HEADERS);

    // The audit row is Verify's, with the method and the path without its query.
    let events = app.audit_of(&reader.id).await;
    let row = events.iter().find(|e| e.id == audit_id).expect("the Check's audit row");
    assert_eq!(
        (row.endpoint.as_str(), row.method.as_str(), row.ip.as_str()),
        ("/public/api/v1/invoices/42", "GET", source)
    );

    // Every denial: status, gRPC code, reason, www-authenticate on 401.
    let unauthenticated =
        |reason: &str| (401, UNAUTHENTICATED, format!("DENY_REASON_{reason}"), Some("Bearer".to_owned()));
    let forbidden = |reason: &str| (403, PERMISSION_DENIED, format!("DENY_REASON_{reason}"), None);
    let get = |headers: &[(&str, &str)]| request("GET", "/public/api/v1/invoices/1", headers, source);
    assert_eq!(denied(&check(&mut gateway, get(&[])).await), unauthenticated("MALFORMED"), "no key");
    assert_eq!(
        denied(&check(&mut gateway, get(&[("authorization", "Basic abc")])).await),
        unauthenticated("MALFORMED")
    );
    assert_eq!(
        denied(&check(&mut gateway, get(&[("authorization", &bearer(&wrong_secret(&read_key, 1)))])).await),
        unauthenticated("NOT_FOUND")
    );
    let post = request("POST", "/public/api/v1/invoices", &[("authorization", &bearer(&read_key))], source);
    assert_eq!(denied(&check(&mut gateway, post).await), forbidden("INSUFFICIENT_SCOPE"));
    let nowhere = request("GET", "/internal/admin", &[("authorization", &bearer(&read_key))], source);
    assert_eq!(denied(&check(&mut gateway, nowhere).await), forbidden("NO_ROUTE"));
    let (revoked, revoked_key) = app.key_with_scopes(&["invoice:read"]).await;
    revoke(&mut app.admin, &revoked.id).await;
    assert_eq!(
        denied(&check(&mut gateway, get(&[("authorization", &bearer(&revoked_key))])).await),
        unauthenticated("REVOKED")
    );
    let (disabled, disabled_key) = app.key_with_scopes(&["invoice:read"]).await;
    app.admin
        .disable_key(pb::DisableKeyRequest {
            merchant_id: MERCHANT.into(),
            key_id: disabled.id.clone(),
            reason: "under review".into(),
        })
        .await
        .unwrap();
    assert_eq!(
        denied(&check(&mut gateway, get(&[("authorization", &bearer(&disabled_key))])).await),
        forbidden("DISABLED"),
        "a disabled key is refused, not unknown"
    );

    // Guessing a key's secret is throttled: 429, RESOURCE_EXHAUSTED.
    let (_, target) = create_sales_key(&mut app.admin, "guessed").await;
    let guess = |n| {
        request(
            "GET",
            "/public/api/v1/sales/q4",
            &[("authorization", &bearer(&wrong_secret(&target, n)))],
            source,
        )
    };
    let mut throttled = None;
    for n in 0..40 {
        let r = check(&mut gateway, guess(n)).await;
        if denied(&r).0 == 429 {
            throttled = Some(denied(&r));
            break;
        }
    }
    assert_eq!(throttled, Some((429, RESOURCE_EXHAUSTED, "DENY_REASON_THROTTLED".to_owned(), None)));

    // A key over its rate limit: 429 with the IETF RateLimit header fields.
    let (_, limited_key) = app
        .create_key(pb::CreateKeyRequest {
            merchant_id: MERCHANT.into(),
            name: "limited".into(),
            scopes: vec!["sales:read".into()],
            rate_limits: vec![pb::RateLimit {
                name: "per-minute".into(),
                limit: 1,
                window: Some(prost_types::Duration { seconds: 60, nanos: 0 }),
            }],
            ..Default::default()
        })
        .await;
    let sales =
        || request("GET", "/public/api/v1/sales/q4", &[("authorization", &bearer(&limited_key))], source);
    allowed(&check(&mut gateway, sales()).await);
    let r = check(&mut gateway, sales()).await;
    assert_eq!(denied(&r), (429, RESOURCE_EXHAUSTED, "DENY_REASON_RATE_LIMITED".to_owned(), None));
    let Some(HttpResponse::DeniedResponse(d)) = &r.http_response else { unreachable!() };
    let header = |name: &str| {
        d.headers.iter().filter_map(|h| h.header.as_ref()).find(|h| h.key == name).map(|h| h.value.clone())
    };
    assert_eq!(header("ratelimit-limit").as_deref(), Some("1"));
    assert_eq!(header("ratelimit-remaining").as_deref(), Some("0"));
    let reset: u64 = header("ratelimit-reset").expect("ratelimit-reset").parse().unwrap();
    assert!((1..=60).contains(&reset), "seconds until the limit is full again: {reset}");
    app.stop().await;
}

async fn routes_decide_the_scope_and_a_changed_file_takes_effect_unless_invalid(backend: Backend) {
    let (_dir, path) = route_file(&documented_routes().replace("\"deny\"", "\"authenticate\""));
    let mut app = spawn_app_with(backend, with_routes(&path)).await;
    let (_, sales_key) = create_sales_key(&mut app.admin, "sales").await;
    let mut gateway = client(&app);
    let source = "192.0.2.10";
    let call =
        |method: &str, path: &str| request(method, path, &[("authorization", &bearer(&sales_key))], source);

    // `**` with any method; unmatched under "authenticate": any valid key.
    allowed(&check(&mut gateway, call("DELETE", "/public/api/v1/sales/2026/q4")).await);
    allowed(&check(&mut gateway, call("GET", "/elsewhere")).await);
    // A route that needs another scope.
    assert_eq!(denied(&check(&mut gateway, call("GET", "/public/api/v1/invoices/1")).await).0, 403);

    // A valid change takes effect: the invoice route now takes sales:read
    // (an earlier route wins over the older ones), and unmatched is denied.
    let changed = format!(
        "unmatched = \"deny\"\n[[route]]\nmethod = \"GET\"\npath = \"/public/api/v1/invoices/{{id}}\"\nscope = \"sales:read\"\n{}",
        documented_routes().split_once('\n').unwrap().1.replace(
            "path = \"/public/api/v1/invoices/{id}\"",
            "path = \"/public/api/v1/invoices/{id}/lines\""
        )
    );
    std::fs::write(&path, changed).unwrap();
    until("the changed route file to take effect", || {
        let mut g = gateway.clone();
        let req = call("GET", "/public/api/v1/invoices/1");
        async move {
            g.check(req)
                .await
                .ok()
                .map(|r| r.into_inner())
                .filter(|r| r.status.as_ref().is_some_and(|s| s.code == 0))
        }
    })
    .await;
    assert_eq!(denied(&check(&mut gateway, call("GET", "/elsewhere")).await).2, "DENY_REASON_NO_ROUTE");

    // An invalid file is refused, counted, and the table in use stays.
    std::fs::write(&path, documented_routes().replace("sales:read", "sales:reed")).unwrap();
    let metrics = app.probes.exporter.clone();
    eventually("the invalid route file to be refused", || {
        let m = crate::helpers::parse_metrics(&metrics.render());
        (m["keywarden_gateway_route_reload_failures_total"] >= 1.0).then_some(())
    })
    .await;
    allowed(&check(&mut gateway, call("GET", "/public/api/v1/invoices/1")).await);
    app.stop().await;
}

async fn trusted_hops_choose_the_client_ip_a_cidr_limited_key_is_judged_on(backend: Backend) {
    let (_dir, path) = route_file(&documented_routes());
    for (hops, expected_ip, allowed_expected) in [(1, "10.0.0.5", true), (0, "192.0.2.10", false)] {
        let routes = with_routes(&path);
        let mut app = spawn_app_over(
            backend.clone(),
            None,
            |_| async {},
            move |s| {
                routes(s);
                s.trusted_proxy_hops = hops;
            },
        )
        .await;
        let (key, plaintext) = app
            .create_key(pb::CreateKeyRequest {
                merchant_id: MERCHANT.into(),
                name: "office only".into(),
                scopes: vec!["sales:read".into()],
                allowed_cidrs: vec!["10.0.0.0/24".into()],
                ..Default::default()
            })
            .await;
        let headers =
            [("authorization", bearer(&plaintext)), ("x-forwarded-for", "evil, 10.0.0.5".to_owned())];
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let r =
            check(&mut client(&app), request("GET", "/public/api/v1/sales", &headers, "192.0.2.10")).await;
        if allowed_expected {
            allowed(&r);
        } else {
            assert_eq!(denied(&r), (403, PERMISSION_DENIED, "DENY_REASON_IP_NOT_ALLOWED".to_owned(), None));
        }
        let events = app.audit_of(&key.id).await;
        let checked: Vec<&str> = events
            .iter()
            .filter(|e| e.kind == pb::AuditEventKind::Verify as i32)
            .map(|e| e.ip.as_str())
            .collect();
        assert_eq!(checked, [expected_ip], "hops = {hops}");
        app.stop().await;
    }
}

/// A key revoked through one replica is denied by another's Check at once:
/// the gateway shares Verify's cache and its PostgreSQL change feed.
async fn a_key_revoked_on_another_replica_is_denied_by_check_within_the_fleet_bound() {
    let (_dir, path) = route_file(&documented_routes());
    let mut admin_replica = spawn_app_with(Backend::postgres(), with_routes(&path)).await;
    let gateway_replica = spawn_app_on(&admin_replica, with_routes(&path)).await;
    let (key, plaintext) = create_sales_key(&mut admin_replica.admin, "revoked elsewhere").await;
    let mut gateway = client(&gateway_replica);
    let call =
        || request("GET", "/public/api/v1/sales", &[("authorization", &bearer(&plaintext))], "192.0.2.10");
    // Cached on the gateway replica, and its change listener up.
    allowed(&check(&mut gateway, call()).await);
    eventually("the gateway replica to listen for changes", || {
        gateway_replica.probes.freshness.trusted().then_some(())
    })
    .await;

    revoke(&mut admin_replica.admin, &key).await;
    let revoked = std::time::Instant::now();
    until("Check on the other replica to deny the revoked key", || {
        let (mut gateway, req) = (gateway.clone(), call());
        async move {
            gateway.check(req).await.ok().filter(|r| r.get_ref().status.as_ref().is_some_and(|s| s.code != 0))
        }
    })
    .await;
    // The fleet bound is 100 ms at p99 (fleet::revocation_on_one_replica_…);
    // a busy test machine gets ten times that, far below the cache TTL a
    // missed notice costs.
    let took = revoked.elapsed();
    assert!(took < std::time::Duration::from_secs(1), "denied after {took:?}");
    assert_eq!(denied(&check(&mut gateway, call()).await).2, "DENY_REASON_REVOKED");
    gateway_replica.stop().await;
    admin_replica.stop().await;
}

/// Past the staleness bound, with the database unreachable, Check cannot
/// decide safely: 503 with UNAVAILABLE, never an answer from stale state.
async fn past_the_staleness_bound_with_the_database_away_check_answers_503() {
    use crate::helpers::Proxy;
    let (_dir, path) = route_file(&documented_routes());
    let Backend::Postgres(server) = Backend::postgres() else { unreachable!() };
    let proxy = Proxy::start(Proxy::upstream_of(&server)).await;
    let routes = with_routes(&path);
    let mut app = spawn_app_over(
        Backend::postgres(),
        None,
        |_| async {},
        |s| {
            routes(s);
            s.database_url = s.database_url.as_deref().map(|url| proxy.url_for(url));
            s.staleness_bound_ms = 1_000;
            s.health_check_interval_ms = 100;
            s.db_acquire_timeout_ms = 300;
        },
    )
    .await;
    let (_, plaintext) = create_sales_key(&mut app.admin, "bounded").await;
    let mut gateway = client(&app);
    let call =
        || request("GET", "/public/api/v1/sales", &[("authorization", &bearer(&plaintext))], "192.0.2.10");
    allowed(&check(&mut gateway, call()).await);
    proxy.cut();
    let answer = until("Check to stop deciding past the bound", || {
        let (mut gateway, req) = (gateway.clone(), call());
        async move {
            let r = gateway.check(req).await.ok()?.into_inner();
            r.status.as_ref().is_some_and(|s| s.code == tonic::Code::Unavailable as i32).then_some(r)
        }
    })
    .await;
    assert_eq!(
        denied(&answer),
        (503, tonic::Code::Unavailable as i32, "DENY_REASON_UNSPECIFIED".to_owned(), None)
    );
    proxy.restore();
    until("Check to decide again once the database answers", || {
        let (mut gateway, req) = (gateway.clone(), call());
        async move {
            gateway.check(req).await.ok().filter(|r| r.get_ref().status.as_ref().is_some_and(|s| s.code == 0))
        }
    })
    .await;
    app.stop().await;
}

/// One access-log entry as Envoy streams it: the dynamic metadata Check
/// answered (filed under `envoy.filters.http.ext_authz`), the
/// `x-keywarden-audit-id` request header if one was logged, and the status
/// Envoy answered.
fn log_entry(
    check: Option<&CheckResponse>,
    header: Option<&str>,
    status: u32,
) -> envoy_types::pb::envoy::data::accesslog::v3::HttpAccessLogEntry {
    use envoy_types::pb::{
        envoy::{
            config::core::v3::Metadata,
            data::accesslog::v3::{
                AccessLogCommon, HttpAccessLogEntry, HttpRequestProperties, HttpResponseProperties,
            },
        },
        google::protobuf::UInt32Value,
    };
    let metadata = check.and_then(|r| r.dynamic_metadata.clone()).map(|checked| Metadata {
        filter_metadata: [("envoy.filters.http.ext_authz".to_owned(), checked)].into(),
        ..Default::default()
    });
    HttpAccessLogEntry {
        common_properties: Some(AccessLogCommon { metadata, ..Default::default() }),
        request: Some(HttpRequestProperties {
            request_headers: header
                .map(|id| ("x-keywarden-audit-id".to_owned(), id.to_owned()))
                .into_iter()
                .collect(),
            path: "/public/api/v1/sales".into(),
            ..Default::default()
        }),
        response: Some(HttpResponseProperties {
            response_code: Some(UInt32Value { value: status }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

async fn the_access_log_stream_fills_the_status_of_every_checked_request(backend: Backend) {
    use envoy_types::pb::envoy::service::accesslog::v3::{
        StreamAccessLogsMessage,
        access_log_service_client::AccessLogServiceClient,
        stream_access_logs_message::{HttpAccessLogEntries, LogEntries},
    };
    let (_dir, path) = route_file(&documented_routes());
    let mut app = spawn_app_with(backend, with_routes(&path)).await;
    let (key_id, plaintext) = create_sales_key(&mut app.admin, "logged").await;
    let mut gateway = client(&app);
    let mut checked = Vec::with_capacity(1000);
    for _ in 0..1000 {
        let r = check(
            &mut gateway,
            request("GET", "/public/api/v1/sales", &[("authorization", &bearer(&plaintext))], "192.0.2.10"),
        )
        .await;
        allowed(&r);
        checked.push(r);
    }
    let audit_ids: Vec<String> = checked.iter().map(|r| metadata_audit_id(r).expect("an audit id")).collect();
    // One stream: ten messages of a hundred entries, then five entries
    // Envoy logged without Check's metadata (routes Check never saw).
    let mut messages: Vec<StreamAccessLogsMessage> = checked
        .chunks(100)
        .map(|rs| StreamAccessLogsMessage {
            log_entries: Some(LogEntries::HttpLogs(HttpAccessLogEntries {
                log_entry: rs.iter().map(|r| log_entry(Some(r), None, 201)).collect(),
            })),
            ..Default::default()
        })
        .collect();
    messages.push(StreamAccessLogsMessage {
        log_entries: Some(LogEntries::HttpLogs(HttpAccessLogEntries {
            log_entry: (0..5).map(|_| log_entry(None, None, 200)).collect(),
        })),
        ..Default::default()
    });
    let channel = Channel::from_shared(format!("http://{}", app.addr)).unwrap().connect_lazy();
    AccessLogServiceClient::new(channel)
        .stream_access_logs(tokio_stream::iter(messages))
        .await
        .expect("the stream is taken");

    // ListAuditEvents shows the status on every one of the 1000 rows.
    app.settle().await;
    let mut statuses = HashMap::new();
    let mut page_token = String::new();
    loop {
        let page = app
            .admin
            .list_audit_events(pb::ListAuditEventsRequest {
                merchant_id: MERCHANT.into(),
                api_key_id: key_id.clone(),
                page_size: 500,
                page_token: page_token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        statuses.extend(page.events.into_iter().map(|e| (e.id, e.status)));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    let filled = audit_ids.iter().filter(|id| statuses.get(*id) == Some(&201)).count();
    assert_eq!(filled, 1000, "every checked request's row carries the status Envoy logged");
    let m = crate::helpers::parse_metrics(&app.probes.exporter.render());
    assert_eq!(m["keywarden_access_log_entries_skipped_total"], 5.0);
    assert_eq!(m["keywarden_access_log_outcomes_recorded_total"], 1000.0);
    app.stop().await;
}

/// Each of these paths reaches the invoices routes behind a server that
/// normalises paths; none may be matched with a key that holds only
/// `sales:read`, whatever the unmatched mode.
const SPELLED_AROUND: [&str; 9] = [
    "/public/api/v1/sales/../invoices",
    "/public/api/v1/sales/%2e%2e/invoices",
    "/public/api/v1/sales/..%2Finvoices",
    "/public/api/v1/sales/./../invoices",
    "/public/api/v1/sales/..%5Cinvoices",
    "/public/api/v1/sales/%2E%2E/invoices/42",
    "/public/api/v1/sales//../../invoices",
    "/public/api/v1//invoices",
    "/public/api/v1/%69nvoices",
];

async fn only_canonical_requests_are_matched_so_a_narrow_key_reaches_no_other_route(backend: Backend) {
    let (_dir, path) = route_file(&documented_routes().replace("\"deny\"", "\"authenticate\""));
    let mut app = spawn_app_with(backend, with_routes(&path)).await;
    let (_, sales_key) = create_sales_key(&mut app.admin, "sales only").await;
    let mut gateway = client(&app);
    let source = "192.0.2.10";
    let bad_request = (400, INVALID_ARGUMENT, "DENY_REASON_MALFORMED_REQUEST".to_owned(), None);
    let with_key = [("authorization", bearer(&sales_key))];
    let headers: Vec<(&str, &str)> = with_key.iter().map(|(k, v)| (*k, v.as_str())).collect();

    for path in SPELLED_AROUND {
        let r = check(&mut gateway, request("POST", path, &headers, source)).await;
        assert_eq!(denied(&r), bad_request, "POST {path}");
    }
    // A method in lower case is no method a route names.
    let r = check(&mut gateway, request("post", "/public/api/v1/invoices", &headers, source)).await;
    assert_eq!(denied(&r), bad_request, "a lower-case method");
    // A key in both headers: one of them would go upstream unchecked.
    let both = [("authorization", bearer(&sales_key)), ("x-api-key", sales_key.clone())];
    let both: Vec<(&str, &str)> = both.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let r = check(&mut gateway, request("GET", "/public/api/v1/sales/q4", &both, source)).await;
    assert_eq!(denied(&r), bad_request, "a key in two headers");
    // One trailing slash is the route without it; both key headers go.
    let r = check(&mut gateway, request("GET", "/public/api/v1/sales/", &headers, source)).await;
    assert_eq!(allowed(&r).1, KEY_HEADERS);
    // Every refusal above was decided before the key was looked at, and
    // counted as such.
    let m = crate::helpers::parse_metrics(&app.probes.exporter.render());
    let refused = m[r#"keywarden_verify_decisions_total{decision="DENY",reason="MALFORMED_REQUEST"}"#];
    assert_eq!(refused, (SPELLED_AROUND.len() + 2) as f64);
    app.stop().await;
}

async fn a_rows_status_is_written_once_by_the_party_that_saw_it(backend: Backend) {
    use envoy_types::pb::envoy::service::accesslog::v3::{
        StreamAccessLogsMessage,
        access_log_service_client::AccessLogServiceClient,
        stream_access_logs_message::{HttpAccessLogEntries, LogEntries},
    };
    let (_dir, path) = route_file(&documented_routes());
    let mut app = spawn_app_with(backend.clone(), with_routes(&path)).await;
    let (_, victim_key) = create_sales_key(&mut app.admin, "victim").await;
    let mut gateway = client(&app);
    let sales = |key: &str| {
        request("GET", "/public/api/v1/sales/q4", &[("authorization", &bearer(key))], "192.0.2.10")
    };
    let victims = check(&mut gateway, sales(&victim_key)).await;
    allowed(&victims);
    let victim_row = metadata_audit_id(&victims).unwrap();

    // An attacker's own request, denied, carries the victim's audit id in
    // the header Check sets only on ALLOW; Envoy logs it with a 500.
    let forged = request(
        "GET",
        "/public/api/v1/sales/q4",
        &[("authorization", "Bearer sntr_nothing"), ("x-keywarden-audit-id", &victim_row)],
        "192.0.2.66",
    );
    let attackers = check(&mut gateway, forged).await;
    assert_eq!(denied(&attackers).0, 401);
    let stream = |entries| {
        let channel = Channel::from_shared(format!("http://{}", app.addr)).unwrap().connect_lazy();
        async move {
            let message = StreamAccessLogsMessage {
                log_entries: Some(LogEntries::HttpLogs(HttpAccessLogEntries { log_entry: entries })),
                ..Default::default()
            };
            AccessLogServiceClient::new(channel)
                .stream_access_logs(tokio_stream::iter([message]))
                .await
                .expect("the stream is taken");
        }
    };
    stream(vec![log_entry(Some(&attackers), Some(&victim_row), 500)]).await;
    app.settle().await;
    let status_of = |id: String| {
        let url = app.database_url.clone();
        async move {
            crate::helpers::value::<Option<i32>>(
                &url,
                &format!("SELECT status FROM audit_events WHERE id = '{id}'"),
            )
            .await
        }
    };
    assert_eq!(status_of(victim_row.clone()).await, None, "a client's header named no row");

    // The victim's own entry fills its row; nothing overwrites it later:
    // not a replayed log, not RecordOutcomes from any KeyVerify caller.
    stream(vec![log_entry(Some(&victims), None, 201)]).await;
    app.settle().await;
    assert_eq!(status_of(victim_row.clone()).await, Some(201));
    stream(vec![log_entry(Some(&victims), None, 500)]).await;
    let overwrite = pb::RecordOutcomesRequest {
        outcomes: vec![pb::Outcome { audit_event_id: victim_row.clone(), status: 503 }],
    };
    assert_eq!(app.verify.record_outcomes(overwrite).await.unwrap().into_inner().updated, 0);
    app.settle().await;
    assert_eq!(status_of(victim_row.clone()).await, Some(201), "written once");

    // An id twice in one batch: the first status stands and the batch is
    // not lost. An id another replica issued, whose row has not landed,
    // is held once on PostgreSQL.
    let second = check(&mut gateway, sales(&victim_key)).await;
    let second_row = metadata_audit_id(&second).unwrap();
    app.settle().await;
    let elsewhere = keywarden::keys::EventIds::new(
        keywarden::keys::KeyHasher::from_base64(crate::helpers::PEPPER)
            .unwrap()
            .subkey_macs(keywarden::keys::event_id::PURPOSE),
    )
    .mint();
    let outcome = |id: &str, status| pb::Outcome { audit_event_id: id.to_owned(), status };
    let batch = pb::RecordOutcomesRequest {
        outcomes: vec![
            outcome(&second_row, 204),
            outcome(&elsewhere, 200),
            outcome(&second_row, 500),
            outcome(&elsewhere, 502),
        ],
    };
    let updated = app.verify.record_outcomes(batch).await.expect("a repeated id does not fail the batch");
    assert_eq!(updated.into_inner().updated, 1);
    app.settle().await;
    assert_eq!(status_of(second_row).await, Some(204), "the first report wins");
    if matches!(backend, Backend::Postgres(_)) {
        let held = crate::helpers::value::<i32>(
            &app.database_url,
            &format!("SELECT status FROM audit_outcomes WHERE event_id = '{elsewhere}'"),
        )
        .await;
        assert_eq!(held, 200);
    }
    let m = crate::helpers::parse_metrics(&app.probes.exporter.render());
    assert_eq!(m["keywarden_audit_outcomes_ignored_total"], 4.0, "a replay, an overwrite, two repeats");
    app.stop().await;
}

/// The key's metadata travels upstream as `x-keywarden-meta-<name>` (for
/// values a header can carry unchanged); a client cannot pass its own
/// header of that form off as the key's.
async fn metadata_reaches_upstream_as_headers_and_a_clients_own_are_removed(backend: Backend) {
    let (_dir, path) = route_file(&documented_routes());
    let mut app = spawn_app_with(backend, with_routes(&path)).await;
    let (_, key) = app
        .create_key(pb::CreateKeyRequest {
            merchant_id: MERCHANT.into(),
            name: "labelled".into(),
            scopes: vec!["invoice:read".into()],
            metadata: [("plan", "gold"), ("team", "Zahlungsverkehr – Süd")]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            ..Default::default()
        })
        .await;
    let mut gateway = client(&app);
    let r = check(
        &mut gateway,
        request(
            "GET",
            "/public/api/v1/invoices/42",
            &[
                ("authorization", &bearer(&key)),
                ("x-keywarden-meta-plan", "free"),
                ("x-keywarden-meta-tier", "enterprise"),
                ("x-keywarden-meta-team", "forged"),
            ],
            "192.0.2.10",
        ),
    )
    .await;
    let (set, removed) = allowed(&r);
    assert_eq!(
        set["x-keywarden-meta-plan"],
        ("gold".to_owned(), true),
        "the key's value overwrites the client's"
    );
    assert!(!set.contains_key("x-keywarden-meta-team"), "a non-ASCII value is not sent as a header");
    let mut removed: Vec<&str> =
        removed.iter().map(String::as_str).filter(|h| !KEY_HEADERS.contains(h)).collect();
    removed.sort_unstable();
    assert_eq!(
        removed,
        ["x-keywarden-meta-team", "x-keywarden-meta-tier"],
        "the client's own metadata headers never reach upstream"
    );
    app.stop().await;
}
