//! Several replicas on one PostgreSQL, as spawned binaries: revocations reach
//! every replica fast, counts add up exactly through SIGTERM, outages are
//! survived without loss, and a replica that missed change notices forgets
//! what it cached. Each test gets its own database on the test PostgreSQL
//! (see `helpers`). Retention and index use run on both backends.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use chrono::SubsecRound;
use keywarden::{
    api::pb::{self, key_verify_client::KeyVerifyClient},
    audit::{AuditKind, AuditRecord},
    keys::{Decision, DenyReason},
    store::audit::AuditQuery,
};
use sea_orm::{ConnectionTrait, Database, Statement};
use tonic::{Code, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::helpers::{
    ADMIN_TOKEN, AdminClient, Backend, MERCHANT, Proxy, Replica, admin_client, connect, deny, eventually,
    fresh_database, outcome, revoke, sales, spawn_app_over, spawn_app_with, spawn_binary, until,
    verify_until,
};

backend_tests!(
    retention_deletes_only_rows_past_the_limit,
    audit_listing_is_served_by_indexes,
    an_audit_batch_written_again_is_harmless,
    a_large_audit_batch_lands_whole_with_every_field,
    shutdown_gives_up_on_a_stuck_audit_write_after_the_flush_timeout,
);
once_tests!(
    an_operator_token_revoked_on_one_replica_is_refused_by_another_within_a_second(postgres),
    revocation_on_one_replica_is_obeyed_by_another_within_100ms(postgres),
    two_replicas_under_load_count_every_call_exactly_through_sigterm(postgres),
    an_outage_keeps_cached_keys_verifying_fails_the_rest_closed_and_loses_nothing(postgres),
    past_the_staleness_bound_cached_keys_fail_closed_until_the_database_returns(postgres),
    a_replica_that_missed_notices_forgets_its_cache_on_reconnect(postgres),
    an_outcome_reported_to_another_replica_lands_on_its_row(postgres),
    replicas_with_skewed_clocks_deny_a_revoked_key_at_once(postgres),
    processes_whose_clocks_are_hours_apart_agree_on_revocation(postgres, faketime),
    a_half_open_listener_is_detected_within_two_heartbeats(postgres),
);

struct Fleet {
    database_url: String,
    postgres: crate::helpers::DatabaseGuard,
    _dir: tempfile::TempDir,
}

async fn postgres_fleet() -> Fleet {
    let backend = Backend::postgres();
    let dir = tempfile::tempdir().unwrap();
    let (database_url, postgres) = fresh_database(&backend, dir.path()).await;
    // Migrate once, before replicas race to start.
    let migrated = crate::helpers::output_within(
        std::process::Command::new(env!("CARGO_BIN_EXE_keywarden"))
            .arg("migrate")
            .env("KEYWARDEN_DATABASE_URL", &database_url),
        crate::helpers::CLI_WITHIN,
        "keywarden migrate to finish",
    );
    assert!(migrated.status.success());
    Fleet { database_url, postgres, _dir: dir }
}

impl Fleet {
    /// A replica on `url`, with a data directory (spool, usage spill) of
    /// its own.
    fn replica(&self, url: &str, extra: &[(&str, &str)]) -> Replica {
        let mut env = vec![("KEYWARDEN_MIGRATE_ON_START", "false")];
        env.extend_from_slice(extra);
        let data = self._dir.path().join(uuid::Uuid::now_v7().simple().to_string());
        std::fs::create_dir(&data).unwrap();
        spawn_binary(url, &data, &env)
    }

    async fn drop(self) {
        crate::helpers::drop_database(self.postgres).await;
    }
}

struct Clients {
    admin: AdminClient,
    verify: KeyVerifyClient<Channel>,
    health: HealthClient<Channel>,
}

async fn clients(addr: SocketAddr) -> Clients {
    let channel = connect(addr).await;
    Clients {
        admin: admin_client(channel.clone(), ADMIN_TOKEN),
        verify: KeyVerifyClient::new(channel.clone()),
        health: HealthClient::new(channel),
    }
}

async fn verify(
    client: &mut KeyVerifyClient<Channel>,
    key: &str,
) -> Result<pb::VerifyResponse, tonic::Status> {
    client.verify(pb::VerifyRequest { key: key.into(), ..Default::default() }).await.map(|r| r.into_inner())
}

/// How a call reaching a replica that is shutting down is refused:
/// UNAVAILABLE from the server; CANCELLED when the client found the
/// connection already closed; or the stream above a graceful GOAWAY's last
/// stream id, which HTTP/2 guarantees the server never processed (tonic
/// reports it as INTERNAL).
fn is_shutdown_refusal(status: &tonic::Status) -> bool {
    let graceful_go_away = || {
        let mut source = std::error::Error::source(status);
        while let Some(e) = source {
            if let Some(h2) = e.downcast_ref::<h2::Error>() {
                return h2.is_go_away() && h2.is_remote() && h2.reason() == Some(h2::Reason::NO_ERROR);
            }
            source = e.source();
        }
        false
    };
    // A request written while the server's GOAWAY is in flight is never
    // read; the server closes the connection once its drained streams are
    // done, and the unread request turns the close into a reset. The call
    // did no work (the exact counts below prove it), so it is a refusal too.
    let reset_unread = || {
        let mut source = std::error::Error::source(status);
        while let Some(e) = source {
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                return io.kind() == std::io::ErrorKind::ConnectionReset;
            }
            source = e.source();
        }
        false
    };
    matches!(status.code(), Code::Unavailable | Code::Cancelled) || graceful_go_away() || reset_unread()
}

fn allowed(r: &pb::VerifyResponse) -> bool {
    r.decision == pb::Decision::Allow as i32
}

async fn stop(replica: Replica) {
    replica.sigterm();
    let status = replica.exited().await;
    assert!(status.success(), "replica exited with {status:?}");
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Operator tokens are read on every KeyAdmin call, so a revocation made
/// on one replica holds on another at its next call.
async fn an_operator_token_revoked_on_one_replica_is_refused_by_another_within_a_second() {
    let fleet = postgres_fleet().await;
    let (a, b) = (fleet.replica(&fleet.database_url, &[]), fleet.replica(&fleet.database_url, &[]));
    let mut on_a = clients(a.addr).await;
    let (token_id, token) =
        crate::helpers::issue_operator(&mut on_a.admin, "fleet-operator", pb::OperatorRole::KeyManager, &[])
            .await;
    let mut on_b = admin_client(connect(b.addr).await, &token);
    on_b.list_scopes(pb::ListScopesRequest {}).await.expect("the token works on B");
    on_a.admin.revoke_operator_token(pb::RevokeOperatorTokenRequest { id: token_id }).await.unwrap();
    let revoked = Instant::now();
    loop {
        match on_b.list_scopes(pb::ListScopesRequest {}).await {
            Err(status) if status.code() == tonic::Code::Unauthenticated => break,
            other => assert!(revoked.elapsed() < Duration::from_secs(1), "B still accepts it: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    eprintln!("operator token revocation A -> B: refused after {:?}", revoked.elapsed());
    stop(a).await;
    stop(b).await;
    fleet.drop().await;
}

async fn revocation_on_one_replica_is_obeyed_by_another_within_100ms() {
    let fleet = postgres_fleet().await;
    let (a, b) = (fleet.replica(&fleet.database_url, &[]), fleet.replica(&fleet.database_url, &[]));
    let (mut on_a, mut on_b) = (clients(a.addr).await, clients(b.addr).await);
    let b_metrics = || crate::helpers::metrics_of(b.metrics.unwrap());
    const KEYS: usize = 100;
    let mut keys = Vec::new();
    for i in 0..KEYS {
        let (id, key) = crate::helpers::create_sales_key(&mut on_a.admin, &format!("fleet {i}")).await;
        // Created on A, verified on B: same database, and B now caches it.
        assert!(allowed(&verify(&mut on_b.verify, &key).await.unwrap()));
        keys.push((id, key));
    }
    // B answers from its cache: another round reads no key state.
    let before = b_metrics().await;
    for (_, key) in &keys {
        assert!(allowed(&verify(&mut on_b.verify, key).await.unwrap()));
    }
    let cached = b_metrics().await;
    let delta = |later: &std::collections::HashMap<String, f64>,
                 earlier: &std::collections::HashMap<String, f64>,
                 name: &str| { later[name] - earlier[name] };
    assert_eq!(delta(&cached, &before, "keywarden_cache_state_misses_total"), 0.0, "B read key state");
    assert_eq!(delta(&cached, &before, "keywarden_cache_state_hits_total"), KEYS as f64);

    let mut lags = Vec::new();
    for (id, key) in &keys {
        revoke(&mut on_a.admin, id).await;
        let revoked = Instant::now();
        loop {
            let r = verify(&mut on_b.verify, key).await.unwrap();
            if !allowed(&r) {
                assert_eq!(r.deny_reason, pb::DenyReason::Revoked as i32);
                lags.push(revoked.elapsed());
                break;
            }
            assert!(
                revoked.elapsed() < Duration::from_secs(5),
                "replica B still allows a key revoked 5 s ago"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    // Each revocation reached B as a change notice while its cache stayed
    // trusted: corrected by the notice, not by reading through a distrusted
    // cache (which is what B does while notices are not arriving).
    let after = b_metrics().await;
    assert_eq!(delta(&after, &cached, "keywarden_revocation_propagation_seconds_count"), KEYS as f64);
    assert_eq!(after["keywarden_cache_trusted"], 1.0);
    assert_eq!(after["keywarden_change_listener_reconnects_total"], 0.0);
    lags.sort();
    let (p50, p99, max) = (percentile(&lags, 0.50), percentile(&lags, 0.99), *lags.last().unwrap());
    eprintln!("revocation A -> B over {} revocations: p50 {p50:?}, p99 {p99:?}, max {max:?}", lags.len());
    assert!(p99 <= Duration::from_millis(100), "p99 {p99:?}");
    stop(a).await;
    stop(b).await;
    fleet.drop().await;
}

async fn two_replicas_under_load_count_every_call_exactly_through_sigterm() {
    let fleet = postgres_fleet().await;
    // Usage reaches the database only through the final flush; one scrypt
    // thread, so that cold calls queue (the gate below).
    let slow = [("KEYWARDEN_USAGE_FLUSH_INTERVAL_MS", "3600000"), ("KEYWARDEN_HASH_WORKERS", "1")];
    let (a, b) = (fleet.replica(&fleet.database_url, &slow), fleet.replica(&fleet.database_url, &slow));
    let mut on_a = clients(a.addr).await;
    let (key_id, key) = crate::helpers::create_sales_key(&mut on_a.admin, "shared").await;
    let allowed_calls = Arc::new(AtomicU64::new(0));
    let denied_calls = Arc::new(AtomicU64::new(0));
    // Calls sent before SIGTERM and answered after it: drained, not dropped.
    let drained = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    // Microseconds after `start` at which SIGTERM went out; 0 until then.
    let sigterm_at = Arc::new(AtomicU64::new(0));
    let mut load = Vec::new();
    for (i, addr) in [a.addr, b.addr].into_iter().cycle().take(8).enumerate() {
        let (allowed_calls, denied_calls, drained, sigterm_at, key) = (
            Arc::clone(&allowed_calls),
            Arc::clone(&denied_calls),
            Arc::clone(&drained),
            Arc::clone(&sigterm_at),
            key.clone(),
        );
        let channel = connect(addr).await;
        load.push(tokio::spawn(async move {
            let mut client = KeyVerifyClient::new(channel);
            for n in 0.. {
                let scope = if (i + n) % 4 == 0 { "invoice:write" } else { "sales:read" };
                let request = pb::VerifyRequest {
                    key: key.clone(),
                    required_scope: scope.into(),
                    ..Default::default()
                };
                let sent_before_sigterm = sigterm_at.load(Ordering::SeqCst) == 0;
                match client.verify(request).await {
                    Ok(r) => {
                        let counter = if allowed(&r.into_inner()) { &allowed_calls } else { &denied_calls };
                        counter.fetch_add(1, Ordering::SeqCst);
                        if sent_before_sigterm && sigterm_at.load(Ordering::SeqCst) != 0 {
                            drained.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    // The replica is shutting down: a refusal before any
                    // work. The exact counts below prove that no refused
                    // call left an audit row or a usage count behind.
                    Err(status) => {
                        assert_ne!(
                            sigterm_at.load(Ordering::SeqCst),
                            0,
                            "refused before SIGTERM: {status:?}"
                        );
                        assert!(is_shutdown_refusal(&status), "not a shutdown refusal: {status:?}");
                        return;
                    }
                }
            }
        }));
    }
    let answered = || allowed_calls.load(Ordering::SeqCst) + denied_calls.load(Ordering::SeqCst);
    eventually("both replicas to answer a few hundred calls", || (answered() >= 400).then_some(())).await;
    // The gate: three calls per replica provably mid-scrypt.
    let mut gated = crate::helpers::hold_cold_calls(&a, &key, 3).await;
    gated.extend(crate::helpers::hold_cold_calls(&b, &key, 3).await);
    let gated_n = gated.len() as i64;
    // SIGTERM both while the load and the gated calls are in flight.
    sigterm_at.store(start.elapsed().as_micros().max(1) as u64, Ordering::SeqCst);
    a.sigterm();
    b.sigterm();
    for task in load {
        task.await.unwrap();
    }
    // Accepted before SIGTERM, so drained: each is answered, none refused.
    for call in gated {
        let answered = call.await.unwrap().expect("a call mid-scrypt at SIGTERM is answered, not dropped");
        assert_eq!(answered.into_inner().deny_reason, pb::DenyReason::NotFound as i32);
    }
    let drained = drained.load(Ordering::SeqCst);
    eprintln!("calls in flight at SIGTERM and answered: {drained} under load, {gated_n} mid-scrypt");
    assert!(drained > 0, "no call was in flight at SIGTERM: the drain went untested");
    stop(a).await;
    stop(b).await;
    let (allowed_n, denied_n) =
        (allowed_calls.load(Ordering::SeqCst) as i64, denied_calls.load(Ordering::SeqCst) as i64);
    eprintln!("answered under load: {allowed_n} allowed, {denied_n} denied");
    assert!(allowed_n > 100 && denied_n > 10);
    let url = &fleet.database_url;
    assert_eq!(
        crate::helpers::scalar(url, "SELECT COUNT(*) FROM audit_events WHERE kind = 'VERIFY'").await,
        allowed_n + denied_n + gated_n,
        "one audit row per answered call, none for a refused one"
    );
    assert_eq!(
        crate::helpers::scalar(url, &format!("SELECT request_count FROM api_keys WHERE id = '{key_id}'"))
            .await,
        allowed_n
    );
    assert_eq!(
        crate::helpers::scalar(url, &format!("SELECT denied_count FROM api_keys WHERE id = '{key_id}'"))
            .await,
        denied_n + gated_n,
        "wrong secrets tried against the key count as its denials"
    );
    fleet.drop().await;
}

async fn health(client: &mut HealthClient<Channel>) -> i32 {
    client.check(HealthCheckRequest { service: String::new() }).await.unwrap().into_inner().status
}

async fn an_outage_keeps_cached_keys_verifying_fails_the_rest_closed_and_loses_nothing() {
    let fleet = postgres_fleet().await;
    let proxy = Proxy::start(Proxy::upstream_of(&fleet.database_url)).await;
    let fast = [("KEYWARDEN_HEALTH_CHECK_INTERVAL_MS", "200"), ("KEYWARDEN_DB_ACQUIRE_TIMEOUT_MS", "500")];
    let a = fleet.replica(&proxy.url_for(&fleet.database_url), &fast);
    let mut on_a = clients(a.addr).await;
    let (cached_id, cached) = crate::helpers::create_sales_key(&mut on_a.admin, "cached").await;
    let (_, uncached) = crate::helpers::create_sales_key(&mut on_a.admin, "never verified here").await;
    assert!(allowed(&verify(&mut on_a.verify, &cached).await.unwrap()));

    let running = Arc::new(AtomicBool::new(true));
    let answered = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let load = {
        let (running, answered, failed, cached) =
            (Arc::clone(&running), Arc::clone(&answered), Arc::clone(&failed), cached.clone());
        let mut client = on_a.verify.clone();
        tokio::spawn(async move {
            while running.load(Ordering::SeqCst) {
                match verify(&mut client, &cached).await {
                    Ok(r) if allowed(&r) => answered.fetch_add(1, Ordering::SeqCst),
                    _ => failed.fetch_add(1, Ordering::SeqCst),
                };
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    eventually("the cached key to verify under load", || {
        (answered.load(Ordering::SeqCst) >= 20).then_some(())
    })
    .await;
    proxy.cut();
    let client = on_a.verify.clone();
    let status = until("an unknown key to fail during the outage", || {
        let (mut client, uncached) = (client.clone(), uncached.clone());
        async move { verify(&mut client, &uncached).await.err() }
    })
    .await;
    assert_eq!(status.code(), Code::Unavailable, "an unknown key fails closed");
    let status = on_a
        .admin
        .get_key(pb::GetKeyRequest { merchant_id: MERCHANT.into(), key_id: cached_id.clone() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(health(&mut on_a.health).await, ServingStatus::Serving as i32, "within the staleness bound");
    // The load goes on through the outage before the database returns.
    let during = answered.load(Ordering::SeqCst) + 50;
    eventually("50 cached verifications during the outage", || {
        (answered.load(Ordering::SeqCst) >= during).then_some(())
    })
    .await;
    proxy.restore();
    // No restart: the unknown key verifies once the database is back.
    let request = pb::VerifyRequest { key: uncached.clone(), ..Default::default() };
    verify_until("the unknown key to verify after the outage", &on_a.verify, request, allowed).await;
    running.store(false, Ordering::SeqCst);
    load.await.unwrap();
    let (answered, failed) = (answered.load(Ordering::SeqCst) as i64, failed.load(Ordering::SeqCst));
    eprintln!("cached key during the run: {answered} allowed, {failed} failed");
    assert_eq!(failed, 0, "the cached key kept verifying through the outage");
    // The monitor saw the outage end (the Verify path may have noticed its start first).
    eventually("the replica to see the database back", || a.logged("database reachable again").then_some(()))
        .await;
    stop(a).await;
    let url = &fleet.database_url;
    // The warm-up verify plus every answered one; the failed unknown-key calls wrote nothing.
    let rows = crate::helpers::scalar(
        url,
        &format!("SELECT COUNT(*) FROM audit_events WHERE kind = 'VERIFY' AND api_key_id = '{cached_id}'"),
    )
    .await;
    assert_eq!(rows, answered + 1);
    let count =
        crate::helpers::scalar(url, &format!("SELECT request_count FROM api_keys WHERE id = '{cached_id}'"))
            .await;
    assert_eq!(count, answered + 1);
    fleet.drop().await;
}

async fn past_the_staleness_bound_cached_keys_fail_closed_until_the_database_returns() {
    let fleet = postgres_fleet().await;
    let proxy = Proxy::start(Proxy::upstream_of(&fleet.database_url)).await;
    let env = [
        ("KEYWARDEN_STALENESS_BOUND_MS", "1500"),
        ("KEYWARDEN_HEALTH_CHECK_INTERVAL_MS", "100"),
        ("KEYWARDEN_DB_ACQUIRE_TIMEOUT_MS", "300"),
    ];
    let a = fleet.replica(&proxy.url_for(&fleet.database_url), &env);
    let mut on_a = clients(a.addr).await;
    let (_, key) = crate::helpers::create_sales_key(&mut on_a.admin, "bounded").await;
    assert!(allowed(&verify(&mut on_a.verify, &key).await.unwrap()));
    proxy.cut();
    let cut = Instant::now();
    assert!(allowed(&verify(&mut on_a.verify, &key).await.unwrap()), "served from cache within the bound");
    let client = on_a.verify.clone();
    let status = until("the cached key to fail closed", || {
        let (mut client, key) = (client.clone(), key.clone());
        async move { verify(&mut client, &key).await.err() }
    })
    .await;
    assert_eq!(status.code(), Code::Unavailable, "fails closed past the bound");
    // The bound runs from the last successful health ping, at most one
    // interval (100 ms) before the cut.
    assert!(cut.elapsed() >= Duration::from_millis(1400), "failed closed after {:?}", cut.elapsed());
    let health_client = on_a.health.clone();
    until("health to turn NOT_SERVING past the bound", || {
        let mut client = health_client.clone();
        async move { (health(&mut client).await == ServingStatus::NotServing as i32).then_some(()) }
    })
    .await;
    proxy.restore();
    until("health to recover", || {
        let mut client = health_client.clone();
        async move { (health(&mut client).await == ServingStatus::Serving as i32).then_some(()) }
    })
    .await;
    let request = pb::VerifyRequest { key: key.clone(), ..Default::default() };
    verify_until("the key to verify again", &on_a.verify, request, allowed).await;
    stop(a).await;
    fleet.drop().await;
}

async fn a_replica_that_missed_notices_forgets_its_cache_on_reconnect() {
    let fleet = postgres_fleet().await;
    let (a, b) = (fleet.replica(&fleet.database_url, &[]), fleet.replica(&fleet.database_url, &[]));
    let (mut on_a, mut on_b) = (clients(a.addr).await, clients(b.addr).await);
    let (id, key) = crate::helpers::create_sales_key(&mut on_a.admin, "watched").await;
    assert!(allowed(&verify(&mut on_b.verify, &key).await.unwrap()));

    // A revocation no replica is told about (written behind keywarden's
    // back): B keeps answering from its cache...
    let db = Database::connect(&fleet.database_url).await.unwrap();
    let backend = db.get_database_backend();
    db.execute_raw(Statement::from_string(
        backend,
        format!("UPDATE api_keys SET revoked_at = now() - interval '1 second', version = version + 1 WHERE id = '{id}'"),
    ))
    .await
    .unwrap();
    assert!(allowed(&verify(&mut on_b.verify, &key).await.unwrap()), "B's cache does not know yet");
    // ...until its listener connection is killed: on reconnect it cannot
    // know what it missed, so it drops everything it cached.
    let name = fleet.database_url.rsplit('/').next().unwrap().to_owned();
    let terminate_listeners = || {
        db.execute_raw(Statement::from_string(
            backend,
            format!(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE application_name = '{}' AND datname = '{name}'",
                keywarden::store::LISTENER_APPLICATION
            ),
        ))
    };
    let reconnected = |times: usize| {
        let b = &b;
        until("B's listener to reconnect", move || {
            let enough = b.logged_times("change listener reconnected") >= times;
            async move { enough.then_some(()) }
        })
    };
    terminate_listeners().await.unwrap();
    reconnected(1).await;
    // And a normal revocation made while the listener is down. B may still
    // answer from its cache until it notices the lost connection (at once
    // for a closed socket, within two heartbeats for a half-open one); the
    // notice is missed either way, so only the drop on reconnect saves it.
    let (other_id, other) = crate::helpers::create_sales_key(&mut on_a.admin, "revoked meanwhile").await;
    assert!(allowed(&verify(&mut on_b.verify, &other).await.unwrap()));
    terminate_listeners().await.unwrap();
    revoke(&mut on_a.admin, &other_id).await;
    reconnected(2).await;
    for _ in 0..20 {
        assert_eq!(verify(&mut on_b.verify, &key).await.unwrap().deny_reason, pb::DenyReason::Revoked as i32);
        assert_eq!(
            verify(&mut on_b.verify, &other).await.unwrap().deny_reason,
            pb::DenyReason::Revoked as i32
        );
    }
    db.close().await.ok();
    stop(a).await;
    stop(b).await;
    fleet.drop().await;
}

fn old_row(days_ago: i64, merchant: &str, key: &str) -> AuditRecord {
    let mut r =
        AuditRecord::new(AuditKind::Verify, keywarden::clock::now() - chrono::Duration::days(days_ago), None);
    r.merchant_id = Some(merchant.into());
    r.api_key_id = Some(key.into());
    r.status = Some(401);
    r
}

async fn retention_deletes_only_rows_past_the_limit(backend: Backend) {
    let app = spawn_app_with(backend, |s| {
        s.audit_retention_days = 30;
        s.audit_retention_interval_ms = 100;
    })
    .await;
    let old: Vec<AuditRecord> = (0..12_000).map(|_| old_row(40, MERCHANT, "k-old")).collect();
    let recent: Vec<AuditRecord> = (0..50).map(|_| old_row(29, MERCHANT, "k-recent")).collect();
    for chunk in old.chunks(1000) {
        app.probes.store.insert_audit_batch(chunk).await.unwrap();
    }
    app.probes.store.insert_audit_batch(&recent).await.unwrap();
    let count = |key: &'static str| {
        let url = app.database_url.clone();
        async move {
            crate::helpers::scalar(
                &url,
                &format!("SELECT COUNT(*) FROM audit_events WHERE api_key_id = '{key}'"),
            )
            .await
        }
    };
    until("the old rows to be pruned", || async { (count("k-old").await == 0).then_some(()) }).await;
    assert_eq!(count("k-recent").await, 50);
    app.stop().await;
}

async fn audit_listing_is_served_by_indexes(backend: Backend) {
    let app = spawn_app_with(backend, |s| s.audit_retention_days = 0).await;
    // Enough rows over enough merchants that a full scan would not be chosen
    // by a cost-based planner unless no index fits.
    let rows: Vec<AuditRecord> =
        (0..20_000).map(|i| old_row(i % 30, &format!("m{}", i % 200), &format!("k{}", i % 2_000))).collect();
    for chunk in rows.chunks(1000) {
        app.probes.store.insert_audit_batch(chunk).await.unwrap();
    }
    if app.database_url.starts_with("postgres") {
        let db = Database::connect(&app.database_url).await.unwrap();
        db.execute_raw(Statement::from_string(db.get_database_backend(), "ANALYZE audit_events".to_owned()))
            .await
            .unwrap();
        db.close().await.ok();
    }
    let by_merchant = AuditQuery { merchant_id: Some("m7"), api_key_id: None, start: None, end: None };
    let by_key = AuditQuery { merchant_id: Some("m7"), api_key_id: Some("k7"), start: None, end: None };
    for (query, index) in [(by_merchant, "idx_audit_events_merchant_ts"), (by_key, "idx_audit_events_key_ts")]
    {
        let plan = app.probes.store.explain_list_audit(&query, 51).await.unwrap();
        let shown = plan.join("\n");
        eprintln!("{shown}");
        assert!(plan.iter().any(|line| line.contains(index)), "expected {index} in:\n{shown}");
        // PostgreSQL says "Seq Scan"; SQLite "SCAN audit_events" without "USING … INDEX".
        let full_scan = |line: &String| {
            line.contains("Seq Scan") || (line.contains("SCAN audit_events") && !line.contains("USING"))
        };
        assert!(!plan.iter().any(full_scan), "full scan in:\n{shown}");
    }
    app.stop().await;
}

async fn an_outcome_reported_to_another_replica_lands_on_its_row() {
    let fleet = postgres_fleet().await;
    // A keeps audit rows queued for 3 s, as a busy replica might.
    let a = fleet.replica(&fleet.database_url, &[("KEYWARDEN_AUDIT_LINGER_MS", "3000")]);
    let b = fleet.replica(&fleet.database_url, &[]);
    let (mut on_a, mut on_b) = (clients(a.addr).await, clients(b.addr).await);
    let (_, key) = crate::helpers::create_sales_key(&mut on_a.admin, "load balanced").await;
    let verdict = verify(&mut on_a.verify, &key).await.unwrap();
    let id = verdict.audit_event_id.clone();
    let reported = on_b
        .verify
        .record_outcomes(pb::RecordOutcomesRequest {
            outcomes: vec![pb::Outcome { audit_event_id: id.clone(), status: 201 }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reported.updated, 0, "B cannot know the row yet, so does not count it");
    let url = &fleet.database_url;
    assert_eq!(
        crate::helpers::scalar(url, &format!("SELECT COUNT(*) FROM audit_events WHERE id = '{id}'")).await,
        0,
        "still queued on A"
    );
    assert_eq!(
        crate::helpers::scalar(url, &format!("SELECT COUNT(*) FROM audit_outcomes WHERE event_id = '{id}'"))
            .await,
        1,
        "held"
    );
    let landed = format!("SELECT COUNT(*) FROM audit_events WHERE id = '{id}' AND status = 201");
    until("the held outcome to reach its row", || async {
        (crate::helpers::scalar(url, &landed).await == 1).then_some(())
    })
    .await;
    assert_eq!(
        crate::helpers::scalar(url, "SELECT COUNT(*) FROM audit_outcomes").await,
        0,
        "nothing left held"
    );
    stop(a).await;
    stop(b).await;
    fleet.drop().await;
}

/// A batch whose commit was not acknowledged is retried; rows already there
/// must neither fail the retry forever nor be duplicated, a status reported
/// in between must land, and rows the first attempt did not store must.
async fn an_audit_batch_written_again_is_harmless(backend: Backend) {
    let app = spawn_app_with(backend, |s| s.audit_retention_days = 0).await;
    let mut rows: Vec<AuditRecord> = (0..3).map(|_| old_row(1, MERCHANT, "k-retried")).collect();
    app.probes.store.insert_audit_batch(&rows).await.unwrap();
    rows[0].status = Some(201);
    rows.push(old_row(1, MERCHANT, "k-retried"));
    app.probes.store.insert_audit_batch(&rows).await.unwrap();
    let count = |sql: &'static str| crate::helpers::scalar(&app.database_url, sql);
    assert_eq!(count("SELECT COUNT(*) FROM audit_events WHERE api_key_id = 'k-retried'").await, 4);
    assert_eq!(
        count("SELECT COUNT(*) FROM audit_events WHERE api_key_id = 'k-retried' AND status = 201").await,
        1
    );
    assert_eq!(
        count("SELECT COUNT(*) FROM audit_events WHERE api_key_id = 'k-retried' AND status = 401").await,
        3
    );
    app.stop().await;
}

/// The writer's batches are split into statements of a few fixed sizes
/// (SQLite) or streamed in PostgreSQL's binary COPY format; every row of an
/// odd-sized batch must land once, field for field.
async fn a_large_audit_batch_lands_whole_with_every_field(backend: Backend) {
    let app = spawn_app_with(backend, |s| s.audit_retention_days = 0).await;
    let rows: Vec<AuditRecord> = (0..1_333)
        .map(|i| {
            let mut r = old_row(1, MERCHANT, &format!("k-large-{}", i % 7));
            // Stored timestamps keep microseconds.
            r.timestamp = r.timestamp.trunc_subsecs(6) + chrono::Duration::microseconds(i);
            r.api_key_name = Some(format!("name {i}"));
            r.key_prefix = Some(format!("sntr_{i:011}"));
            r.endpoint = Some(format!("/v1/sales/{i}"));
            r.method = Some("POST".into());
            r.ip = Some(std::net::IpAddr::from([10, 0, (i / 256) as u8, (i % 256) as u8]));
            r.status = Some(200 + (i % 300) as u16);
            r.decision = Some(Decision::Deny);
            r.deny_reason = Some(DenyReason::InsufficientScope);
            r.trace_id = (i % 2 == 0).then(|| format!("{i:032x}"));
            r.detail = Some(format!("detail {i}"));
            r
        })
        .collect();
    app.probes.store.insert_audit_batch(&rows).await.unwrap();
    let query = AuditQuery { merchant_id: Some(MERCHANT), api_key_id: None, start: None, end: None };
    let mut stored =
        app.probes.store.list_audit::<keywarden::audit::AuditRecord>(&query, None, 5_000).await.unwrap();
    stored.sort_by(|a, b| a.id.cmp(&b.id));
    let mut sent = rows.clone();
    sent.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(stored.len(), sent.len());
    for (stored, sent) in stored.iter().zip(&sent) {
        assert_eq!(stored, sent);
    }
    app.stop().await;
}

/// The audit writer retries for as long as the database is away, but
/// shutdown waits for it only until the flush timeout, and then says rows
/// were left unwritten instead of hanging.
async fn shutdown_gives_up_on_a_stuck_audit_write_after_the_flush_timeout(backend: Backend) {
    let mut app = spawn_app_with(backend, |s| {
        s.flush_timeout_ms = 1000;
        s.shutdown_grace_ms = 500;
        // Without a spool: with one, the row would wait on disk instead.
        s.audit_spool_max_bytes = 0;
    })
    .await;
    app.settle().await;
    let lock = crate::helpers::lock_audit_table(&app.database_url).await;
    // A malformed key: an audit row and nothing else to write (no key is
    // identified, so no usage count waits on the locked database too).
    app.verify("sntr_not_a_key", "", "").await;
    eventually("the writer to take the row", || (app.probes.audit.depth() == 0).then_some(())).await;
    let ended = app.stop_within(Duration::from_secs(20)).await;
    let message = format!("{:#}", ended.expect_err("the stuck row is reported"));
    assert!(message.contains("1 audit rows") && message.contains("unwritten"), "{message}");
    if app.database_url.starts_with("postgres") {
        // The abandoned write's backend waits in COPY for data that never
        // comes, and a backend there does not absorb the barrier every
        // DROP DATABASE on the server waits for: other tests' clean-ups
        // would hang until it is gone.
        crate::helpers::execute(
            &app.database_url,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() \
             AND pid <> pg_backend_pid() AND query LIKE 'COPY audit_events%'",
        )
        .await;
    }
    lock.release().await;
    app.stop().await;
}

/// Replicas whose clocks disagree still agree on revocation: it is stamped
/// and judged on the database's clock. The admin replica's clock runs an
/// hour ahead, the verifying replica's an hour behind; compared on their
/// own clocks, the revoked key would verify for two more hours.
async fn replicas_with_skewed_clocks_deny_a_revoked_key_at_once() {
    const HOUR_MS: i64 = 3_600_000;
    let mut ahead =
        spawn_app_over(Backend::postgres(), None, |_| async {}, |s| s.clock_skew_ms = HOUR_MS).await;
    let url = ahead.database_url.clone();
    let behind = spawn_app_over(
        Backend::postgres(),
        None,
        |_| async {},
        |s| {
            s.database_url = Some(url);
            s.clock_skew_ms = -HOUR_MS;
        },
    )
    .await;
    let (revoked, revoked_plaintext) = ahead.key_with_scopes(&["sales:read"]).await;
    let (rotated, rotated_plaintext) = ahead.key_with_scopes(&["sales:read"]).await;
    for key in [&revoked_plaintext, &rotated_plaintext] {
        let r = behind.verify.clone().verify(sales(key)).await.unwrap().into_inner();
        assert!(allowed(&r), "cached on the replica that is behind");
    }

    revoke_and_rotate_then_expect_denials(
        &mut ahead.admin,
        &behind.verify,
        (&revoked.id, &revoked_plaintext),
        (&rotated.id, &rotated_plaintext),
    )
    .await;
    behind.stop().await;
    ahead.stop().await;
}

/// The same agreement with the processes' own clocks two hours apart
/// (libfaketime shifts every wall-clock read of each `keywarden serve`, the
/// monotonic clock left alone), not only the clock keywarden injects for
/// tests: a decision or a stamp that read the wall clock instead of the
/// database's would let the revoked key verify for hours on the replica
/// behind.
async fn processes_whose_clocks_are_hours_apart_agree_on_revocation() {
    let fleet = postgres_fleet().await;
    let faked = |offset: &'static str| {
        [
            ("LD_PRELOAD", env!("KEYWARDEN_TEST_FAKETIME_LIB")),
            ("FAKETIME", offset),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ]
    };
    let ahead = fleet.replica(&fleet.database_url, &faked("+2h"));
    let behind = fleet.replica(&fleet.database_url, &faked("-2h"));
    // The shift took: each logs on its own clock.
    let logged_at = |replica: &Replica| {
        let logs = replica.logs.lock().unwrap();
        let line: serde_json::Value = serde_json::from_str(&logs[0]).unwrap();
        chrono::DateTime::parse_from_rfc3339(line["timestamp"].as_str().unwrap()).unwrap().to_utc()
    };
    let real = chrono::Utc::now();
    assert!((logged_at(&ahead) - real).num_minutes() > 110, "ahead logs at {}", logged_at(&ahead));
    assert!((real - logged_at(&behind)).num_minutes() > 110, "behind logs at {}", logged_at(&behind));

    let (mut on_ahead, mut on_behind) = (clients(ahead.addr).await, clients(behind.addr).await);
    let (revoked_id, revoked) = crate::helpers::create_sales_key(&mut on_ahead.admin, "revoked").await;
    let (rotated_id, rotated) = crate::helpers::create_sales_key(&mut on_ahead.admin, "rotated").await;
    for key in [&revoked, &rotated] {
        assert!(allowed(&verify(&mut on_behind.verify, key).await.unwrap()), "cached on the replica behind");
    }
    revoke_and_rotate_then_expect_denials(
        &mut on_ahead.admin,
        &on_behind.verify,
        (&revoked_id, &revoked),
        (&rotated_id, &rotated),
    )
    .await;
    assert!(ahead.stop().await.success());
    assert!(behind.stop().await.success());
    fleet.drop().await;
}

/// Revokes one key and rotates another (1 s of grace) through `admin`,
/// then expects the replica behind `verify`, which had both cached, to
/// deny the first within 2 s and the second once its grace ends (within
/// 5 s): what holds only if both replicas judge on the database's clock.
async fn revoke_and_rotate_then_expect_denials(
    admin: &mut AdminClient,
    verify: &KeyVerifyClient<Channel>,
    (revoked_id, revoked): (&str, &str),
    (rotated_id, rotated): (&str, &str),
) {
    let denied = |r: &pb::VerifyResponse| outcome(r) == deny(pb::DenyReason::Revoked);
    revoke(admin, revoked_id).await;
    let revoked_at = Instant::now();
    verify_until("the replica behind to deny the revoked key", verify, sales(revoked), denied).await;
    assert!(revoked_at.elapsed() < Duration::from_secs(2), "denied after {:?}", revoked_at.elapsed());
    // A rotation's grace ends on the database's clock too.
    admin
        .regenerate_key(pb::RegenerateKeyRequest {
            merchant_id: MERCHANT.into(),
            key_id: rotated_id.into(),
            grace_period: Some(prost_types::Duration { seconds: 1, nanos: 0 }),
        })
        .await
        .unwrap();
    let rotated_at = Instant::now();
    verify_until("the rotated key's grace to end on the replica behind", verify, sales(rotated), denied)
        .await;
    assert!(rotated_at.elapsed() < Duration::from_secs(5), "denied after {:?}", rotated_at.elapsed());
}

/// A change listener that goes half-open (the proxy holds its traffic
/// without closing anything) is declared dead within two heartbeat
/// intervals. The replica then reads key state through, so a revocation
/// made meanwhile on another replica is obeyed at once; the database is
/// not taken for down; and when traffic flows again it listens again.
async fn a_half_open_listener_is_detected_within_two_heartbeats() {
    const HEARTBEAT: Duration = Duration::from_secs(2);
    // What a busy test machine may add to the detection (the listener's
    // receipt, its timer and this test's polling scheduled late); less
    // than an interval, so the bound tells two intervals from three.
    const SCHEDULING: Duration = Duration::from_millis(1500);
    let Backend::Postgres(server) = Backend::postgres() else { unreachable!() };
    let proxy = Proxy::start(Proxy::upstream_of(&server)).await;
    let held = spawn_app_over(
        Backend::postgres(),
        None,
        |_| async {},
        |s| {
            // In the clear: the proxy reads the startup message's application name.
            s.database_url =
                s.database_url.as_deref().map(|url| format!("{}?sslmode=disable", proxy.url_for(url)));
            s.feed_heartbeat_interval_ms = HEARTBEAT.as_millis() as u64;
        },
    )
    .await;
    let url = held.database_url.clone();
    let mut direct =
        spawn_app_over(Backend::postgres(), None, |_| async {}, |s| s.database_url = Some(url)).await;
    let (key, plaintext) = direct.key_with_scopes(&["sales:read"]).await;
    eventually("the listener to be up", || held.probes.freshness.trusted().then_some(())).await;
    let r = held.verify.clone().verify(sales(&plaintext)).await.unwrap().into_inner();
    assert!(allowed(&r), "cached on the replica whose listener will hang");

    // Silence is counted from the last bytes the listener received (its
    // last heartbeat), which the proxy notes: from there, detection takes
    // two intervals, never less, and three would be past the bound.
    proxy.watch_connections_carrying(keywarden::store::LISTENER_APPLICATION.as_bytes());
    until("a heartbeat to reach the listener", || async { proxy.last_delivered() }).await;
    proxy.stall_connections_carrying(keywarden::store::LISTENER_APPLICATION.as_bytes());
    eventually("the half-open listener to be declared dead", || {
        (!held.probes.freshness.trusted()).then_some(())
    })
    .await;
    let detected = proxy.last_delivered().unwrap().elapsed();
    assert!(
        detected >= HEARTBEAT * 2 && detected <= HEARTBEAT * 2 + SCHEDULING,
        "detected {detected:?} after the last heartbeat heard"
    );
    assert!(held.probes.freshness.database_reachable(), "a dead listener is not a database outage");

    revoke(&mut direct.admin, &key.id).await;
    let revoked = Instant::now();
    let r = held.verify.clone().verify(sales(&plaintext)).await.unwrap().into_inner();
    assert_eq!(outcome(&r), deny(pb::DenyReason::Revoked), "read through while the listener is dead");
    assert!(revoked.elapsed() < Duration::from_secs(1));

    proxy.unstall();
    eventually("the listener to be back", || held.probes.freshness.trusted().then_some(())).await;
    let metrics = crate::helpers::parse_metrics(&held.probes.exporter.render());
    assert!(metrics["keywarden_change_listener_heartbeat_misses_total"] >= 1.0);
    direct.stop().await;
    held.stop().await;
}
