//! What operators touch: the Prometheus endpoint (scraped and parsed), the
//! command-line client against a real server, and logs that never carry a
//! secret.

use std::{process::Command, time::Duration};

use crate::helpers::{ADMIN_TOKEN, Backend, MERCHANT, PEPPER, cli, json, spawn_app, spawn_binary};
use keywarden::api::pb;

backend_tests!(
    metrics_are_valid_openmetrics_and_count_what_happened,
    the_cli_manages_keys_end_to_end,
    logs_name_admin_actions_but_never_a_secret,
);
once_tests!(postgres_connections_are_opened_with_tcp_nodelay_and_keepalive(postgres),);

async fn metrics_are_valid_openmetrics_and_count_what_happened(backend: Backend) {
    // A process of its own: every counter, database errors included, is
    // this one server's.
    let dir = tempfile::tempdir().unwrap();
    let (database_url, postgres) = crate::helpers::fresh_database(&backend, dir.path()).await;
    let replica = spawn_binary(&database_url, dir.path(), &[]);
    let channel = crate::helpers::connect(replica.addr).await;
    let mut admin = crate::helpers::admin_client(channel.clone(), ADMIN_TOKEN);
    let mut verify = keywarden::api::pb::key_verify_client::KeyVerifyClient::new(channel);
    let (_, key) = crate::helpers::create_sales_key(&mut admin, "metrics").await;
    for (key, scope, times) in
        [(key.as_str(), "sales:read", 3), (key.as_str(), "invoice:read", 2), ("sntr_garbage", "", 1)]
    {
        for _ in 0..times {
            let request =
                pb::VerifyRequest { key: key.into(), required_scope: scope.into(), ..Default::default() };
            verify.verify(request).await.unwrap();
        }
    }
    let metrics = replica.metrics.expect("metrics are served");
    // The garbage key belongs to no merchant: it is counted in a rollup
    // row, not queued.
    let (head, body) = crate::helpers::until("the five audit rows to be written", || async {
        let (head, body) = crate::helpers::scrape(metrics).await;
        let written = crate::helpers::parse_metrics(&body).get("keywarden_audit_rows_written_total").copied();
        (written == Some(5.0)).then_some((head, body))
    })
    .await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("application/openmetrics-text"), "{head}");
    let m = crate::helpers::parse_metrics(&body);
    let get = |series: &str| *m.get(series).unwrap_or_else(|| panic!("{series} missing from:\n{body}"));
    assert_eq!(get(r#"keywarden_verify_decisions_total{decision="ALLOW",reason=""}"#), 3.0);
    assert_eq!(get(r#"keywarden_verify_decisions_total{decision="DENY",reason="INSUFFICIENT_SCOPE"}"#), 2.0);
    assert_eq!(get(r#"keywarden_verify_decisions_total{decision="DENY",reason="MALFORMED"}"#), 1.0);
    // Series that have not happened are there at zero, so rate() sees the first one.
    assert_eq!(get(r#"keywarden_verify_decisions_total{decision="DENY",reason="REVOKED"}"#), 0.0);
    assert_eq!(get("keywarden_verify_duration_seconds_count"), 6.0);
    assert_eq!(get("keywarden_scrypt_runs_total"), 1.0, "one to verify the first time");
    assert_eq!(get("keywarden_scrypt_admin_runs_total"), 1.0, "one to create, on KeyAdmin's own thread");
    assert_eq!(get("keywarden_cache_identity_hits_total"), 4.0);
    assert_eq!(get("keywarden_audit_rows_written_total"), 5.0);
    assert_eq!(get("keywarden_audit_rows_dropped_total"), 0.0);
    assert_eq!(get("keywarden_audit_queue_depth"), 0.0);
    assert_eq!(get("keywarden_scrypt_queue_depth"), 0.0);
    assert!(get("keywarden_usage_flush_lag_seconds") < 5.0);
    assert_eq!(get("keywarden_db_errors_total"), 0.0);
    assert_eq!(get("keywarden_cache_trusted"), 1.0);
    assert!(m.contains_key("keywarden_revocation_propagation_seconds_count"));
    every_metric_the_alerts_and_the_dashboard_name_exists(&body);

    // Error answers are counted by code, whichever service gives them.
    for _ in 0..2 {
        let bad = pb::VerifyRequest { key: key.clone(), ip: "not an ip".into(), ..Default::default() };
        assert_eq!(verify.verify(bad).await.unwrap_err().code(), tonic::Code::InvalidArgument);
    }
    let m = crate::helpers::parse_metrics(&crate::helpers::scrape(metrics).await.1);
    assert_eq!(m[r#"keywarden_grpc_errors_total{code="INVALID_ARGUMENT"}"#], 2.0);
    replica.sigterm();
    assert!(replica.exited().await.success());
    crate::helpers::drop_database(postgres).await;
}

async fn the_cli_manages_keys_end_to_end(backend: Backend) {
    let app = spawn_app(backend).await;
    let (out, err) = cli(
        &app,
        &[
            "keys",
            "create",
            "--merchant",
            MERCHANT,
            "--name",
            "CLI bot",
            "--preset",
            "openclaw_skill",
            "--json",
        ],
    );
    assert!(err.contains("shown once"), "warns that the key is shown once: {err}");
    let created = json(&out);
    let key = created["plaintext_key"].as_str().unwrap().to_owned();
    let id = created["api_key"]["id"].as_str().unwrap().to_owned();
    assert!(key.starts_with("sntr_"));
    assert_eq!(
        created["api_key"]["scopes"],
        serde_json::json!(["customer:write", "invoice:write", "sales:read"])
    );

    let (table, _) = cli(&app, &["keys", "list", "--merchant", MERCHANT]);
    assert!(table.starts_with("ID") && table.contains("CLI bot") && table.contains("ACTIVE"), "{table}");
    assert!(!table.contains(&key[16..]), "the secret is never listed");

    let (out, _) = cli(&app, &["verify", "--api-key", &key, "--scope", "invoice:read", "--json"]);
    assert_eq!(json(&out)["decision"], "ALLOW");
    let (out, _) = cli(&app, &["verify", "--api-key", &key, "--scope", "sales:read"]);
    assert!(out.starts_with("ALLOW"), "{out}");

    let (out, _) = cli(
        &app,
        &[
            "keys",
            "update",
            "--merchant",
            MERCHANT,
            &id,
            "--name",
            "CLI bot v2",
            "--allow",
            "10.0.0.0/8",
            "--json",
        ],
    );
    let updated = json(&out);
    assert_eq!(
        (updated["name"].as_str(), updated["allowed_cidrs"][0].as_str()),
        (Some("CLI bot v2"), Some("10.0.0.0/8"))
    );
    let (out, _) = cli(&app, &["keys", "get", "--merchant", MERCHANT, &id, "--json"]);
    assert_eq!(json(&out)["name"], "CLI bot v2");

    let (out, err) =
        cli(&app, &["keys", "regenerate", "--merchant", MERCHANT, &id, "--grace", "1h", "--json"]);
    assert!(err.contains("shown once"));
    let rotated = json(&out);
    assert_eq!(rotated["previous_key"]["status"], "ROTATING");
    let new_id = rotated["api_key"]["id"].as_str().unwrap().to_owned();

    let (out, _) =
        cli(&app, &["keys", "revoke", "--merchant", MERCHANT, &new_id, "--reason", "done", "--json"]);
    assert_eq!(json(&out)["status"], "REVOKED");
    let (out, _) = cli(&app, &["keys", "usage", "--merchant", MERCHANT, &id, "--json"]);
    assert_eq!(json(&out)["request_count"], 2);

    let (out, _) = cli(&app, &["audit", "list", "--merchant", MERCHANT, "--key-id", &id, "--json"]);
    let kinds: Vec<String> = json(&out)["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        kinds.contains(&"KEY_REGENERATED".to_owned()) && kinds.contains(&"VERIFY".to_owned()),
        "{kinds:?}"
    );
    let (table, _) = cli(&app, &["audit", "list", "--merchant", MERCHANT]);
    assert!(table.starts_with("TIME") && table.contains("VERIFY ALLOW"), "{table}");
    assert!(!table.contains("UNSPECIFIED"), "rows without a reason show -: {table}");

    let failed = crate::helpers::output_within(
        Command::new(env!("CARGO_BIN_EXE_keywarden"))
            .args(["keys", "create", "--merchant", MERCHANT, "--name", "x", "--scope", "Invoice:Read"])
            .env("KEYWARDEN_SERVER", format!("http://{}", app.addr))
            .env("KEYWARDEN_ADMIN_TOKEN", ADMIN_TOKEN),
        crate::helpers::CLI_WITHIN,
        "the refused keys create to finish",
    );
    assert!(!failed.status.success());
    let err = String::from_utf8(failed.stderr).unwrap();
    assert!(err.contains("InvalidArgument") && err.contains("scopes"), "{err}");
    assert_eq!(err.matches("unknown scope").count(), 1, "each field is named once: {err}");
    app.stop().await;
}

async fn logs_name_admin_actions_but_never_a_secret(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let (database_url, postgres) = crate::helpers::fresh_database(&backend, dir.path()).await;
    let replica = spawn_binary(&database_url, dir.path(), &[("RUST_LOG", "debug")]);
    let channel = crate::helpers::connect(replica.addr).await;
    let mut admin = crate::helpers::admin_client(channel.clone(), ADMIN_TOKEN);
    let (id, key) = crate::helpers::create_sales_key(&mut admin, "logged").await;
    let (_, operator) =
        crate::helpers::issue_operator(&mut admin, "logged-operator", pb::OperatorRole::Auditor, &[]).await;
    let mut as_operator = crate::helpers::admin_client(channel.clone(), &operator);
    as_operator.list_scopes(pb::ListScopesRequest {}).await.unwrap();
    let wrong_operator = crate::helpers::wrong_secret(&operator, 1);
    let refused = crate::helpers::admin_client(channel.clone(), &wrong_operator)
        .list_scopes(pb::ListScopesRequest {})
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    let mut verify = pb::key_verify_client::KeyVerifyClient::new(channel);
    verify.verify(pb::VerifyRequest { key: key.clone(), ..Default::default() }).await.unwrap();
    admin
        .revoke_key(pb::RevokeKeyRequest {
            merchant_id: MERCHANT.into(),
            key_id: id.clone(),
            reason: "test".into(),
        })
        .await
        .unwrap();
    let logs = std::sync::Arc::clone(&replica.logs);
    assert!(replica.stop().await.success());
    let logs = logs.lock().unwrap().join("\n");
    for action in ["key created", "key revoked", "operator token created"] {
        let line = logs.lines().find(|l| l.contains(action)).unwrap_or_else(|| panic!("no {action:?} line"));
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["actor"].as_str(), Some("admin"), "{line}");
        if action.starts_with("key") {
            assert_eq!(v["key_id"].as_str(), Some(id.as_str()), "{line}");
        }
    }
    assert!(logs.contains("KeyAdmin call unauthenticated"), "the refusal was not logged");
    for secret in [&key[16..], &operator[16..], &wrong_operator[16..], ADMIN_TOKEN, PEPPER] {
        assert!(!logs.contains(secret), "a secret reached the logs");
    }
    crate::helpers::drop_database(postgres).await;
}

/// sqlx 0.9.0 stopped setting TCP_NODELAY on PostgreSQL sockets, and never
/// set TCP keepalive (vendor/README.md); without the first every write
/// longer than one segment waits for the server's delayed ACK, without the
/// second a half-open connection is never noticed. The options are read off
/// the pooled connection's own socket, found by the client port PostgreSQL
/// reports.
async fn postgres_connections_are_opened_with_tcp_nodelay_and_keepalive() {
    use rustix::net::sockopt;
    let Backend::Postgres(url) = Backend::postgres() else { unreachable!("postgres() is PostgreSQL") };
    let store = keywarden::store::Store::connect(&url, &Default::default()).await.unwrap();
    // The change listener's pool: a LISTEN connection waits on reads.
    let pool = store.listen_pool().expect("a PostgreSQL store has a pool of its own");
    let mut connection = pool.acquire().await.unwrap();
    let port: i32 =
        sea_orm::sqlx::query_scalar("SELECT inet_client_port()").fetch_one(&mut *connection).await.unwrap();
    let socket = own_tcp_socket(u16::try_from(port).unwrap());
    assert!(sockopt::tcp_nodelay(&socket).unwrap(), "TCP_NODELAY is off on the pooled socket");
    // A server gone without closing is found by the kernel within
    // 10 s + 3 × 5 s of silence, not never.
    assert!(sockopt::socket_keepalive(&socket).unwrap(), "SO_KEEPALIVE is off on the pooled socket");
    assert_eq!(sockopt::tcp_keepidle(&socket).unwrap(), Duration::from_secs(10));
    assert_eq!(sockopt::tcp_keepintvl(&socket).unwrap(), Duration::from_secs(5));
    assert_eq!(sockopt::tcp_keepcnt(&socket).unwrap(), 3);
    drop(connection);
    store.close().await;
}

/// A duplicate of this process's TCP socket bound to `local_port`: its inode
/// from /proc/net/tcp{,6}, its descriptor from /proc/self/fd, duplicated
/// through a pidfd (no unsafe code needed to borrow it).
fn own_tcp_socket(local_port: u16) -> std::os::fd::OwnedFd {
    use rustix::process::{PidfdFlags, PidfdGetfdFlags, getpid, pidfd_getfd, pidfd_open};
    let tables = ["/proc/net/tcp", "/proc/net/tcp6"].map(|p| std::fs::read_to_string(p).unwrap_or_default());
    let inode = tables
        .iter()
        .flat_map(|table| table.lines().skip(1))
        .find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let port = u16::from_str_radix(fields.get(1)?.rsplit(':').next()?, 16).ok()?;
            (port == local_port).then(|| fields.get(9).map(|s| (*s).to_owned())).flatten()
        })
        .unwrap_or_else(|| panic!("no socket on local port {local_port} in /proc/net/tcp"));
    let target = format!("socket:[{inode}]");
    let fd = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(Result::ok)
        .find(|entry| {
            std::fs::read_link(entry.path()).is_ok_and(|link| link.to_str() == Some(target.as_str()))
        })
        .and_then(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .unwrap_or_else(|| panic!("no descriptor of this process is {target}"));
    let me = pidfd_open(getpid(), PidfdFlags::empty()).unwrap();
    pidfd_getfd(&me, fd, PidfdGetfdFlags::empty()).unwrap()
}

/// Every `keywarden_*` metric the chart's alerts and dashboard name is one
/// this server exports: a sample, or a family declared in the exposition
/// (a labelled counter has no sample until its first event).
fn every_metric_the_alerts_and_the_dashboard_name_exists(exposition: &str) {
    let chart = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("helm/keywarden/files");
    let mut named = std::collections::BTreeSet::new();
    for file in ["alerts.yaml", "dashboard.json"] {
        let text = std::fs::read_to_string(chart.join(file)).unwrap();
        let mut rest = text.as_str();
        while let Some(at) = rest.find("keywarden_") {
            let name: String = rest[at..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            rest = &rest[at + name.len()..];
            named.insert(name);
        }
    }
    assert!(named.len() > 10, "names found: {named:?}");
    let families: Vec<&str> =
        exposition.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next()).collect();
    let samples = crate::helpers::parse_metrics(exposition);
    for name in &named {
        let sampled = samples.keys().any(|s| s == name || s.starts_with(&format!("{name}{{")));
        let declared = families.iter().any(|family| {
            ["", "_total", "_bucket", "_count", "_sum"]
                .iter()
                .any(|suffix| format!("{family}{suffix}") == *name)
        });
        assert!(sampled || declared, "{name} is named by the chart's alerts or dashboard but not exported");
    }
}
