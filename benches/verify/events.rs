//! Lifecycle events: CreateKey's latency with its event written in the
//! transaction, and how long 10,000 events take to reach NATS JetStream
//! and a local webhook receiver, on a server and database of their own.

use super::*;

/// What the events area measured.
pub(super) struct EventRun {
    /// CreateKey round trips, one at a time, in milliseconds.
    pub(super) create_ms: Vec<f64>,
    pub(super) events: usize,
    /// Seconds from the first write until all were committed.
    pub(super) written_s: f64,
    /// Seconds from the first write until the sink had every event.
    pub(super) nats_s: Option<f64>,
    pub(super) webhook_s: f64,
}

/// A webhook receiver that counts what it gets and answers 204.
async fn receiver() -> (SocketAddr, Arc<AtomicUsize>) {
    let got = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&got);
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |_: String| {
            let counted = Arc::clone(&counted);
            async move {
                counted.fetch_add(1, Ordering::Relaxed);
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, got)
}

fn authorized<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

/// `n` CreateKey calls one at a time: their round trips in milliseconds,
/// and the keys' ids.
pub(super) async fn create_key_ms(channel: &Channel, token: &str, n: usize) -> (Vec<f64>, Vec<String>) {
    let mut admin = KeyAdminClient::new(channel.clone());
    let (mut ms, mut ids) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 0..n {
        let request = pb::CreateKeyRequest {
            merchant_id: MERCHANT.into(),
            name: format!("evented {i}"),
            scopes: vec!["sales:read".into()],
            ..Default::default()
        };
        let start = Instant::now();
        let created = admin.create_key(authorized(request, token)).await.unwrap().into_inner();
        ms.push(start.elapsed().as_secs_f64() * 1000.0);
        ids.push(created.api_key.unwrap().id);
    }
    (ms, ids)
}

/// `--create-keys N --target ADDR`: CreateKey's p50 and p90 on a running
/// server (to compare two builds back to back).
pub(super) async fn create_keys_only(addr: SocketAddr, token: &str, n: usize) {
    let channel = Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let (mut ms, _) = create_key_ms(&channel, token, n).await;
    ms.sort_by(f64::total_cmp);
    println!("CreateKey on {addr}: p50 {:.2} ms, p90 {:.2} ms over {n} calls", ms[n / 2], ms[n * 9 / 10]);
}

/// `n` events (key.updated, eight writers) through a fresh SQLite server
/// with both sinks; CreateKey is timed on the same server first.
pub(super) async fn events_run(
    runtime: &tokio::runtime::Handle,
    dir: &std::path::Path,
    hash_workers: usize,
    nats: Option<&str>,
    n: usize,
) -> EventRun {
    let (hook, got) = receiver().await;
    let url = format!("sqlite://{}?mode=rwc", dir.join("events.db").display());
    let mut settings = bench_settings(&url, dir, true, hash_workers);
    settings.webhook_allow_http = true;
    settings.events_nats_url = nats.map(str::to_owned);
    let server = start_server_from(runtime, settings).await;
    let channel = Channel::from_shared(format!("http://{}", server.addr)).unwrap().connect().await.unwrap();
    let mut admin = KeyAdminClient::new(channel.clone());
    admin
        .create_webhook_endpoint(authorized(
            pb::CreateWebhookEndpointRequest { url: format!("http://{hook}/hook"), ..Default::default() },
            TOKEN,
        ))
        .await
        .unwrap();
    let (create_ms, ids) = create_key_ms(&channel, TOKEN, 50).await;
    let store = server.probes.as_ref().map(|p| p.store.clone()).unwrap();
    let drained = |store: keywarden::store::Store| async move {
        store.event_backlog().await.map(|b| b.iter().all(|s| s.pending == 0)).unwrap_or(false)
    };
    while !drained(store.clone()).await {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = got.load(Ordering::Relaxed);

    let start = Instant::now();
    let ids = Arc::new(ids);
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let mut admin = KeyAdminClient::new(channel.clone());
            let ids = Arc::clone(&ids);
            tokio::spawn(async move {
                for i in (w..n).step_by(8) {
                    let request = pb::UpdateKeyRequest {
                        merchant_id: MERCHANT.into(),
                        key_id: ids[i % ids.len()].clone(),
                        name: format!("renamed {i}"),
                        update_mask: Some(prost_types::FieldMask { paths: vec!["name".into()] }),
                        ..Default::default()
                    };
                    admin.update_key(authorized(request, TOKEN)).await.unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    let written_s = start.elapsed().as_secs_f64();
    let (mut nats_s, mut webhook_s) = (None, None);
    let deadline = Instant::now() + Duration::from_secs(600);
    while (nats.is_some() && nats_s.is_none()) || webhook_s.is_none() {
        assert!(Instant::now() < deadline, "10,000 events not delivered within 10 minutes");
        if webhook_s.is_none() && got.load(Ordering::Relaxed) >= before + n {
            webhook_s = Some(start.elapsed().as_secs_f64());
        }
        if nats.is_some() && nats_s.is_none() {
            let backlog = store.event_backlog().await.unwrap_or_default();
            if backlog.iter().filter(|b| b.sink == "nats" || b.sink == "unplaced").all(|b| b.pending == 0) {
                nats_s = Some(start.elapsed().as_secs_f64());
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    EventRun { create_ms, events: n, written_s, nats_s, webhook_s: webhook_s.unwrap_or_default() }
}

impl EventRun {
    pub(super) fn print_targets(&self, hash_seconds: f64) {
        let mut sorted = self.create_ms.clone();
        sorted.sort_by(f64::total_cmp);
        let p50 = sorted[sorted.len() / 2];
        println!(
            "| events: CreateKey p50 with its event in the transaction (one scrypt on one core is {:.1} ms) | {p50:.1} ms over {} calls | - |",
            hash_seconds * 1000.0,
            sorted.len()
        );
        let bound = 30.0;
        let rate = |s: f64| self.events as f64 / s;
        if let Some(s) = self.nats_s {
            println!(
                "| events: {} to NATS JetStream within {bound:.0} s of the first write | {s:.1} s ({:.0}/s; writing them took {:.1} s) | {} |",
                self.events,
                rate(s),
                self.written_s,
                verdict(s <= bound)
            );
        }
        println!(
            "| events: {} to a local webhook receiver within {bound:.0} s of the first write | {:.1} s ({:.0}/s; writing them took {:.1} s) | {} |",
            self.events,
            self.webhook_s,
            rate(self.webhook_s),
            self.written_s,
            verdict(self.webhook_s <= bound)
        );
    }
}

/// Whether something listens at a `nats://host:port` URL.
pub(super) fn nats_answers(url: &str) -> bool {
    let addr = url.trim_start_matches("nats://").trim_start_matches("tls://");
    addr.parse::<SocketAddr>()
        .ok()
        .is_some_and(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(1)).is_ok())
}
