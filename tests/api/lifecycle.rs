//! The real binary under signals: SIGTERM drains in-flight calls and flushes
//! every usage count and audit row before exiting 0.

use std::{process::Command, time::Duration};

use crate::helpers::{
    ADMIN_TOKEN, Backend, PEPPER, admin_client, connect, eventually, output_within, spawn_binary,
    spawn_embedded,
};
use keywarden::api::pb::{self, key_verify_client::KeyVerifyClient};

/// How long `serve` may take to refuse a bad setting: it refuses before
/// binding anything, so a run this long means the setting was accepted.
const REFUSED_WITHIN: Duration = Duration::from_secs(30);

backend_tests!(
    sigterm_answers_calls_in_flight_and_flushes_every_usage_count_and_audit_row,
    migrate_command_prepares_the_schema_alone,
    shutdown_turns_health_not_serving_before_the_server_goes,
    an_open_health_watch_does_not_hold_shutdown,
    a_killed_background_task_is_restarted_and_the_replica_is_not_ready_meanwhile,
    a_background_task_that_keeps_failing_stops_the_process_with_an_error,
);
once_tests!(
    draining_refuses_new_connections_while_the_health_port_reports_not_serving,
    the_embedded_data_directory_is_private_to_its_owner,
);

async fn sigterm_answers_calls_in_flight_and_flushes_every_usage_count_and_audit_row(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let (database_url, postgres) = crate::helpers::fresh_database(&backend, dir.path()).await;
    // Usage would only reach the database at shutdown: the final flush is
    // what is tested. One scrypt thread, so that cold calls queue.
    let replica = spawn_binary(
        &database_url,
        dir.path(),
        &[("KEYWARDEN_USAGE_FLUSH_INTERVAL_MS", "3600000"), ("KEYWARDEN_HASH_WORKERS", "1")],
    );
    let channel = connect(replica.addr).await;
    let mut admin = admin_client(channel.clone(), ADMIN_TOKEN);
    let (key_id, plaintext) = crate::helpers::create_sales_key(&mut admin, "load").await;

    const TASKS: usize = 8;
    const PER_TASK: usize = 40;
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let mut client = KeyVerifyClient::new(channel.clone());
        let plaintext = plaintext.clone();
        tasks.push(tokio::spawn(async move {
            let mut denied = 0;
            for i in 0..PER_TASK {
                // Every fifth call asks for a scope the key lacks.
                let scope = if (t + i) % 5 == 0 { "invoice:write" } else { "sales:read" };
                let r = client
                    .verify(pb::VerifyRequest {
                        key: plaintext.clone(),
                        required_scope: scope.into(),
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner();
                if r.decision == pb::Decision::Deny as i32 {
                    denied += 1;
                }
            }
            denied
        }));
    }
    let mut denied = 0;
    for t in tasks {
        denied += t.await.unwrap();
    }
    let total = (TASKS * PER_TASK) as i64;
    // The gate: three calls provably mid-scrypt when SIGTERM lands, which
    // must each finish with its answer and its audit row.
    let in_flight = crate::helpers::hold_cold_calls(&replica, &plaintext, 3).await;
    replica.sigterm();
    for call in in_flight {
        let answered = call.await.unwrap().expect("a call mid-scrypt at SIGTERM is answered, not dropped");
        assert_eq!(answered.into_inner().deny_reason, pb::DenyReason::NotFound as i32);
    }
    let status = replica.exited().await;
    assert!(status.success(), "exit status {status:?}");

    let verify_rows =
        crate::helpers::scalar(&database_url, "SELECT COUNT(*) FROM audit_events WHERE kind = 'VERIFY'")
            .await;
    assert_eq!(verify_rows, total + 3, "one audit row per Verify, those in flight at SIGTERM included");
    let requests = crate::helpers::scalar(
        &database_url,
        &format!("SELECT request_count FROM api_keys WHERE id = '{key_id}'"),
    )
    .await;
    let denials = crate::helpers::scalar(
        &database_url,
        &format!("SELECT denied_count FROM api_keys WHERE id = '{key_id}'"),
    )
    .await;
    // The three wrong secrets were tried against this key: its merchant
    // sees them as denials of the key.
    assert_eq!((requests, denials), (total - denied, denied + 3));
    assert!(denied > 0);
    crate::helpers::drop_database(postgres).await;
}

async fn migrate_command_prepares_the_schema_alone(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let (database_url, postgres) = crate::helpers::fresh_database(&backend, dir.path()).await;
    // Serving without migrations on an empty database must refuse, clearly.
    let refused = output_within(
        Command::new(env!("CARGO_BIN_EXE_keywarden"))
            .arg("serve")
            .env("KEYWARDEN_LISTEN_ADDR", "127.0.0.1:0")
            .env("KEYWARDEN_DATABASE_URL", &database_url)
            .env("KEYWARDEN_PEPPER", PEPPER)
            .env("KEYWARDEN_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("KEYWARDEN_MIGRATE_ON_START", "false"),
        REFUSED_WITHIN,
        "serve to refuse an unmigrated database",
    );
    assert!(!refused.status.success());
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(message.contains("keywarden migrate"), "{message}");

    let migrated = output_within(
        Command::new(env!("CARGO_BIN_EXE_keywarden"))
            .arg("migrate")
            .env("KEYWARDEN_DATABASE_URL", &database_url),
        crate::helpers::CLI_WITHIN,
        "keywarden migrate to finish",
    );
    assert!(migrated.status.success(), "{}", String::from_utf8_lossy(&migrated.stderr));
    let replica = spawn_binary(&database_url, dir.path(), &[("KEYWARDEN_MIGRATE_ON_START", "false")]);
    let addr = replica.addr;
    let mut admin = admin_client(connect(addr).await, ADMIN_TOKEN);
    assert!(admin.list_scopes(pb::ListScopesRequest {}).await.is_ok());
    assert!(replica.stop().await.success());
    crate::helpers::drop_database(postgres).await;
}

/// A malformed secret setting stops the binary with an error that names the
/// setting and contains no part of its value, whichever way it is wrong.
#[test]
fn a_malformed_secret_setting_is_named_but_never_printed() {
    let dir = tempfile::tempdir().unwrap();
    let secret = "s3cr3t-d0-not-print";
    for (setting, value) in [
        ("KEYWARDEN_ADMIN_TOKENS", secret.to_owned()),
        ("KEYWARDEN_ADMIN_TOKENS", format!("{{ops = [\"{secret}\"]}}")),
        ("KEYWARDEN_PEPPER", format!("{secret}!!")),
        ("KEYWARDEN_PEPPER", format!("[\"{secret}\"]")),
        ("KEYWARDEN_ADMIN_TOKEN", "s3cr3t".to_owned()),
        ("KEYWARDEN_DATABASE_URL", format!("postgres://kw:{secret}@127.0.0.1:notaport/kw")),
    ] {
        let refused = output_within(
            Command::new(env!("CARGO_BIN_EXE_keywarden"))
                .arg("serve")
                .env_clear()
                .env("KEYWARDEN_DATA_DIR", dir.path())
                .env("KEYWARDEN_LISTEN_ADDR", "127.0.0.1:0")
                .env("KEYWARDEN_METRICS_ADDR", "127.0.0.1:0")
                .env("KEYWARDEN_PEPPER", PEPPER)
                .env("KEYWARDEN_ADMIN_TOKEN", ADMIN_TOKEN)
                .env(setting, &value),
            REFUSED_WITHIN,
            &format!("serve to refuse {setting}"),
        );
        let output = format!(
            "{}{}",
            String::from_utf8_lossy(&refused.stdout),
            String::from_utf8_lossy(&refused.stderr)
        );
        assert!(!refused.status.success(), "{setting}={value} was accepted: {output}");
        let named = setting.trim_start_matches("KEYWARDEN_");
        assert!(
            output.to_lowercase().contains(&named.to_lowercase()) || output.contains("database"),
            "{output}"
        );
        assert!(!output.contains("s3cr3t"), "{setting}: the value is in the error: {output}");
    }
}

/// A Watch stream left open by a client (a probe, a sidecar) ends with
/// NOT_SERVING when shutdown begins instead of holding the drain open until
/// the grace period runs out.
async fn an_open_health_watch_does_not_hold_shutdown(backend: Backend) {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let mut app = crate::helpers::spawn_app_with(backend, |s| s.shutdown_grace_ms = 60_000).await;
    let mut health = HealthClient::new(app.channel());
    let mut watch = health.watch(HealthCheckRequest { service: String::new() }).await.unwrap().into_inner();
    assert_eq!(watch.message().await.unwrap().unwrap().status, ServingStatus::Serving as i32);
    let started = std::time::Instant::now();
    app.stop_within(std::time::Duration::from_secs(20)).await.unwrap();
    assert!(started.elapsed() < std::time::Duration::from_secs(20), "waited for the grace period");
    assert_eq!(watch.message().await.unwrap().unwrap().status, ServingStatus::NotServing as i32);
    assert!(watch.message().await.unwrap().is_none(), "the stream ended");
    app.stop().await;
}

async fn shutdown_turns_health_not_serving_before_the_server_goes(backend: Backend) {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let app = crate::helpers::spawn_app(backend).await;
    let mut health = HealthClient::new(app.channel());
    let mut watch = health.watch(HealthCheckRequest { service: String::new() }).await.unwrap().into_inner();
    assert_eq!(watch.message().await.unwrap().unwrap().status, ServingStatus::Serving as i32);
    let liveness =
        health.check(HealthCheckRequest { service: "liveness".into() }).await.unwrap().into_inner();
    assert_eq!(liveness.status, ServingStatus::Serving as i32);
    let stopping = tokio::spawn(app.stop());
    let next = tokio::time::timeout(std::time::Duration::from_secs(5), watch.message()).await.unwrap();
    assert_eq!(next.unwrap().unwrap().status, ServingStatus::NotServing as i32);
    drop(watch);
    stopping.await.unwrap();
}

/// During the drain the plaintext health port keeps answering (readiness
/// NOT_SERVING, liveness SERVING) while the gRPC port refuses new
/// connections, so clients go elsewhere at once instead of being accepted
/// and then reset; calls already in flight are still answered.
async fn draining_refuses_new_connections_while_the_health_port_reports_not_serving() {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let dir = tempfile::tempdir().unwrap();
    let replica = spawn_embedded(
        dir.path(),
        &[
            ("KEYWARDEN_HASH_WORKERS", "1"),
            ("KEYWARDEN_HEALTH_LISTEN_ADDR", "127.0.0.1:0"),
            // Twenty wrong secrets on one prefix: past the default guess
            // limit, which would answer half of them at once.
            ("KEYWARDEN_THROTTLE_FAILURES_PER_PREFIX", "0"),
        ],
    );
    let token = std::fs::read_to_string(dir.path().join("admin-token")).unwrap();
    let mut admin = crate::helpers::admin_client(crate::helpers::connect(replica.addr).await, token.trim());
    let (_, key) = crate::helpers::create_sales_key(&mut admin, "drained").await;
    // Twenty wrong secrets queued on one scrypt thread keep the drain busy.
    let gated = crate::helpers::hold_cold_calls(&replica, &key, 20).await;
    let health_port = replica.health.expect("the health listener was announced");
    let health = HealthClient::new(
        tonic::transport::Channel::from_shared(format!("http://{health_port}")).unwrap().connect_lazy(),
    );
    replica.sigterm();
    crate::helpers::until("readiness NOT_SERVING on the health port", || {
        let mut health = health.clone();
        async move {
            let status = health.check(HealthCheckRequest::default()).await.ok()?.into_inner().status;
            (status == ServingStatus::NotServing as i32).then_some(())
        }
    })
    .await;
    crate::helpers::until("the gRPC port to refuse new connections", || async {
        tokio::net::TcpStream::connect(replica.addr).await.is_err().then_some(())
    })
    .await;
    let mut live = health.clone();
    let liveness = live.check(HealthCheckRequest { service: "liveness".into() }).await.unwrap().into_inner();
    assert_eq!(liveness.status, ServingStatus::Serving as i32, "liveness during the drain");
    assert!(gated.iter().any(|call| !call.is_finished()), "the drain ended before the checks ran");
    for call in gated {
        let answered = call.await.unwrap().expect("a call accepted before SIGTERM is answered");
        assert_eq!(answered.into_inner().deny_reason, pb::DenyReason::NotFound as i32);
    }
    assert!(replica.exited().await.success());
}

/// The README's first command keeps key hashes, the audit trail and the
/// generated secrets from other local users: the data directory is 0700 and
/// every file in it that holds them 0600, from the first run on; a later run
/// tightens what was loosened, and names it.
async fn the_embedded_data_directory_is_private_to_its_owner() {
    use std::os::unix::fs::PermissionsExt;
    let parent = tempfile::tempdir().unwrap();
    let data = parent.path().join("keywarden-data");
    let mode = |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    let private = ["keywarden.db", "keywarden.db-wal", "keywarden.db-shm", "pepper", "admin-token"];
    let assert_private = || {
        assert_eq!(mode(&data), 0o700, "{}", data.display());
        for file in private {
            // The WAL and shared-memory files exist while the server runs.
            assert_eq!(mode(&data.join(file)), 0o600, "{file}");
        }
    };

    let first = spawn_embedded(&data, &[]);
    assert_private();
    first.sigterm();
    assert!(first.exited().await.success());

    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    for file in ["keywarden.db", "pepper"] {
        std::fs::set_permissions(data.join(file), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let second = spawn_embedded(&data, &[]);
    assert_private();
    for loosened in [data.clone(), data.join("keywarden.db"), data.join("pepper")] {
        let named = loosened.display().to_string();
        eventually(&format!("a warning naming {named}"), || {
            second
                .logs
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.contains("tightened to owner-only") && l.contains(&format!("\"{named}\"")))
                .then_some(())
        })
        .await;
    }
    second.sigterm();
    assert!(second.exited().await.success());
}

/// Killing a background task (the audit writer; on PostgreSQL also the
/// change feed) turns readiness NOT_SERVING until the supervisor has
/// restarted it; liveness stays SERVING, and the restarted task does its
/// work: rows queued meanwhile are written, the feed listens again.
async fn a_killed_background_task_is_restarted_and_the_replica_is_not_ready_meanwhile(backend: Backend) {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let postgres = matches!(backend, Backend::Postgres(_));
    // A restart delay long enough to observe.
    let mut app = crate::helpers::spawn_app_with(backend, |s| s.task_restart_backoff_ms = 1_000).await;
    let (_, key) = app.key_with_scopes(&["sales:read"]).await;
    let mut health = HealthClient::new(app.channel());
    let mut watch = health.watch(HealthCheckRequest { service: String::new() }).await.unwrap().into_inner();
    assert_eq!(watch.message().await.unwrap().unwrap().status, ServingStatus::Serving as i32);

    let mut tasks = vec!["audit writer"];
    if postgres {
        tasks.push("change feed");
    }
    for task in tasks {
        assert!(app.probes.tasks.kill(task), "{task} is running");
        let next = tokio::time::timeout(std::time::Duration::from_secs(5), watch.message()).await.unwrap();
        assert_eq!(next.unwrap().unwrap().status, ServingStatus::NotServing as i32, "{task} down");
        let liveness =
            health.check(HealthCheckRequest { service: "liveness".into() }).await.unwrap().into_inner();
        assert_eq!(liveness.status, ServingStatus::Serving as i32, "the process itself is alive");
        // Verify keeps answering meanwhile; its row waits in the queue.
        let r = app.verify(&key, "", "sales:read").await;
        let next = tokio::time::timeout(std::time::Duration::from_secs(10), watch.message()).await.unwrap();
        assert_eq!(next.unwrap().unwrap().status, ServingStatus::Serving as i32, "{task} restarted");
        app.settle().await;
        let stored = format!("SELECT COUNT(*) FROM audit_events WHERE id = '{}'", r.audit_event_id);
        assert_eq!(crate::helpers::scalar(&app.database_url, &stored).await, 1, "after {task}'s restart");
        let metrics = crate::helpers::parse_metrics(&app.probes.exporter.render());
        assert_eq!(metrics[&format!("keywarden_task_restarts_total{{task=\"{task}\"}}")], 1.0);
    }
    if postgres {
        eventually("the restarted feed to listen", || app.probes.freshness.trusted().then_some(())).await;
    }
    app.stop().await;
}

/// A task that fails more often than `task_restart_limit` within a minute
/// is given up on: the replica drains and the run ends in an error naming
/// the task, so the process exits non-zero and Kubernetes restarts it.
async fn a_background_task_that_keeps_failing_stops_the_process_with_an_error(backend: Backend) {
    let mut app = crate::helpers::spawn_app_with(backend, |s| {
        s.task_restart_backoff_ms = 10;
        s.task_restart_limit = 2;
    })
    .await;
    for _ in 0..3 {
        let tasks = app.probes.tasks.clone();
        crate::helpers::until("the retention task to be running", || {
            let tasks = tasks.clone();
            async move { tasks.kill("audit retention").then_some(()) }
        })
        .await;
    }
    let ended = app.ended_within(std::time::Duration::from_secs(30)).await;
    let error = ended.expect_err("the run ends in an error");
    assert!(error.to_string().contains("audit retention"), "{error:#}");
    app.stop().await;
}
