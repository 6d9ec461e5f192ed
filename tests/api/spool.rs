//! The audit spool through outages and crashes (PostgreSQL behind the test
//! proxy): rows wait on local disk instead of filling the queue, are
//! replayed in order once the database answers, and survive the process
//! being killed.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use keywarden::api::pb;

use crate::helpers::{
    Backend, Proxy, admin_client, allowed, connect, outcome, parse_metrics, sales, scalar, scrape,
    spawn_app_over, spawn_binary, until,
};

once_tests!(
    a_minute_long_outage_loses_no_audit_row_and_no_usage_count(postgres),
    sigkill_during_an_outage_loses_no_row_no_use_and_no_credit(postgres),
);

/// A database outage of a minute under steady load on cached keys: every
/// answered call still has its row and its usage count once the database
/// is back, the audit queue never refuses a call (the rows waited on the
/// spool, not in the queue), and the spool drains.
async fn a_minute_long_outage_loses_no_audit_row_and_no_usage_count() {
    const OUTAGE: Duration = Duration::from_secs(60);
    let Backend::Postgres(server) = Backend::postgres() else { unreachable!() };
    let proxy = Proxy::start(Proxy::upstream_of(&server)).await;
    let mut app = spawn_app_over(
        Backend::postgres(),
        None,
        |_| async {},
        |s| {
            s.database_url = s.database_url.as_deref().map(|url| proxy.url_for(url));
            // Cached keys verify through the whole outage; a small queue
            // would fill within a second without the spool.
            s.staleness_bound_ms = 300_000;
            s.audit_queue_capacity = 500;
            s.db_acquire_timeout_ms = 300;
            s.health_check_interval_ms = 200;
        },
    )
    .await;
    let (key, plaintext) = app.key_with_scopes(&["sales:read"]).await;
    assert!(crate::helpers::allowed() == outcome(&app.verify(&plaintext, "", "sales:read").await));

    let running = Arc::new(AtomicBool::new(true));
    let answered = Arc::new(AtomicU64::new(0));
    let slowest = Arc::new(AtomicU64::new(0));
    let load: Vec<_> = (0..4)
        .map(|_| {
            let (running, answered, slowest, mut client, key) = (
                Arc::clone(&running),
                Arc::clone(&answered),
                Arc::clone(&slowest),
                app.verify.clone(),
                plaintext.clone(),
            );
            tokio::spawn(async move {
                let mut refused = Vec::new();
                while running.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    match client.verify(sales(&key)).await {
                        Ok(r) if outcome(r.get_ref()) == allowed() => {
                            answered.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(r) => panic!("a cached key was not allowed: {r:?}"),
                        Err(status) => refused.push(status),
                    }
                    slowest.fetch_max(started.elapsed().as_millis() as u64, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                refused
            })
        })
        .collect();

    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.cut();
    tokio::time::sleep(OUTAGE).await;
    let spooled = app.probes.audit.spooled_rows();
    proxy.restore();
    tokio::time::sleep(Duration::from_secs(3)).await;
    running.store(false, Ordering::Relaxed);
    let mut refused = Vec::new();
    for task in load {
        refused.extend(task.await.unwrap());
    }
    // The moments before the health monitor sees the outage fail closed
    // (read-through finds no database); the audit queue never refuses.
    assert!(
        refused.iter().all(|s| s.code() == tonic::Code::Unavailable && !s.message().contains("audit")),
        "calls refused for the audit trail: {refused:?}"
    );
    assert!(refused.len() < 200, "{} calls refused", refused.len());
    assert!(spooled > 1_000, "rows waited on the spool during the outage ({spooled})");

    // The spool drains; then every answered call has its row and its use.
    app.settle().await;
    assert_eq!(app.probes.audit.spooled_rows(), 0);
    let answered = answered.load(Ordering::Relaxed) as i64 + 1;
    let rows = scalar(
        &app.database_url,
        &format!("SELECT COUNT(*) FROM audit_events WHERE api_key_id = '{}' AND kind = 'VERIFY'", key.id),
    )
    .await;
    let uses =
        scalar(&app.database_url, &format!("SELECT request_count FROM api_keys WHERE id = '{}'", key.id))
            .await;
    let metrics = parse_metrics(&app.probes.exporter.render());
    let slowest = Duration::from_millis(slowest.load(Ordering::Relaxed));
    println!(
        "outage {OUTAGE:?}: {answered} calls answered, {spooled} rows spooled at the end of it, \
         {rows} rows and {uses} uses stored, slowest call {slowest:?}"
    );
    assert_eq!((rows, uses), (answered, answered), "rows and usage against calls answered");
    assert_eq!(metrics["keywarden_audit_queue_refusals_total"], 0.0);
    assert!(metrics["keywarden_audit_spool_replayed_rows_total"] >= spooled as f64);
    assert!(slowest < Duration::from_secs(2), "a call waited {slowest:?}");
    app.stop().await;
}

/// A replica killed (SIGKILL) during a database outage, as Kubernetes kills
/// one whose liveness fails: once the load stops and the replica reports
/// nothing held only in memory (every row spooled, all usage spilled), the
/// kill loses nothing. Started again on the same data directory, it stores
/// each answered call's row once, and counts each call and each credit
/// spent exactly once.
async fn sigkill_during_an_outage_loses_no_row_no_use_and_no_credit() {
    const BALANCE: i64 = 100_000;
    let dir = tempfile::tempdir().unwrap();
    let (database_url, postgres) = crate::helpers::fresh_database(&Backend::postgres(), dir.path()).await;
    let proxy = Proxy::start(Proxy::upstream_of(&database_url)).await;
    let env = [
        ("KEYWARDEN_STALENESS_BOUND_MS", "300000"),
        ("KEYWARDEN_DB_ACQUIRE_TIMEOUT_MS", "300"),
        ("KEYWARDEN_HEALTH_CHECK_INTERVAL_MS", "200"),
        ("KEYWARDEN_AUDIT_SPILL_AFTER_MS", "200"),
        ("KEYWARDEN_USAGE_FLUSH_INTERVAL_MS", "200"),
    ];
    let replica = spawn_binary(&proxy.url_for(&database_url), dir.path(), &env);
    let channel = connect(replica.addr).await;
    let mut admin = admin_client(channel.clone(), crate::helpers::ADMIN_TOKEN);
    let mut verify = pb::key_verify_client::KeyVerifyClient::new(channel);
    let created = admin
        .create_key(pb::CreateKeyRequest {
            merchant_id: crate::helpers::MERCHANT.into(),
            name: "killed".into(),
            scopes: vec!["sales:read".into()],
            credits: Some(pb::Credits { remaining: BALANCE, refill: None }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let (key_id, plaintext) = (created.api_key.unwrap().id, created.plaintext_key);
    let refused_scope = pb::VerifyRequest {
        key: plaintext.clone(),
        required_scope: "invoice:write".into(),
        ..Default::default()
    };
    verify.verify(sales(&plaintext)).await.unwrap();
    let (mut allowed_calls, mut denied_calls) = (1_i64, 0_i64);

    proxy.cut();
    for i in 0..900 {
        let request = if i % 3 == 0 { refused_scope.clone() } else { sales(&plaintext) };
        // Calls in the moment before the outage is noticed may fail closed;
        // only answered calls count.
        if let Ok(r) = verify.verify(request).await {
            if outcome(r.get_ref()) == allowed() {
                allowed_calls += 1;
            } else {
                denied_calls += 1;
            }
        }
    }
    assert!(allowed_calls > 300 && denied_calls > 150, "{allowed_calls} allowed, {denied_calls} denied");
    let answered = allowed_calls + denied_calls;
    // The load has stopped: wait until the replica reports every row of an
    // answered call either stored (before the cut) or spooled, and no usage
    // held only in memory. Then kill it.
    let metrics = replica.metrics.unwrap();
    let stored_rows = || {
        let sql =
            format!("SELECT COUNT(*) FROM audit_events WHERE api_key_id = '{key_id}' AND kind = 'VERIFY'");
        let database_url = database_url.clone();
        async move { scalar(&database_url, &sql).await }
    };
    let spooled = until("every row spooled and all usage spilled", || {
        let stored_rows = stored_rows();
        async move {
            let m = parse_metrics(&scrape(metrics).await.1);
            let (spooled, unsaved) = (m["keywarden_audit_spool_rows"], m["keywarden_usage_unsaved_keys"]);
            (spooled as i64 + stored_rows.await == answered && unsaved == 0.0).then_some(spooled as usize)
        }
    })
    .await;
    replica.kill();

    // What the replica reported as spooled is in the files.
    let mut on_disk = 0;
    for entry in std::fs::read_dir(dir.path().join("spool")).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().unwrap().to_string_lossy().starts_with("seg-") {
            on_disk += std::fs::read_to_string(&path).unwrap().lines().count();
        }
    }
    assert_eq!(on_disk, spooled, "rows in the spool's files against rows reported spooled");

    proxy.restore();
    let restarted = spawn_binary(&database_url, dir.path(), &[]);
    let metrics = restarted.metrics.unwrap();
    until("the restarted replica to replay its spool", || async move {
        let m = parse_metrics(&scrape(metrics).await.1);
        (m["keywarden_audit_spool_rows"] == 0.0).then_some(())
    })
    .await;
    let column = |name: &str| {
        let sql = format!("SELECT {name} FROM api_keys WHERE id = '{key_id}'");
        let database_url = database_url.clone();
        async move { scalar(&database_url, &sql).await }
    };
    let stored = (
        stored_rows().await,
        column("request_count").await,
        column("denied_count").await,
        BALANCE - column("credits_remaining").await,
    );
    println!(
        "SIGKILL in an outage: {answered} calls answered ({allowed_calls} allowed), {spooled} rows spooled; \
         after the restart (rows, uses, denials, credits spent) = {stored:?}"
    );
    assert_eq!(stored, (answered, allowed_calls, denied_calls, allowed_calls));
    assert!(restarted.stop().await.success());
    crate::helpers::drop_database(postgres).await;
}
