//! The verification cache through the real server: scrypt runs once per key,
//! changes still take effect on the next call, wrong keys stay cheap, and cold
//! work is bounded. Counts come from the server's own counters.

use crate::helpers::{
    Backend, MERCHANT, Proxy, TestApp, allowed, deny, eventually, outcome, spawn_app, spawn_app_with, until,
    wrong_secret,
};
use keywarden::{
    api::pb::{self, DenyReason as R},
    config::Settings,
    keys::{KeyPrefix, PlainKey},
};
use tonic::Code;

backend_tests!(
    only_the_first_verify_of_a_key_runs_scrypt,
    revocation_is_obeyed_on_the_next_call_despite_the_cache,
    expiry_is_checked_against_the_clock_while_cached,
    concurrent_cold_calls_for_one_key_share_one_scrypt,
    a_storm_of_one_wrong_key_costs_one_scrypt,
    unknown_prefixes_never_reach_scrypt,
    a_full_scrypt_queue_answers_resource_exhausted_while_warm_keys_still_verify,
    one_audit_batch_and_one_usage_flush_for_a_thousand_verifies_cost_at_most_ten_statements,
    at_the_default_settings_warm_verifies_cost_statements_per_window_not_per_call,
    the_negative_cache_stays_bounded,
);

async fn only_the_first_verify_of_a_key_runs_scrypt(backend: Backend) {
    let mut app = spawn_app(backend).await;
    let (_, key) = app.key_with_scopes(&["sales:read"]).await;
    let before = app.probes.pool.runs();
    for _ in 0..20 {
        assert_eq!(outcome(&app.verify(&key, "", "sales:read").await), allowed());
    }
    assert_eq!(app.probes.pool.runs() - before, 1);
    app.stop().await;
}

async fn revocation_is_obeyed_on_the_next_call_despite_the_cache(backend: Backend) {
    let mut app = spawn_app(backend).await;
    let (api_key, key) = app.key_with_scopes(&["sales:read"]).await;
    for _ in 0..3 {
        assert_eq!(outcome(&app.verify(&key, "", "sales:read").await), allowed());
    }
    let cache = app.probes.cache.clone().unwrap();
    assert!(cache.state(&api_key.id).is_some(), "the key's state is cached");
    crate::helpers::revoke(&mut app.admin, &api_key.id).await;
    let runs = app.probes.pool.runs();
    assert_eq!(outcome(&app.verify(&key, "", "sales:read").await), deny(R::Revoked));
    assert_eq!(outcome(&app.verify(&key, "", "sales:read").await), deny(R::Revoked));
    assert_eq!(app.probes.pool.runs(), runs, "denying a revoked key needs no scrypt");
    app.stop().await;
}

async fn expiry_is_checked_against_the_clock_while_cached(backend: Backend) {
    let mut app = spawn_app(backend).await;
    let (api_key, key) = app.key_with_scopes(&["sales:read"]).await;
    // Identified first (its one scrypt), so what follows is cached work only.
    assert_eq!(outcome(&app.verify(&key, "", "").await), allowed());
    // Far enough ahead that the update and one call fit before it on a
    // loaded machine.
    let expires = chrono::Utc::now() + chrono::Duration::seconds(2);
    let cache = std::sync::Arc::clone(app.probes.cache.as_ref().unwrap());
    let invalidations = || cache.counters.invalidations.load(std::sync::atomic::Ordering::SeqCst);
    let before = invalidations();
    app.admin
        .update_key(pb::UpdateKeyRequest {
            merchant_id: MERCHANT.into(),
            key_id: api_key.id.clone(),
            expires_at: Some(prost_types::Timestamp {
                seconds: expires.timestamp(),
                nanos: expires.timestamp_subsec_nanos() as i32,
            }),
            update_mask: Some(prost_types::FieldMask { paths: vec!["expires_at".into()] }),
            ..Default::default()
        })
        .await
        .unwrap();
    // The change is forgotten here at once, and on PostgreSQL again when
    // its notice comes back through LISTEN; a notice landing after the
    // next call would drop the state that call cached.
    let forgets = if app.probes.store.backend() == keywarden::store::Backend::Postgres { 2 } else { 1 };
    until("the change and its notice to reach the cache", || {
        let done = invalidations() - before >= forgets;
        async move { done.then_some(()) }
    })
    .await;
    assert_eq!(outcome(&app.verify(&key, "", "").await), allowed(), "not expired yet");
    assert!(app.probes.cache.as_ref().unwrap().state(&api_key.id).is_some());
    let (runs, reads) = (app.probes.pool.runs(), app.probes.store.reads());
    let verify = app.verify.clone();
    let after_expiry = until("the cached key to expire", || {
        let (mut client, key) = (verify.clone(), key.clone());
        async move {
            let r =
                client.verify(pb::VerifyRequest { key, ..Default::default() }).await.unwrap().into_inner();
            Some(outcome(&r)).filter(|o| *o != allowed())
        }
    })
    .await;
    // Expiry is judged on the database's clock, which a replica estimates
    // to within half the round trip of its quickest recent reading.
    let uncertainty = app.probes.clock.uncertainty();
    assert!(
        chrono::Utc::now() + chrono::Duration::milliseconds(50) + uncertainty >= expires,
        "judged expired {} ms early, beyond the clock's uncertainty of {} ms",
        (expires - chrono::Utc::now()).num_milliseconds(),
        uncertainty.num_milliseconds()
    );
    assert_eq!(after_expiry, deny(R::Expired));
    assert_eq!(app.probes.pool.runs(), runs, "no scrypt: decided from the cached state");
    assert_eq!(app.probes.store.reads(), reads, "no read: decided from the cached state");
    app.stop().await;
}

async fn concurrent_cold_calls_for_one_key_share_one_scrypt(backend: Backend) {
    let mut app = spawn_app(backend).await;
    let (_, key) = app.key_with_scopes(&["sales:read"]).await;
    let counters = &app.probes.cache.as_ref().unwrap().counters;
    let misses = || counters.identity_misses.load(std::sync::atomic::Ordering::SeqCst);
    let (runs, misses_before) = (app.probes.pool.runs(), misses());
    let mut calls = Vec::new();
    for _ in 0..100 {
        let mut client = app.verify.clone();
        let key = key.clone();
        calls.push(tokio::spawn(async move {
            client.verify(pb::VerifyRequest { key, ..Default::default() }).await.unwrap().into_inner()
        }));
    }
    for call in calls {
        assert_eq!(outcome(&call.await.unwrap()), allowed());
    }
    assert_eq!(app.probes.pool.runs() - runs, 1, "100 concurrent cold calls, one scrypt");
    // Calls that found no identity cached. Run one after another, only the
    // first would miss; more than one missed, so they overlapped the scrypt
    // and waited for its answer instead of running their own.
    let missed = misses() - misses_before;
    assert!(missed > 1, "only {missed} call missed the cache: the calls did not overlap");
    app.stop().await;
}

async fn a_storm_of_one_wrong_key_costs_one_scrypt(backend: Backend) {
    let mut app = spawn_app(backend).await;
    let (_, key) = app.key_with_scopes(&["sales:read"]).await;
    let wrong = wrong_secret(&key, 1);
    let runs = app.probes.pool.runs();
    for _ in 0..50 {
        assert_eq!(outcome(&app.verify(&wrong, "", "").await), deny(R::NotFound));
    }
    assert_eq!(app.probes.pool.runs() - runs, 1);
    assert_eq!(outcome(&app.verify(&key, "", "").await), allowed(), "the right key is unaffected");
    app.stop().await;
}

async fn unknown_prefixes_never_reach_scrypt(backend: Backend) {
    let mut app = spawn_app(backend).await;
    let unknown = PlainKey::generate(&KeyPrefix::default()).unwrap();
    let (runs, reads) = (app.probes.pool.runs(), app.probes.store.reads());
    for _ in 0..50 {
        assert_eq!(outcome(&app.verify(unknown.expose(), "", "").await), deny(R::NotFound));
    }
    assert_eq!(app.probes.pool.runs(), runs);
    // Reads, not all statements: audit inserts and housekeeping run beside.
    assert_eq!(app.probes.store.reads() - reads, 1, "one lookup, then the negative cache");
    app.stop().await;
}

async fn a_full_scrypt_queue_answers_resource_exhausted_while_warm_keys_still_verify(backend: Backend) {
    let mut app = spawn_app_with(backend, |s| {
        s.hash_workers = 1;
        s.hash_queue = 1;
    })
    .await;
    let (_, warm) = app.key_with_scopes(&["sales:read"]).await;
    assert_eq!(outcome(&app.verify(&warm, "", "").await), allowed());
    // Distinct wrong secrets: no single flight, no negative cache, all cold.
    let mut cold = Vec::new();
    for i in 0..12 {
        let mut client = app.verify.clone();
        let key = wrong_secret(&warm, i + 100);
        cold.push(tokio::spawn(async move {
            client.verify(pb::VerifyRequest { key, ..Default::default() }).await
        }));
    }
    eventually("a cold call to wait for the busy scrypt thread", || {
        (app.probes.pool.queued() > 0).then_some(())
    })
    .await;
    let warm_during = app.verify(&warm, "", "").await;
    let cold_still_running = cold.iter().filter(|c| !c.is_finished()).count();
    let mut exhausted = 0;
    let mut denied = 0;
    for call in cold {
        match call.await.unwrap() {
            Ok(r) => {
                assert_eq!(outcome(&r.into_inner()), deny(R::NotFound));
                denied += 1;
            }
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                exhausted += 1;
            }
        }
    }
    assert_eq!(outcome(&warm_during), allowed());
    assert!(cold_still_running > 0, "the warm call finished while cold work was queued");
    assert!(exhausted > 0, "a one-slot queue must refuse some of 12 cold calls");
    assert!(denied >= 1);
    app.stop().await;
}

/// The app, and on PostgreSQL a proxy in front of its database that reads
/// every statement the app sends (in the clear, so that it can).
async fn spawn_counted(backend: Backend, customise: impl FnOnce(&mut Settings)) -> (TestApp, Option<Proxy>) {
    let proxy = match &backend {
        Backend::Postgres(server) => Some(Proxy::start(Proxy::upstream_of(server)).await),
        Backend::Sqlite => None,
    };
    let app = spawn_app_with(backend, |s| {
        if let Some(proxy) = &proxy {
            s.database_url =
                s.database_url.as_deref().map(|url| format!("{}?sslmode=disable", proxy.url_for(url)));
        }
        customise(s);
    })
    .await;
    (app, proxy)
}

/// The store's count of statements is every statement the replica sent,
/// as seen on the wire since `from` (PostgreSQL; SQLite has no wire),
/// leaving out only what keeps the replica alive whatever the load: the
/// health monitor's pings (reading the database's clock), the change
/// feed's heartbeats, LISTEN and UNLISTEN, and the event relay's and
/// expiry scan's polling (counted apart).
fn same_as_on_the_wire(counted: u64, wire: Option<&Proxy>, from: usize) {
    let Some(wire) = wire else { return };
    let upkeep = |sql: &str| {
        sql.starts_with("SELECT to_char(clock_timestamp()")
            || sql.contains("pg_notify")
            || sql.starts_with("LISTEN")
            || sql.starts_with("UNLISTEN")
            || ["event_leases", "key_events", "event_deliveries", "webhook_endpoints"]
                .iter()
                .any(|t| sql.contains(t))
            || (sql.contains("FROM \"api_keys\"") && sql.contains("\"expires_at\" >"))
            || (sql.contains("FROM \"api_keys\"") && sql.contains("\"revoked_at\" >"))
    };
    let sent: Vec<String> = wire.statements()[from..].iter().filter(|s| !upkeep(s)).cloned().collect();
    assert_eq!(counted, sent.len() as u64, "counted by the store against sent on the wire: {sent:#?}");
}

async fn one_audit_batch_and_one_usage_flush_for_a_thousand_verifies_cost_at_most_ten_statements(
    backend: Backend,
) {
    // The 1000 calls' rows must land in one audit batch and their uses in
    // one usage flush, however slowly a loaded CI machine runs them: with
    // time windows (1 s, as this test once had) the count was the number of
    // windows the burst straddled × ~7, 14 on a slow run. So the batch is
    // sized to the calls (5 warm-up rows + 1000) and written as soon as it
    // is full, and usage is flushed by the shutdown alone.
    let (mut app, wire) = spawn_counted(backend, |s| {
        s.usage_flush_interval_ms = 600_000;
        s.audit_linger_ms = 600_000;
        s.audit_batch_size = 1005;
    })
    .await;
    let keys = warm_keys(&mut app, 5).await;
    let store = app.probes.store.clone();
    let (before, reads_before) = (store.statements(), store.reads());
    let on_wire = wire.as_ref().map_or(0, |w| w.statements().len());
    let mut tasks = Vec::new();
    for t in 0..4 {
        let mut client = app.verify.clone();
        let keys = keys.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..250 {
                let key = keys[(t + i) % keys.len()].clone();
                let r = client
                    .verify(pb::VerifyRequest { key, ..Default::default() })
                    .await
                    .unwrap()
                    .into_inner();
                assert_eq!(r.decision, pb::Decision::Allow as i32);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(store.reads() - reads_before, 0, "warm verifies read nothing");
    let audit = app.probes.audit.clone();
    eventually("the batch of 1005 rows to be written", || (audit.written() >= 1005).then_some(())).await;
    assert_eq!(audit.written(), 1005, "the full batch is written without waiting for its window");
    // Shutdown writes the usage counts: the one flush the calls cost.
    app.stop().await;
    let spent = store.statements() - before;
    same_as_on_the_wire(spent, wire.as_ref(), on_wire);
    assert!(
        spent <= 10,
        "{spent} statements for 1000 warm verifies (audit inserts and usage flushes included)"
    );
}

/// The budget at the shipped settings (50 ms audit linger, 16,000-row
/// batches, usage flushed each second), with the health monitor pinging the
/// database every 10 ms: pings are not statements a call costs, so the
/// counter leaves them out by design. What warm verifies cost is bounded by
/// the time they take (a batch per linger window, a flush per interval),
/// not by their number; at saturation that is the benchmark's figure per
/// 1000 (BENCHMARKS.md).
async fn at_the_default_settings_warm_verifies_cost_statements_per_window_not_per_call(backend: Backend) {
    let defaults = keywarden::config::Settings::default();
    let (mut app, wire) = spawn_counted(backend, |s| {
        s.usage_flush_interval_ms = defaults.usage_flush_interval_ms;
        s.audit_linger_ms = defaults.audit_linger_ms;
        s.audit_batch_size = defaults.audit_batch_size;
        s.health_check_interval_ms = 10;
    })
    .await;
    let keys = warm_keys(&mut app, 5).await;
    app.settle().await;
    let store = app.probes.store.clone();
    let (before, reads_before) = (store.statements(), store.reads());
    let on_wire = wire.as_ref().map_or(0, |w| w.statements().len());
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for t in 0..64 {
        let mut client = app.verify.clone();
        let keys = keys.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..1000 / 64 + usize::from(t < 1000 % 64) {
                let key = keys[(t + i) % keys.len()].clone();
                let r = client.verify(pb::VerifyRequest { key, ..Default::default() }).await.unwrap();
                assert_eq!(r.into_inner().decision, pb::Decision::Allow as i32);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    app.settle().await;
    let elapsed = started.elapsed().as_millis() as u64;
    assert_eq!(store.reads() - reads_before, 0, "warm verifies read nothing");
    let spent = store.statements() - before;
    same_as_on_the_wire(spent, wire.as_ref(), on_wire);
    // Up to four statements per audit batch (BEGIN, two chunks, COMMIT;
    // COPY and its outcomes on PostgreSQL) and per usage flush of five keys
    // (BEGIN, flush id, one UPDATE, COMMIT), in every window the calls and
    // their writing spanned, plus the windows they straddled at each end.
    let windows = elapsed / defaults.audit_linger_ms + 2;
    let flushes = elapsed / defaults.usage_flush_interval_ms + 2;
    let bound = 4 * windows + 4 * flushes;
    eprintln!("1000 warm verifies over {elapsed} ms: {spent} statements (bound {bound})");
    assert!(spent <= bound, "{spent} statements for 1000 warm verifies in {elapsed} ms; at most {bound}");
    assert!(bound < 1000, "the run took so long ({elapsed} ms) that the bound says nothing");
    app.stop().await;
}

/// `n` keys for the test merchant, each verified once (identified and cached).
async fn warm_keys(app: &mut TestApp, n: usize) -> Vec<String> {
    let mut keys = Vec::new();
    for _ in 0..n {
        let (_, key) = app.key_with_scopes(&["sales:read"]).await;
        app.verify(&key, "", "").await;
        keys.push(key);
    }
    keys
}

async fn the_negative_cache_stays_bounded(backend: Backend) {
    let mut app = spawn_app_with(backend, |s| s.negative_cache_max = 100).await;
    let mut unknown = PlainKey::generate(&KeyPrefix::default()).unwrap();
    for _ in 0..500 {
        unknown = PlainKey::generate(&KeyPrefix::default()).unwrap();
        assert_eq!(outcome(&app.verify(unknown.expose(), "", "").await), deny(R::NotFound));
    }
    let cache = app.probes.cache.clone().unwrap();
    let (identities, states, negative) = cache.sizes();
    assert!(negative > 0 && negative <= 100, "{negative} negative entries");
    assert_eq!((identities, states), (0, 0), "garbage never gets an identity");
    // In use, not merely small: the latest unknown key, asked again, is
    // answered from it without a read.
    let hits = || cache.counters.negative_hits.load(std::sync::atomic::Ordering::SeqCst);
    let (hits_before, reads) = (hits(), app.probes.store.reads());
    assert_eq!(outcome(&app.verify(unknown.expose(), "", "").await), deny(R::NotFound));
    assert_eq!((hits() - hits_before, app.probes.store.reads() - reads), (1, 0), "(negative hits, reads)");
    app.stop().await;
}
