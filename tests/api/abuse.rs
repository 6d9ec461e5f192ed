//! Abuse resistance through the real server: guessing is throttled without
//! scrypt while real keys keep working, every request's work is bounded,
//! and hostile input leaves the server serving within its memory.

use std::time::{Duration, Instant};

use keywarden::api::pb::{self, DenyReason as R};
use tonic::Code;

use crate::helpers::{
    Backend, OTHER_MERCHANT, allowed, deny, outcome, spawn_app_with, until, violated_fields, wrong_secret,
};

backend_tests!(
    guessing_on_a_known_prefix_is_throttled_without_scrypt_while_real_keys_keep_working,
    a_client_ip_guessing_across_prefixes_is_throttled,
    record_outcomes_refuses_an_oversized_call_whole_and_lists_few_violations,
    record_outcomes_keeps_nothing_for_ids_this_deployment_did_not_issue,
    garbage_is_counted_in_rollup_rows_while_attempts_on_real_keys_keep_a_row_each,
);
once_tests!(
    verify_traffic_cannot_take_the_connections_kept_for_admin_and_health(postgres),
    made_up_prefixes_and_operator_tokens_from_one_address_cost_a_bounded_number_of_reads,
);

fn guess(key: &str, variant: u32, ip: &str) -> pb::VerifyRequest {
    pb::VerifyRequest { key: wrong_secret(key, variant), ip: ip.into(), ..Default::default() }
}

async fn guessing_on_a_known_prefix_is_throttled_without_scrypt_while_real_keys_keep_working(
    backend: Backend,
) {
    const LIMIT: u32 = 5;
    const WINDOW: Duration = Duration::from_secs(2);
    let mut app = spawn_app_with(backend, |s| {
        s.throttle_failures_per_prefix = LIMIT;
        s.throttle_failures_per_ip = 0;
        s.throttle_window_ms = WINDOW.as_millis() as u64;
    })
    .await;
    let (_, attacked) = app.key_with_scopes(&["sales:read"]).await;
    assert_eq!(outcome(&app.verify(&attacked, "", "").await), allowed(), "the holder's key, now cached");
    let fresh = app
        .create_key(pb::CreateKeyRequest {
            merchant_id: OTHER_MERCHANT.into(),
            name: "never verified".into(),
            scopes: vec!["sales:read".into()],
            ..Default::default()
        })
        .await
        .1;

    let runs = app.probes.pool.runs();
    // The window is exact and counts from each guess's admission, which is
    // after this instant: no lift can come before it plus the window.
    let first_guess = Instant::now();
    for v in 0..LIMIT {
        let r = app.verify.verify(guess(&attacked, v, "")).await.unwrap().into_inner();
        assert_eq!(outcome(&r), deny(R::NotFound), "guess {v} is checked");
    }
    assert_eq!(app.probes.pool.runs() - runs, u64::from(LIMIT), "one scrypt per guess up to the limit");

    // Past the limit: refused at once, no scrypt, while the guessing goes on
    // concurrently and the real keys keep working.
    let guesser = {
        let (mut client, attacked) = (app.verify.clone(), attacked.clone());
        tokio::spawn(async move {
            let mut answers = Vec::new();
            for v in 100..150 {
                answers.push(outcome(&client.verify(guess(&attacked, v, "")).await.unwrap().into_inner()));
            }
            answers
        })
    };
    assert_eq!(
        outcome(&app.verify(&attacked, "", "").await),
        allowed(),
        "the cached holder is not throttled"
    );
    assert_eq!(
        outcome(&app.verify(&fresh, "", "").await),
        allowed(),
        "another merchant's fresh key verifies"
    );
    let answers = guesser.await.unwrap();
    assert!(answers.iter().all(|a| *a == deny(R::Throttled)), "every guess past the limit: {answers:?}");
    assert_eq!(
        app.probes.pool.runs() - runs,
        u64::from(LIMIT) + 1,
        "past the limit only the fresh key's first check ran scrypt"
    );
    let metrics = app.probes.exporter.render();
    let metrics = crate::helpers::parse_metrics(&metrics);
    assert_eq!(metrics["keywarden_throttled_prefixes"], 1.0);
    assert_eq!(metrics["keywarden_throttled_checks_prefix_total"], 50.0);

    // The window slides on: the prefix is checked again.
    until("the throttle to lift", || {
        let mut client = app.verify.clone();
        let attacked = attacked.clone();
        async move {
            let r = client.verify(guess(&attacked, 999, "")).await.unwrap().into_inner();
            (outcome(&r) == deny(R::NotFound)).then_some(())
        }
    })
    .await;
    let lifted = first_guess.elapsed();
    assert!(lifted >= WINDOW, "lifted {lifted:?} after the first guess, inside the {WINDOW:?} window");
    app.stop().await;
}

async fn a_client_ip_guessing_across_prefixes_is_throttled(backend: Backend) {
    let mut app = spawn_app_with(backend, |s| {
        s.throttle_failures_per_prefix = 100;
        s.throttle_failures_per_ip = 3;
    })
    .await;
    let mut keys = Vec::new();
    for _ in 0..4 {
        keys.push(app.key_with_scopes(&["sales:read"]).await.1);
    }
    let attacker = "203.0.113.7";
    for key in &keys[..3] {
        let r = app.verify.verify(guess(key, 1, attacker)).await.unwrap().into_inner();
        assert_eq!(outcome(&r), deny(R::NotFound));
    }
    let runs = app.probes.pool.runs();
    let r = app.verify.verify(guess(&keys[3], 1, attacker)).await.unwrap().into_inner();
    assert_eq!(outcome(&r), deny(R::Throttled), "a fourth prefix from the same IP");
    assert_eq!(app.probes.pool.runs(), runs, "refused without scrypt");
    let r = app.verify.verify(guess(&keys[3], 1, "203.0.113.8")).await.unwrap().into_inner();
    assert_eq!(outcome(&r), deny(R::NotFound), "another IP is checked");
    assert_eq!(outcome(&app.verify(&keys[3], "198.51.100.1", "").await), allowed());
    let metrics = crate::helpers::parse_metrics(&app.probes.exporter.render());
    assert_eq!(metrics["keywarden_throttled_ips"], 1.0);
    assert_eq!(metrics["keywarden_throttled_checks_ip_total"], 1.0);
    app.stop().await;
}

async fn record_outcomes_refuses_an_oversized_call_whole_and_lists_few_violations(backend: Backend) {
    let mut app = spawn_app_with(backend, |_| {}).await;
    let (_, key) = app.key_with_scopes(&["sales:read"]).await;
    let allowed_row = app.verify(&key, "", "").await.audit_event_id;
    let outcome_of = |id: &str, status| pb::Outcome { audit_event_id: id.into(), status };

    // Past the limit: refused before any entry is looked at, nothing changed.
    let mut too_many = vec![outcome_of(&allowed_row, 201)];
    too_many.extend((0..1000).map(|_| outcome_of("", 0)));
    let started = Instant::now();
    let status = app
        .verify
        .record_outcomes(pb::RecordOutcomesRequest { outcomes: too_many })
        .await
        .expect_err("1001 outcomes");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&status), ["outcomes"]);
    assert!(status.message().contains("at most 1000 per call (got 1001)"), "{}", status.message());

    // At the limit, all invalid: a bounded error naming the first fields.
    let invalid = (0..1000).map(|_| outcome_of("x", 7)).collect();
    let status = app
        .verify
        .record_outcomes(pb::RecordOutcomesRequest { outcomes: invalid })
        .await
        .expect_err("invalid statuses");
    let fields = violated_fields(&status);
    assert_eq!(fields.len(), 11, "ten violations and a count: {fields:?}");
    assert_eq!(fields[0], "outcomes[0].status");
    assert!(status.message().contains("990 more invalid fields not listed"), "{}", status.message());
    assert!(status.message().len() < 2048, "{} bytes", status.message().len());

    // At the limit, valid: one statement sets the one known row.
    let mut at_limit = vec![outcome_of(&allowed_row, 201)];
    at_limit.extend((0..999).map(|i| outcome_of(&uuid::Uuid::now_v7().to_string(), 200 + i % 300)));
    let updated = app
        .verify
        .record_outcomes(pb::RecordOutcomesRequest { outcomes: at_limit })
        .await
        .unwrap()
        .into_inner()
        .updated;
    assert_eq!(updated, 1);
    app.settle().await;
    let status = crate::helpers::scalar(
        &app.database_url,
        &format!("SELECT CAST(status AS BIGINT) FROM audit_events WHERE id = '{allowed_row}'"),
    )
    .await;
    assert_eq!(status, 201);
    app.stop().await;
}

async fn record_outcomes_keeps_nothing_for_ids_this_deployment_did_not_issue(backend: Backend) {
    let mut app = spawn_app_with(backend, |_| {}).await;
    // Ids that look recent but were never minted here (plain UUIDv7s), and
    // ones that are not ids at all.
    let made_up: Vec<pb::Outcome> = (0..1000)
        .map(|i| pb::Outcome {
            audit_event_id: if i % 2 == 0 { uuid::Uuid::now_v7().to_string() } else { format!("id-{i}") },
            status: 200,
        })
        .collect();
    let updated = app
        .verify
        .record_outcomes(pb::RecordOutcomesRequest { outcomes: made_up })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.updated, 0);
    let held = crate::helpers::scalar(&app.database_url, "SELECT count(*) FROM audit_outcomes").await;
    assert_eq!(held, 0, "no outcome held for an id this deployment did not issue");
    // An id this deployment issued is recognised: its row exists, so the
    // outcome lands on it.
    let (_, key) = app.key_with_scopes(&["sales:read"]).await;
    let id = app.verify(&key, "", "").await.audit_event_id;
    app.settle().await;
    let r = app
        .verify
        .record_outcomes(pb::RecordOutcomesRequest {
            outcomes: vec![pb::Outcome { audit_event_id: id, status: 204 }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.updated, 1);
    app.stop().await;
}

async fn garbage_is_counted_in_rollup_rows_while_attempts_on_real_keys_keep_a_row_each(backend: Backend) {
    let mut app = spawn_app_with(backend, |s| s.throttle_failures_per_prefix = 3).await;
    let (real, key) = app.key_with_scopes(&["sales:read"]).await;
    let unknown = keywarden::keys::PlainKey::generate(&keywarden::keys::KeyPrefix::default()).unwrap();
    let call = |key: String, ip: &str, endpoint: &str| pb::VerifyRequest {
        key,
        ip: ip.into(),
        endpoint: endpoint.into(),
        method: "GET".into(),
        ..Default::default()
    };
    let mut ids = std::collections::HashSet::new();
    let minute = || chrono::Utc::now().timestamp().div_euclid(60);
    let first_minute = minute();
    for i in 0..300 {
        // Two sources of malformed keys, one of unknown prefixes.
        let ip = if i % 3 == 0 { "203.0.113.1" } else { "203.0.113.2" };
        let r = app.verify.verify(call(format!("sntr_junk{i}"), ip, "/a")).await.unwrap().into_inner();
        assert_eq!(outcome(&r), deny(R::Malformed));
        ids.insert(r.audit_event_id);
    }
    for _ in 0..50 {
        let r = app.verify.verify(call(unknown.expose().to_owned(), "203.0.113.3", "/b")).await.unwrap();
        ids.insert(r.into_inner().audit_event_id);
    }
    // Real key: verified (so cached), then five wrong secrets (three
    // checked, two throttled).
    let allowed_row = app.verify.verify(call(key.clone(), "198.51.100.9", "/c")).await.unwrap().into_inner();
    assert_eq!(outcome(&allowed_row), allowed());
    let mut real_rows = Vec::new();
    for v in 0..5 {
        let r =
            app.verify.verify(call(wrong_secret(&key, v), "198.51.100.9", "/c")).await.unwrap().into_inner();
        real_rows.push((r.audit_event_id, r.deny_reason));
    }
    // Three distinct requests; a flood that straddles a minute starts new rollups.
    let minutes = minute() - first_minute + 1;
    assert!(ids.len() as i64 <= 3 * minutes, "one rollup id per minute and distinct request: {ids:?}");
    app.settle().await;

    // The merchant sees every attempt on its key, one row each.
    let merchant_rows = app
        .admin
        .list_audit_events(pb::ListAuditEventsRequest {
            merchant_id: crate::helpers::MERCHANT.into(),
            api_key_id: real.id.clone(),
            page_size: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    let verify_rows: Vec<_> =
        merchant_rows.iter().filter(|e| e.kind == pb::AuditEventKind::Verify as i32).collect();
    assert_eq!(verify_rows.len(), 4, "three wrong secrets and the right one: {verify_rows:?}");
    assert_eq!(verify_rows.iter().filter(|e| e.deny_reason == R::NotFound as i32).count(), 3);
    assert!(verify_rows.iter().all(|e| e.count == 0));
    assert_eq!(real_rows.iter().filter(|(_, r)| *r == R::Throttled as i32).count(), 2);

    // An ADMIN sees the rollups, with exact counts.
    let unattributed = app
        .admin
        .list_audit_events(pb::ListAuditEventsRequest {
            unattributed: true,
            page_size: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    let rollups: Vec<_> =
        unattributed.iter().filter(|e| e.kind == pb::AuditEventKind::VerifyRollup as i32).collect();
    let mut counts: Vec<_> = rollups
        .iter()
        .map(|e| (e.deny_reason, e.ip.as_str(), e.endpoint.as_str(), e.key_prefix.as_str(), e.count))
        .collect();
    counts.sort();
    // Spanning a minute boundary splits a group in two; the sums still hold.
    let total = |reason: R, ip: &str| -> i64 {
        counts.iter().filter(|c| c.0 == reason as i32 && c.1 == ip).map(|c| c.4).sum()
    };
    assert_eq!(total(R::Malformed, "203.0.113.1"), 100);
    assert_eq!(total(R::Malformed, "203.0.113.2"), 200);
    assert_eq!(total(R::NotFound, "203.0.113.3"), 50);
    assert_eq!(total(R::Throttled, "198.51.100.9"), 2);
    assert!(rollups.iter().all(|e| e.merchant_id.is_empty() && e.status >= 401));
    assert!(
        rollups.iter().any(|e| e.deny_reason == R::NotFound as i32 && e.key_prefix == unknown.expose()[..16]),
        "the unknown prefix is kept"
    );
    assert!(rollups.len() <= 8, "{} rollup rows for 352 calls", rollups.len());

    // Rows of no merchant are for unrestricted ADMIN callers only.
    let (_, auditor) =
        crate::helpers::issue_operator(&mut app.admin, "auditor", pb::OperatorRole::Auditor, &[]).await;
    let mut as_auditor = crate::helpers::admin_client(crate::helpers::connect(app.addr).await, &auditor);
    let refused = as_auditor
        .list_audit_events(pb::ListAuditEventsRequest { unattributed: true, ..Default::default() })
        .await
        .expect_err("an auditor may not list rows of no merchant");
    assert_eq!(refused.code(), Code::PermissionDenied);
    let status = app
        .admin
        .list_audit_events(pb::ListAuditEventsRequest {
            unattributed: true,
            merchant_id: "m".into(),
            ..Default::default()
        })
        .await
        .expect_err("both");
    assert_eq!(violated_fields(&status), ["merchant_id"]);
    app.stop().await;
}

/// Verify holds at most the pool less the reserve: with every key read
/// stuck behind a lock, KeyAdmin and the health check still get connections.
/// (PostgreSQL: an ACCESS EXCLUSIVE lock blocks reads, which SQLite's WAL
/// never does.)
async fn verify_traffic_cannot_take_the_connections_kept_for_admin_and_health() {
    use sea_orm::sqlx::{Connection, Executor};
    let mut app = spawn_app_with(Backend::postgres(), |s| {
        s.db_max_connections = 4;
        s.db_reserved_connections = 2;
        s.db_acquire_timeout_ms = 3_000;
    })
    .await;
    let (_, key) = app.key_with_scopes(&["sales:read"]).await;
    let mut lock = sea_orm::sqlx::PgConnection::connect(&app.database_url).await.unwrap();
    lock.execute("BEGIN").await.unwrap();
    lock.execute("LOCK TABLE api_keys IN ACCESS EXCLUSIVE MODE").await.unwrap();
    // Ten first sights of keys: each needs a key read, which now waits.
    let stuck: Vec<_> = (0..10)
        .map(|i| {
            let mut client = app.verify.clone();
            let request = guess(&key, 500 + i, "");
            tokio::spawn(async move { client.verify(request).await })
        })
        .collect();
    until("Verify's reads to wait on the lock", || {
        let url = app.database_url.clone();
        async move {
            let waiting = crate::helpers::scalar(
                &url,
                "SELECT COUNT(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()",
            )
            .await;
            (waiting >= 2).then_some(())
        }
    })
    .await;
    // KeyAdmin reads another table on a reserved connection, well within
    // the acquire timeout.
    let started = Instant::now();
    app.admin.list_operator_tokens(pb::ListOperatorTokensRequest::default()).await.expect("an admin call");
    assert!(started.elapsed() < Duration::from_secs(2), "the admin call waited {:?}", started.elapsed());
    let mut health =
        tonic_health::pb::health_client::HealthClient::new(crate::helpers::connect(app.addr).await);
    let status =
        health.check(tonic_health::pb::HealthCheckRequest::default()).await.unwrap().into_inner().status;
    assert_eq!(status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
    lock.execute("ROLLBACK").await.unwrap();
    for call in stuck {
        match call.await.unwrap() {
            Ok(r) => assert_eq!(outcome(&r.into_inner()), deny(R::NotFound)),
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                assert!(status.message().contains("Verify's share"), "{}", status.message());
            }
        }
    }
    app.stop().await;
}

async fn made_up_prefixes_and_operator_tokens_from_one_address_cost_a_bounded_number_of_reads() {
    // The default per-address limit: 100 wrong guesses a minute.
    const PER_IP: u64 = 100;
    // Reads the replica's own background tasks (the database monitor, the
    // writers) may make while the test runs.
    const BACKGROUND: u64 = 20;
    let mut app = spawn_app_with(Backend::Sqlite, |_| {}).await;
    let (_, real) = app.key_with_scopes(&["sales:read"]).await;
    let reads = app.probes.store.reads();
    // 10,000 keys with distinct, well-formed prefixes no key has, sixteen
    // at a time, all from one client address.
    let (mut not_found, mut throttled) = (0, 0);
    for _ in 0..625 {
        let calls = (0..16).map(|_| {
            let key = keywarden::keys::PlainKey::generate(&keywarden::keys::KeyPrefix::default()).unwrap();
            let mut verify = app.verify.clone();
            async move {
                let call = pb::VerifyRequest {
                    key: key.expose().to_owned(),
                    ip: "203.0.113.9".into(),
                    ..Default::default()
                };
                verify.verify(call).await.unwrap().into_inner()
            }
        });
        for answer in futures_join(calls).await {
            match answer.deny_reason() {
                R::NotFound => not_found += 1,
                R::Throttled => throttled += 1,
                other => panic!("{other:?}"),
            }
        }
    }
    let spent = app.probes.store.reads() - reads;
    assert!(spent <= PER_IP + BACKGROUND, "10,000 made-up prefixes cost {spent} reads");
    assert_eq!((not_found, throttled), (PER_IP, 10_000 - PER_IP));
    // Another address, and a real key, are unaffected; the replica serves.
    assert_eq!(outcome(&app.verify(&real, "198.51.100.7", "sales:read").await), allowed());
    let mut health =
        tonic_health::pb::health_client::HealthClient::new(crate::helpers::connect(app.addr).await);
    let status =
        health.check(tonic_health::pb::HealthCheckRequest::default()).await.unwrap().into_inner().status;
    assert_eq!(status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);

    // KeyAdmin: well-formed operator tokens that do not exist, from this
    // test's address, cost at most the same number of reads.
    let reads = app.probes.store.reads();
    for _ in 0..300 {
        let token = keywarden::keys::operator::OperatorSecret::generate().unwrap();
        let refused = app.admin_as(token.expose()).list_scopes(pb::ListScopesRequest {}).await.unwrap_err();
        assert_eq!(refused.code(), Code::Unauthenticated);
    }
    let spent = app.probes.store.reads() - reads;
    assert!(spent <= PER_IP + BACKGROUND, "300 made-up operator tokens cost {spent} reads");
    app.stop().await;
}

/// Runs `calls` concurrently and returns their answers in order.
async fn futures_join<F>(calls: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = calls.map(tokio::spawn).collect();
    let mut answers = Vec::with_capacity(handles.len());
    for handle in handles {
        answers.push(handle.await.unwrap());
    }
    answers
}
