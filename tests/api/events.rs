//! Lifecycle events: written in the change's own transaction (and never
//! for one that rolled back), listed in order by ListEvents, delivered to
//! NATS JetStream (de-duplicated by event id) and to signed webhooks
//! (retried with growing delays), by one replica at a time; and expiry
//! reminders, once per occasion.

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use hmac::{KeyInit as _, Mac as _};
use keywarden::{api::pb, config::Settings};
use tokio::sync::oneshot;

use crate::helpers::*;

backend_tests!(
    every_change_writes_one_event_in_its_own_transaction,
    a_change_that_rolls_back_leaves_no_event_and_an_event_that_fails_undoes_the_change,
    webhooks_are_signed_and_retried_with_growing_delays,
    jetstream_gets_a_keys_events_in_order_and_drops_a_replayed_one,
    a_key_is_reminded_once_expires_once_and_a_new_expiry_rearms_it,
);

once_tests!(
    events_written_during_nats_and_receiver_outages_are_all_delivered,
    three_replicas_deliver_each_event_once_and_a_killed_deliverer_is_replaced(postgres),
);

/// Fast relay ticks, and `http://` receivers.
fn eventful(s: &mut Settings) {
    s.events_poll_interval_ms = 50;
    s.events_lease_ms = 3_000;
    s.webhook_timeout_ms = 1_000;
    s.webhook_allow_http = true;
}

pub fn nats_url() -> String {
    std::env::var("KEYWARDEN_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// Every event of the test merchant ListEvents has placed, in order.
async fn listed(admin: &mut AdminClient, types: &[&str]) -> Vec<pb::Event> {
    let mut events = Vec::new();
    let mut after = String::new();
    loop {
        let page = admin
            .list_events(pb::ListEventsRequest {
                merchant_id: MERCHANT.into(),
                types: types.iter().map(|t| (*t).to_owned()).collect(),
                after: after.clone(),
                page_size: 2,
            })
            .await
            .unwrap()
            .into_inner();
        if page.events.is_empty() {
            return events;
        }
        after = page.next_cursor;
        events.extend(page.events);
    }
}

/// Waits until ListEvents shows `n` events of `types` (all types if empty).
pub async fn listed_n(admin: &AdminClient, types: &[&str], n: usize) -> Vec<pb::Event> {
    until(&format!("{n} events of {types:?} listed"), || {
        let mut admin = admin.clone();
        async move { Some(listed(&mut admin, types).await).filter(|e| e.len() >= n) }
    })
    .await
}

pub fn data_text(event: &pb::Event, field: &str) -> String {
    use prost_types::value::Kind;
    match event.data.as_ref().and_then(|d| d.fields.get(field)).and_then(|v| v.kind.clone()) {
        Some(Kind::StringValue(s)) => s,
        Some(Kind::NumberValue(n)) => n.to_string(),
        Some(Kind::NullValue(_)) => "null".into(),
        Some(Kind::ListValue(l)) => format!("{} items", l.values.len()),
        other => panic!("{}: data.{field} is {other:?}", event.r#type),
    }
}

fn timestamp_in(d: Duration) -> prost_types::Timestamp {
    let at = chrono::Utc::now() + chrono::Duration::from_std(d).unwrap();
    prost_types::Timestamp { seconds: at.timestamp(), nanos: 0 }
}

async fn every_change_writes_one_event_in_its_own_transaction(backend: Backend) {
    let mut app = spawn_app_with(backend, eventful).await;
    let created = app
        .admin
        .create_key(pb::CreateKeyRequest {
            merchant_id: MERCHANT.into(),
            name: "till".into(),
            scopes: vec!["sales:read".into()],
            expires_at: Some(timestamp_in(Duration::from_secs(30 * 86_400))),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let (key, plaintext) = (created.api_key.unwrap(), created.plaintext_key);
    app.admin
        .update_key(pb::UpdateKeyRequest {
            merchant_id: MERCHANT.into(),
            key_id: key.id.clone(),
            name: "front till".into(),
            update_mask: Some(prost_types::FieldMask { paths: vec!["name".into()] }),
            ..Default::default()
        })
        .await
        .unwrap();
    app.admin
        .revoke_key(pb::RevokeKeyRequest {
            merchant_id: MERCHANT.into(),
            key_id: key.id.clone(),
            reason: "lost laptop".into(),
        })
        .await
        .unwrap();
    let (rotated, rotated_plaintext) = create_sales_key(&mut app.admin, "rotated").await;
    let successor = app
        .admin
        .regenerate_key(pb::RegenerateKeyRequest {
            merchant_id: MERCHANT.into(),
            key_id: rotated.clone(),
            grace_period: Some(prost_types::Duration { seconds: 3_600, nanos: 0 }),
        })
        .await
        .unwrap()
        .into_inner();
    let successor = successor.api_key.unwrap();

    let events = listed_n(&app.admin, &[], 5).await;
    let kinds: Vec<(&str, &str)> = events.iter().map(|e| (e.r#type.as_str(), e.subject.as_str())).collect();
    assert_eq!(
        kinds,
        [
            ("key.created", key.id.as_str()),
            ("key.updated", key.id.as_str()),
            ("key.revoked", key.id.as_str()),
            ("key.created", rotated.as_str()),
            ("key.regenerated", rotated.as_str()),
        ],
        "each change once, in order"
    );
    for event in &events {
        assert_eq!(event.source, "keywarden");
        assert_eq!(uuid::Uuid::parse_str(&event.id).unwrap().get_version_num(), 7, "ids are UUIDv7");
        assert!(event.time.is_some());
        for field in ["merchant_id", "key_id", "key_name", "prefix", "actor"] {
            assert!(!data_text(event, field).is_empty(), "{} has {field}", event.r#type);
        }
        assert_eq!(data_text(event, "merchant_id"), MERCHANT);
        assert_eq!(data_text(event, "actor"), "admin");
    }
    assert_eq!(data_text(&events[1], "changed_fields"), "1 items");
    assert_eq!(data_text(&events[1], "key_name"), "front till");
    assert_eq!(data_text(&events[2], "reason"), "lost laptop");
    assert_eq!(data_text(&events[4], "successor_key_id"), successor.id);
    assert!(!data_text(&events[4], "grace_ends_at").is_empty());

    // The stored CloudEvents: structured JSON, and no secret in any of them.
    for seq in 1..=5 {
        let body: String =
            value(&app.database_url, &format!("SELECT body FROM key_events WHERE seq = {seq}")).await;
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["specversion"], "1.0");
        assert_eq!(json["datacontenttype"], "application/json");
        for secret in [&plaintext, &rotated_plaintext] {
            assert!(
                !body.contains(secret.as_str()) && !body.contains(&secret[16..]),
                "no plaintext in {body}"
            );
        }
        assert!(!body.contains("v1$"), "no key hash in {body}");
    }

    // Reads are merchant-scoped like every other; a bad filter is named.
    let (_, limited) =
        issue_operator(&mut app.admin, "other", pb::OperatorRole::Auditor, &[OTHER_MERCHANT]).await;
    let mut limited = admin_client(connect(app.addr).await, &limited);
    for merchant in [MERCHANT, ""] {
        let status = limited
            .list_events(pb::ListEventsRequest { merchant_id: merchant.into(), ..Default::default() })
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{merchant:?}");
    }
    let others = limited
        .list_events(pb::ListEventsRequest { merchant_id: OTHER_MERCHANT.into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert!(others.events.is_empty());
    let status = app
        .admin
        .list_events(pb::ListEventsRequest {
            merchant_id: MERCHANT.into(),
            types: vec!["key.deleted".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["types"]);
    let status = app
        .admin
        .list_events(pb::ListEventsRequest {
            merchant_id: MERCHANT.into(),
            after: "no-such-event".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["after"]);
    let only_revoked = listed(&mut app.admin, &["key.revoked"]).await;
    assert_eq!(only_revoked.len(), 1);
    // https:// only, unless the deployment allows http://.
    let mut strict = spawn_app_on(&app, |_| {}).await;
    let status = strict
        .admin
        .create_webhook_endpoint(pb::CreateWebhookEndpointRequest {
            url: "http://127.0.0.1:9/hook".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["url"]);
    strict.stop().await;
    app.stop().await;
}

async fn a_change_that_rolls_back_leaves_no_event_and_an_event_that_fails_undoes_the_change(
    backend: Backend,
) {
    let mut app = spawn_app_with(backend.clone(), eventful).await;
    let (key, _) = create_sales_key(&mut app.admin, "kept").await;
    let postgres = matches!(backend, Backend::Postgres(_));
    // A statement after the event's fails: the change and its event go.
    let fail_on = |table: &str, when: &str| {
        if postgres {
            format!(
                "CREATE OR REPLACE FUNCTION kw_fail() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION 'injected'; END $$ \
                 LANGUAGE plpgsql; CREATE TRIGGER kw_fail BEFORE INSERT ON {table} FOR EACH ROW WHEN ({when}) \
                 EXECUTE FUNCTION kw_fail()"
            )
        } else {
            format!(
                "CREATE TRIGGER kw_fail BEFORE INSERT ON {table} WHEN {when} BEGIN SELECT RAISE(ABORT, 'injected'); END"
            )
        }
    };
    let unfail = if postgres { "DROP TRIGGER kw_fail ON {table}" } else { "DROP TRIGGER kw_fail" };
    let revoke = |admin: &AdminClient| {
        let mut admin = admin.clone();
        let key = key.clone();
        async move {
            admin
                .revoke_key(pb::RevokeKeyRequest {
                    merchant_id: MERCHANT.into(),
                    key_id: key,
                    reason: String::new(),
                })
                .await
        }
    };
    let revoked_events =
        || scalar(&app.database_url, "SELECT COUNT(*) FROM key_events WHERE type = 'key.revoked'");
    let is_revoked = || async {
        let got = app
            .admin
            .clone()
            .get_key(pb::GetKeyRequest { merchant_id: MERCHANT.into(), key_id: key.clone() })
            .await;
        got.unwrap().into_inner().api_key.unwrap().revoked_at.is_some()
    };

    execute(&app.database_url, &fail_on("audit_events", "NEW.kind = 'KEY_REVOKED'")).await;
    assert!(revoke(&app.admin).await.is_err(), "the injected failure fails the call");
    assert!(!is_revoked().await, "the change rolled back");
    assert_eq!(revoked_events().await, 0, "and its event with it");
    execute(&app.database_url, &unfail.replace("{table}", "audit_events")).await;

    // The event's own insert fails: the change does not happen either.
    execute(&app.database_url, &fail_on("key_events", "NEW.type = 'key.revoked'")).await;
    assert!(revoke(&app.admin).await.is_err());
    assert!(!is_revoked().await, "no event, no change");
    execute(&app.database_url, &unfail.replace("{table}", "key_events")).await;

    revoke(&app.admin).await.unwrap();
    assert!(is_revoked().await);
    assert_eq!(revoked_events().await, 1);
    app.stop().await;
}

/// One request a receiver got.
#[derive(Debug, Clone)]
struct Hook {
    headers: HashMap<String, String>,
    body: String,
    at: Instant,
}

/// A webhook receiver: records every request and answers with the next
/// status of its script (200 once the script is done).
#[derive(Clone)]
struct Receiver {
    addr: SocketAddr,
    got: Arc<Mutex<Vec<Hook>>>,
    script: Arc<Mutex<VecDeque<u16>>>,
    /// How long each answer takes.
    delay: Arc<Mutex<Duration>>,
}

struct Running(Option<oneshot::Sender<()>>, tokio::task::JoinHandle<()>);

impl Running {
    async fn stop(mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
        let _ = self.1.await;
    }
}

impl Receiver {
    async fn start(script: &[u16]) -> (Self, Running) {
        let receiver = Self {
            addr: "127.0.0.1:0".parse().unwrap(),
            got: Arc::default(),
            script: Arc::new(Mutex::new(script.iter().copied().collect())),
            delay: Arc::default(),
        };
        receiver.serve_on("127.0.0.1:0".parse().unwrap()).await
    }

    /// Serves (again) on `addr`.
    async fn serve_on(mut self, addr: SocketAddr) -> (Self, Running) {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        self.addr = listener.local_addr().unwrap();
        let state = self.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: axum::http::HeaderMap, body: String| {
                let state = state.clone();
                async move {
                    let delay = *state.delay.lock().unwrap();
                    tokio::time::sleep(delay).await;
                    let headers = headers
                        .iter()
                        .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or_default().to_owned()))
                        .collect();
                    state.got.lock().unwrap().push(Hook { headers, body, at: Instant::now() });
                    let status = state.script.lock().unwrap().pop_front().unwrap_or(200);
                    axum::http::StatusCode::from_u16(status).unwrap()
                }
            }),
        );
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.await;
                })
                .await;
        });
        (self, Running(Some(tx), handle))
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    fn got(&self) -> Vec<Hook> {
        self.got.lock().unwrap().clone()
    }

    /// Requests for event `id`.
    fn times(&self, id: &str) -> usize {
        self.got().iter().filter(|h| h.headers.get("webhook-id").is_some_and(|i| i == id)).count()
    }
}

/// The consumer's side of Standard Webhooks, as docs/events.md shows it.
fn signature_is_valid(secret: &str, hook: &Hook) -> bool {
    let key = STANDARD.decode(secret.strip_prefix("whsec_").unwrap()).unwrap();
    let signed =
        format!("{}.{}.{}", hook.headers["webhook-id"], hook.headers["webhook-timestamp"], hook.body);
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
    mac.update(signed.as_bytes());
    let expected = format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()));
    hook.headers["webhook-signature"].split(' ').any(|s| s == expected)
}

async fn create_hook(admin: &mut AdminClient, url: &str, types: &[&str]) -> (String, String) {
    let created = admin
        .create_webhook_endpoint(pb::CreateWebhookEndpointRequest {
            url: url.into(),
            event_types: types.iter().map(|t| (*t).to_owned()).collect(),
            merchant_id: MERCHANT.into(),
        })
        .await
        .unwrap()
        .into_inner();
    (created.endpoint.unwrap().id, created.signing_secret)
}

async fn webhooks_are_signed_and_retried_with_growing_delays(backend: Backend) {
    let mut app = spawn_app_with(backend, eventful).await;
    let (receiver, running) = Receiver::start(&[500, 500]).await;
    let (endpoint, secret) = create_hook(&mut app.admin, &receiver.url(), &["key.created"]).await;
    assert!(secret.starts_with("whsec_") && STANDARD.decode(&secret[6..]).unwrap().len() == 32);
    let sealed: String = value(
        &app.database_url,
        &format!("SELECT sealed_secret FROM webhook_endpoints WHERE id = '{endpoint}'"),
    )
    .await;
    assert_ne!(sealed, secret[6..], "the database holds the secret sealed");
    let (key, _) = create_sales_key(&mut app.admin, "hooked").await;
    let event = listed_n(&app.admin, &["key.created"], 1).await.remove(0);

    let hooks = until("three attempts at the receiver", || async {
        Some(receiver.got()).filter(|g| g.iter().filter(|h| h.headers["webhook-id"] == event.id).count() >= 3)
    })
    .await;
    assert_eq!(hooks.len(), 3, "delivered on the third attempt, then not again");
    for hook in &hooks {
        assert!(signature_is_valid(&secret, hook), "signed with the endpoint's secret: {:?}", hook.headers);
        let body: serde_json::Value = serde_json::from_str(&hook.body).unwrap();
        assert_eq!(
            (body["id"].as_str(), body["subject"].as_str()),
            (Some(event.id.as_str()), Some(key.as_str()))
        );
        assert_eq!(hook.headers["content-type"], "application/json");
    }
    let forged = Hook { body: hooks[0].body.replace("hooked", "forged"), ..hooks[0].clone() };
    assert!(!signature_is_valid(&secret, &forged), "a changed body fails the check");
    let (first, second) = (hooks[1].at - hooks[0].at, hooks[2].at - hooks[1].at);
    assert!(first >= Duration::from_millis(900), "first retry after about a second: {first:?}");
    assert!(second >= Duration::from_millis(1_900) && second > first, "then longer: {first:?}, {second:?}");

    let deliveries = until("the delivery recorded", || {
        let mut admin = app.admin.clone();
        let endpoint = endpoint.clone();
        async move {
            let page = admin
                .list_webhook_deliveries(pb::ListWebhookDeliveriesRequest {
                    endpoint_id: endpoint,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            Some(page.deliveries).filter(|d| d.first().is_some_and(|d| d.state == "delivered"))
        }
    })
    .await;
    assert_eq!(deliveries.len(), 1, "only the type the endpoint asked for");
    let d = &deliveries[0];
    assert_eq!((d.event_id.as_str(), d.attempts, d.last_http_status), (event.id.as_str(), 3, 200));
    assert!(d.next_attempt_time.is_none());

    // Redelivery on request, signed again; other callers may not manage hooks.
    app.admin
        .redeliver_event(pb::RedeliverEventRequest {
            endpoint_id: endpoint.clone(),
            event_id: event.id.clone(),
        })
        .await
        .unwrap();
    until("the redelivery", || async { Some(()).filter(|()| receiver.times(&event.id) == 4) }).await;
    let (_, manager) = issue_operator(&mut app.admin, "mgr", pb::OperatorRole::KeyManager, &[]).await;
    let mut manager = admin_client(connect(app.addr).await, &manager);
    let status = manager.list_webhook_endpoints(pb::ListWebhookEndpointsRequest {}).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    let listed =
        app.admin.list_webhook_endpoints(pb::ListWebhookEndpointsRequest {}).await.unwrap().into_inner();
    assert_eq!(listed.endpoints.len(), 1);
    app.admin
        .delete_webhook_endpoint(pb::DeleteWebhookEndpointRequest { id: endpoint.clone() })
        .await
        .unwrap();
    let status = app
        .admin
        .delete_webhook_endpoint(pb::DeleteWebhookEndpointRequest { id: endpoint })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
    running.stop().await;
    app.stop().await;
}

/// JetStream as a consumer sees it: the stream, and where it ends now.
async fn jetstream(url: &str) -> (async_nats::jetstream::Context, u64) {
    let client = async_nats::connect(url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut stream = js
        .get_or_create_stream(async_nats::jetstream::stream::Config {
            name: "KEYWARDEN_EVENTS".into(),
            subjects: vec!["keywarden.events.>".into()],
            duplicate_window: Duration::from_secs(600),
            ..Default::default()
        })
        .await
        .unwrap();
    let last = stream.info().await.unwrap().state.last_sequence;
    (js, last + 1)
}

/// Every message from `start` on: subject, `Nats-Msg-Id`, CloudEvent.
async fn messages_since(
    js: &async_nats::jetstream::Context,
    start: u64,
) -> Vec<(String, String, serde_json::Value)> {
    use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
    use tokio_stream::StreamExt as _;
    let stream = js.get_stream("KEYWARDEN_EVENTS").await.unwrap();
    let consumer = stream
        .create_consumer(pull::Config {
            deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: start },
            ack_policy: AckPolicy::None,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut batch =
        consumer.fetch().max_messages(10_000).expires(Duration::from_millis(500)).messages().await.unwrap();
    let mut found = Vec::new();
    while let Some(message) = batch.next().await {
        let message = message.unwrap();
        let id = message
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Msg-Id"))
            .map(|v| v.to_string())
            .unwrap_or_default();
        found.push((message.subject.to_string(), id, serde_json::from_slice(&message.payload).unwrap()));
    }
    found
}

async fn jetstream_gets_a_keys_events_in_order_and_drops_a_replayed_one(backend: Backend) {
    let (js, start) = jetstream(&nats_url()).await;
    let mut app = spawn_app_with(backend, |s| {
        eventful(s);
        s.events_nats_url = Some(nats_url());
    })
    .await;
    let (key, _) = create_sales_key(&mut app.admin, "streamed").await;
    revoke(&mut app.admin, &key).await;
    let ours = |found: Vec<(String, String, serde_json::Value)>| -> Vec<(String, String, serde_json::Value)> {
        found.into_iter().filter(|(_, _, event)| event["subject"] == key.as_str()).collect()
    };
    let got = until("both events in JetStream", || async {
        Some(ours(messages_since(&js, start).await)).filter(|m| m.len() >= 2)
    })
    .await;
    let subjects: Vec<&str> = got.iter().map(|(s, _, _)| s.as_str()).collect();
    assert_eq!(subjects, ["keywarden.events.key.created", "keywarden.events.key.revoked"], "in order");
    for (_, id, event) in &got {
        assert_eq!(event["id"].as_str(), Some(id.as_str()), "Nats-Msg-Id is the event id");
        assert_eq!(event["specversion"], "1.0");
    }

    // A replica that published and died before recording it: its successor
    // publishes again, and JetStream keeps one copy.
    let delivered = || {
        scalar(
            &app.database_url,
            "SELECT COUNT(*) FROM event_deliveries WHERE sink = 'nats' AND state = 'delivered'",
        )
    };
    until("both recorded", || async { (delivered().await == 2).then_some(()) }).await;
    execute(
        &app.database_url,
        "UPDATE event_deliveries SET state = 'pending', attempts = 0 WHERE sink = 'nats'",
    )
    .await;
    until("the replay recorded", || async {
        let replayed = scalar(&app.database_url, "SELECT COUNT(*) FROM event_deliveries WHERE sink = 'nats' AND attempts = 1 AND state = 'delivered'").await;
        (replayed == 2).then_some(())
    })
    .await;
    let again = ours(messages_since(&js, start).await);
    assert_eq!(again.len(), 2, "no second copy: {again:?}");
    app.stop().await;
}

async fn a_key_is_reminded_once_expires_once_and_a_new_expiry_rearms_it(backend: Backend) {
    let mut app = spawn_app_with(backend, |s| {
        eventful(s);
        s.expiry_reminder_leads = vec!["10s".into()];
        s.expiry_scan_interval_ms = 500;
    })
    .await;
    let expiring = app
        .admin
        .create_key(pb::CreateKeyRequest {
            merchant_id: MERCHANT.into(),
            name: "short-lived".into(),
            scopes: vec!["sales:read".into()],
            expires_at: Some(timestamp_in(Duration::from_secs(20))),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let (key, plaintext) = (expiring.api_key.unwrap().id, expiring.plaintext_key);
    app.verify.verify(sales(&plaintext)).await.unwrap();
    // A rotation with a short grace: its end is an occasion too.
    let (rotated, _) = create_sales_key(&mut app.admin, "rotated").await;
    app.admin
        .regenerate_key(pb::RegenerateKeyRequest {
            merchant_id: MERCHANT.into(),
            key_id: rotated.clone(),
            grace_period: Some(prost_types::Duration { seconds: 2, nanos: 0 }),
        })
        .await
        .unwrap();
    let ended = listed_n(&app.admin, &["key.grace_ended"], 1).await;
    assert_eq!(ended[0].subject, rotated);
    assert!(!data_text(&ended[0], "successor_key_id").is_empty());
    assert_eq!(data_text(&ended[0], "actor"), "keywarden");

    let reminded = listed_n(&app.admin, &["key.expiring"], 1).await;
    assert_eq!(reminded[0].subject, key);
    assert_eq!(data_text(&reminded[0], "lead"), "10s");
    assert!(!data_text(&reminded[0], "expires_at").is_empty());
    assert_eq!(data_text(&reminded[0], "actor"), "keywarden");
    for field in ["last_used_at", "request_count"] {
        data_text(&reminded[0], field);
    }
    let expired = listed_n(&app.admin, &["key.expired"], 1).await;
    assert_eq!(expired[0].subject, key);
    // Several more scans write nothing new.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let reader = app.admin.clone();
    let once = |types: &[&str]| {
        let mut admin = reader.clone();
        let types: Vec<String> = types.iter().map(|t| (*t).to_owned()).collect();
        async move {
            let types: Vec<&str> = types.iter().map(String::as_str).collect();
            listed(&mut admin, &types).await.len()
        }
    };
    assert_eq!(
        (once(&["key.expiring"]).await, once(&["key.expired"]).await, once(&["key.grace_ended"]).await),
        (1, 1, 1)
    );

    // A new expiry re-arms both.
    app.admin
        .update_key(pb::UpdateKeyRequest {
            merchant_id: MERCHANT.into(),
            key_id: key.clone(),
            expires_at: Some(timestamp_in(Duration::from_secs(14))),
            update_mask: Some(prost_types::FieldMask { paths: vec!["expires_at".into()] }),
            ..Default::default()
        })
        .await
        .unwrap();
    listed_n(&app.admin, &["key.expiring"], 2).await;
    let expired = listed_n(&app.admin, &["key.expired"], 2).await;
    assert_ne!(data_text(&expired[0], "expires_at"), data_text(&expired[1], "expires_at"));
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!((once(&["key.expiring"]).await, once(&["key.expired"]).await), (2, 2));
    app.stop().await;
}

/// A nats-server of the test's own, with JetStream, that can be stopped and
/// started again on the same port and store.
struct OwnNats {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<std::process::Child>,
}

impl OwnNats {
    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut nats = Self { port, dir: tempfile::tempdir().unwrap(), child: None };
        nats.resume();
        nats
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn resume(&mut self) {
        let binary = ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .unwrap_or("nats-server");
        let child = std::process::Command::new(binary)
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string(), "-js", "-sd"])
            .arg(self.dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nats-server (Debian's nats-server package)");
        self.child = Some(child);
        let addr: SocketAddr = format!("127.0.0.1:{}", self.port).parse().unwrap();
        let deadline = Instant::now() + PATIENCE;
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn pause(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for OwnNats {
    fn drop(&mut self) {
        self.pause();
    }
}

async fn events_written_during_nats_and_receiver_outages_are_all_delivered() {
    let mut nats = OwnNats::start();
    let (receiver, running) = Receiver::start(&[]).await;
    let nats_url = nats.url();
    let mut app = spawn_app_with(Backend::Sqlite, |s| {
        eventful(s);
        s.events_nats_url = Some(nats_url);
        s.metrics_enabled = true;
    })
    .await;
    let (_endpoint, _) = create_hook(&mut app.admin, &receiver.url(), &[]).await;
    let (first, _) = create_sales_key(&mut app.admin, "before").await;
    until("the first event at the receiver", || async { (receiver.got().len() == 1).then_some(()) }).await;

    // Both sinks go away; changes go on.
    nats.pause();
    let addr = receiver.addr;
    running.stop().await;
    let mut keys = vec![first];
    for i in 0..4 {
        keys.push(create_sales_key(&mut app.admin, &format!("during-{i}")).await.0);
    }
    revoke(&mut app.admin, &keys[1]).await;
    let pending =
        || scalar(&app.database_url, "SELECT COUNT(*) FROM event_deliveries WHERE state = 'pending'");
    until("deliveries waiting on both sinks", || async { (pending().await >= 10).then_some(()) }).await;
    let metrics = app.probes.clone();
    let _ = metrics;
    tokio::time::sleep(Duration::from_secs(2)).await;

    // They come back: everything written meanwhile goes out.
    nats.resume();
    let (receiver, running) = receiver.serve_on(addr).await;
    until("nothing pending", || async { (pending().await == 0).then_some(()) }).await;
    let events = listed(&mut app.admin, &[]).await;
    assert_eq!(events.len(), 6);
    for event in &events {
        assert!(receiver.times(&event.id) >= 1, "{} reached the receiver", event.r#type);
    }
    let (js, _) = jetstream(&nats.url()).await;
    let streamed: Vec<String> = messages_since(&js, 1).await.into_iter().map(|(_, id, _)| id).collect();
    let ids: Vec<String> = events.iter().map(|e| e.id.clone()).collect();
    assert_eq!(streamed, ids, "JetStream has every event once, in order");
    running.stop().await;
    app.stop().await;
}

async fn three_replicas_deliver_each_event_once_and_a_killed_deliverer_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let (database_url, guard) = fresh_database(&Backend::postgres(), dir.path()).await;
    let (receiver, running) = Receiver::start(&[]).await;
    let env = [
        ("KEYWARDEN_EVENTS_POLL_INTERVAL_MS", "50"),
        ("KEYWARDEN_EVENTS_LEASE_MS", "2000"),
        ("KEYWARDEN_WEBHOOK_TIMEOUT_MS", "500"),
        ("KEYWARDEN_WEBHOOK_ALLOW_HTTP", "true"),
    ];
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut replicas: Vec<Option<Replica>> =
        dirs.iter().map(|d| Some(spawn_binary(&database_url, d.path(), &env))).collect();
    let mut admins = Vec::new();
    for r in replicas.iter().flatten() {
        admins.push(admin_client(connect(r.addr).await, ADMIN_TOKEN));
    }
    create_hook(&mut admins[0], &receiver.url(), &["key.created"]).await;
    for i in 0..30 {
        create_sales_key(&mut admins[i % 3], &format!("k{i}")).await;
    }
    let events = listed_n(&admins[1], &["key.created"], 30).await;
    until("30 deliveries", || async { (receiver.got().len() >= 30).then_some(()) }).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for event in &events {
        assert_eq!(receiver.times(&event.id), 1, "delivered once by one replica");
    }

    // The deliverer dies in the middle of a batch.
    let leader = until("one replica leading", || async {
        for (i, r) in replicas.iter().enumerate() {
            let r = r.as_ref()?;
            let metrics = metrics_of(r.metrics?).await;
            if metrics.get("keywarden_events_relay_leading").copied() == Some(1.0) {
                return Some(i);
            }
        }
        None
    })
    .await;
    *receiver.delay.lock().unwrap() = Duration::from_millis(100);
    let survivor = (leader + 1) % 3;
    for i in 0..20 {
        create_sales_key(&mut admins[survivor], &format!("late{i}")).await;
    }
    until("a few of the late events delivered", || async { (receiver.got().len() >= 33).then_some(()) })
        .await;
    replicas[leader].take().unwrap().kill();
    let killed_at = Instant::now();
    let before = receiver.got().len();
    until("another replica delivering", || async { (receiver.got().len() > before + 1).then_some(()) }).await;
    let takeover = killed_at.elapsed();
    // The bound: the lease (2 s) plus a poll, with room for a busy machine.
    assert!(takeover < Duration::from_secs(5), "took over after {takeover:?}");
    let events = listed_n(&admins[survivor], &["key.created"], 50).await;
    until("all 50 delivered", || async { events.iter().all(|e| receiver.times(&e.id) >= 1).then_some(()) })
        .await;
    // At least once: only what the deliverer sent after it last wrote its
    // deliveries down (at most 200 ms of them, two at this receiver's
    // pace) and the one in flight can come twice.
    let twice = events.iter().filter(|e| receiver.times(&e.id) > 1).count();
    eprintln!("takeover after {takeover:?}; {twice} events delivered twice");
    assert!(twice <= 3, "{twice} events delivered twice");
    running.stop().await;
    for r in replicas.into_iter().flatten() {
        r.kill();
    }
    drop_database(guard).await;
}
