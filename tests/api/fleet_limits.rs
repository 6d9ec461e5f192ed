//! Fleet-wide rate limits (issue 23, `rate_limit_mode = "redis"`): replicas
//! share one bucket per limit through a real Redis, each holding a lease of
//! at most ⌈limit / 16⌉ tokens, and a Redis outage follows
//! `rate_limit_on_redis_failure`.

use std::time::{Duration, Instant};

use keywarden::{
    api::pb::{self, key_verify_client::KeyVerifyClient},
    config::{OnRedisFailure, RateLimitMode},
    limiter::leased::lease_size,
};

use crate::helpers::{
    Backend, MERCHANT, Proxy, Replica, TestApp, allowed, connect, deny, fleet_secret, metrics_of, outcome,
    redis_url, sales, spawn_app_on, spawn_app_with, spawn_binary, until,
};

backend_tests!(a_redis_outage_follows_the_configured_failure_mode_and_is_logged_once);
once_tests!(
    three_replicas_share_one_limit_of_100_per_minute_within_the_documented_overshoot(
        postgres,
        current_thread
    ),
    leases_work_against_a_redis_cluster,
    a_redis_behind_tls_and_a_password_is_reached_through_the_settings,
);

fn per(limit: u32, window: Duration) -> pb::RateLimit {
    pb::RateLimit {
        name: "fleet".into(),
        limit,
        window: Some(prost_types::Duration { seconds: window.as_secs() as i64, nanos: 0 }),
    }
}

async fn limited_key(app: &mut TestApp, limit: pb::RateLimit) -> String {
    app.create_key(pb::CreateKeyRequest {
        merchant_id: MERCHANT.into(),
        name: "fleet-limited".into(),
        scopes: vec!["sales:read".into()],
        rate_limits: vec![limit],
        ..Default::default()
    })
    .await
    .1
}

async fn three_replicas_share_one_limit_of_100_per_minute_within_the_documented_overshoot() {
    let (url, secret) = (redis_url(), fleet_secret());
    let fleet = |settings: &mut keywarden::config::Settings| {
        settings.redis_url = Some(url.clone().into());
        settings.fleet_secret = Some(secret.clone().into());
        settings.rate_limit_mode = Some(RateLimitMode::Redis);
    };
    let mut a = spawn_app_with(Backend::postgres(), fleet).await;
    let b = spawn_app_on(&a, fleet).await;
    let c = spawn_app_on(&a, fleet).await;
    let key = limited_key(&mut a, per(100, Duration::from_secs(60))).await;

    // 300 calls, in rounds of 15 concurrent ones spread evenly over the
    // three replicas.
    let clients = [a.verify.clone(), b.verify.clone(), c.verify.clone()];
    let started = Instant::now();
    let mut admitted = 0;
    let mut refused = 0;
    for _ in 0..20 {
        let mut calls = tokio::task::JoinSet::new();
        for i in 0..15 {
            let mut client = clients[i % 3].clone();
            let request = sales(&key);
            calls.spawn(async move { client.verify(request).await.unwrap().into_inner() });
        }
        for r in calls.join_all().await {
            let status = r.rate_limit.clone().expect("a limited key reports its limit");
            if outcome(&r) == allowed() {
                admitted += 1;
            } else {
                assert_eq!(outcome(&r), deny(pb::DenyReason::RateLimited));
                assert_eq!(status.remaining, 0, "a refusal has nothing left");
                refused += 1;
            }
        }
    }
    let elapsed = started.elapsed();

    // The documented bound (ADR 38): what one exact bucket admits over the
    // span (the burst plus its refill), plus one lease per replica.
    let refill = (elapsed.as_secs_f64() * 100.0 / 60.0).ceil() as u32;
    let bound = 100 + refill + 3 * lease_size(100);
    assert!(admitted >= 100, "the fleet admitted {admitted}: at least the limit");
    assert!(admitted <= bound, "the fleet admitted {admitted} in {elapsed:?}: more than {bound}");
    assert_eq!(admitted + refused, 300);

    for app in [c, b, a] {
        app.stop().await;
    }
}

/// A replica whose Redis is reached through `proxy`, with this failure mode.
fn replica_via(database_url: &str, dir: &std::path::Path, proxy: &Proxy, mode: &str) -> Replica {
    let redis = proxy.url_for(&format!("{}/", redis_url().trim_end_matches('/')));
    spawn_binary(
        database_url,
        dir,
        &[
            ("KEYWARDEN_REDIS_URL", &redis),
            ("KEYWARDEN_FLEET_SECRET", &fleet_secret()),
            ("KEYWARDEN_RATE_LIMIT_MODE", "redis"),
            ("KEYWARDEN_RATE_LIMIT_ON_REDIS_FAILURE", mode),
        ],
    )
}

async fn metric(replica: &Replica, series: &str) -> f64 {
    let metrics = metrics_of(replica.metrics.expect("metrics are served")).await;
    *metrics.get(series).unwrap_or_else(|| panic!("{series} missing"))
}

async fn a_redis_outage_follows_the_configured_failure_mode_and_is_logged_once(backend: Backend) {
    let mut app = spawn_app_with(backend, |_| {}).await;
    let redis = Proxy::upstream_of_redis(&redis_url());
    for mode in [OnRedisFailure::Local, OnRedisFailure::Open, OnRedisFailure::Closed] {
        let name = format!("{mode:?}").to_lowercase();
        let proxy = Proxy::start(redis).await;
        let dir = tempfile::tempdir().unwrap();
        let replica = replica_via(&app.database_url, dir.path(), &proxy, &name);
        let mut client = KeyVerifyClient::new(connect(replica.addr).await);

        // With Redis up, a limited key leases its tokens from it.
        let healthy = limited_key(&mut app, per(3, Duration::from_secs(10))).await;
        until("the replica to lease from Redis", || {
            let (mut client, request) = (client.clone(), sales(&healthy));
            async move { (outcome(&client.verify(request).await.ok()?.into_inner()) == allowed()).then_some(()) }
        })
        .await;
        assert!(metric(&replica, "keywarden_rate_limit_lease_refills_total").await >= 1.0, "{name}");

        // Redis goes away: a key this replica holds nothing of decides as
        // the mode says, five calls against a limit of three.
        proxy.cut();
        let key = limited_key(&mut app, per(3, Duration::from_secs(10))).await;
        let mut outcomes = Vec::new();
        for _ in 0..5 {
            outcomes.push(outcome(&client.verify(sales(&key)).await.unwrap().into_inner()));
        }
        let limited = deny(pb::DenyReason::RateLimited);
        let expected = match mode {
            OnRedisFailure::Local => vec![allowed(), allowed(), allowed(), limited, limited],
            OnRedisFailure::Open => vec![allowed(); 5],
            OnRedisFailure::Closed => vec![limited; 5],
        };
        assert_eq!(outcomes, expected, "{name}");
        assert_eq!(metric(&replica, "keywarden_rate_limit_fallback_decisions_total").await, 5.0, "{name}");
        assert_eq!(metric(&replica, "keywarden_rate_limit_degraded").await, 1.0, "{name}");
        let warning = "rate limits cannot lease from Redis";
        let warnings = replica.logs.lock().unwrap().iter().filter(|l| l.contains(warning)).count();
        assert_eq!(warnings, 1, "{name}: one line per transition, not per call");

        // Redis comes back: within a retry the key leases again.
        proxy.restore();
        if mode == OnRedisFailure::Closed {
            until("the closed key to be admitted once Redis answers", || {
                let (mut client, request) = (client.clone(), sales(&key));
                async move {
                    (outcome(&client.verify(request).await.ok()?.into_inner()) == allowed()).then_some(())
                }
            })
            .await;
        }
        until("the replica to lease from Redis again", || {
            let (mut client, request) = (client.clone(), sales(&healthy));
            let replica = &replica;
            async move {
                client.verify(request).await.ok()?;
                replica.logged("rate limits lease from Redis again").then_some(())
            }
        })
        .await;
        assert_eq!(metric(&replica, "keywarden_rate_limit_degraded").await, 0.0, "{name}");
        replica.sigterm();
        replica.exited().await;
    }
    app.stop().await;
}

/// A three-node Redis Cluster of this test's own (redis-server and
/// redis-cli, which `.ci/run` installs), stopped when dropped.
struct RedisCluster {
    nodes: Vec<std::process::Child>,
    ports: Vec<u16>,
    _dir: tempfile::TempDir,
}

impl RedisCluster {
    fn start() -> Self {
        use std::process::{Command, Stdio};
        let dir = tempfile::tempdir().unwrap();
        // Ports whose cluster bus (port + 10000) is free too.
        let mut ports = Vec::new();
        while ports.len() < 3 {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let port = l.local_addr().unwrap().port();
            if port < 55_000 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
                ports.push(port);
            }
        }
        let nodes = ports
            .iter()
            .map(|port| {
                Command::new("redis-server")
                    .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--cluster-enabled", "yes"])
                    .args([
                        "--cluster-config-file",
                        &format!("nodes-{port}.conf"),
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                    ])
                    .current_dir(dir.path())
                    .stdout(Stdio::null())
                    .spawn()
                    .expect("redis-server runs (.ci/run installs it)")
            })
            .collect();
        let cluster = Self { nodes, ports, _dir: dir };
        let addrs: Vec<String> = cluster.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let created = Command::new("redis-cli")
                .args(["--cluster", "create"])
                .args(&addrs)
                .args(["--cluster-replicas", "0", "--cluster-yes"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if created {
                break;
            }
            assert!(Instant::now() < deadline, "the cluster was not created");
            std::thread::sleep(Duration::from_millis(200));
        }
        while !cluster.ports.iter().all(|p| {
            let info = crate::helpers::output_within(
                Command::new("redis-cli").args(["-p", &p.to_string(), "cluster", "info"]),
                Duration::from_secs(10),
                "redis-cli cluster info to answer",
            );
            String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok")
        }) {
            assert!(Instant::now() < deadline, "the cluster did not come up");
            std::thread::sleep(Duration::from_millis(100));
        }
        cluster
    }

    fn seed_url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.ports[0])
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            let _ = node.kill();
            let _ = node.wait();
        }
    }
}

/// Waits for `key`'s first admitted call (with `closed`, only a lease from
/// Redis admits; the connection opens in the background), then makes three
/// more and returns their outcomes.
async fn first_lease_then_three_calls(app: &TestApp, key: &str) -> Vec<(i32, i32)> {
    until("the first call to lease from Redis", || {
        let (mut client, request) = (app.verify.clone(), sales(key));
        async move { (outcome(&client.verify(request).await.ok()?.into_inner()) == allowed()).then_some(()) }
    })
    .await;
    let mut outcomes = Vec::new();
    for _ in 0..3 {
        outcomes.push(outcome(&app.verify.clone().verify(sales(key)).await.unwrap().into_inner()));
    }
    outcomes
}

/// The client's cluster mode against a real Redis Cluster: a key's two
/// limits are leased by one script (their buckets share a slot through the
/// hash tag, or the cluster would refuse it as CROSSSLOT), and both hold;
/// a key's shared credits are leased from the cluster too.
async fn leases_work_against_a_redis_cluster() {
    let cluster = RedisCluster::start();
    let seed = cluster.seed_url();
    let mut app = spawn_app_with(Backend::Sqlite, move |s| {
        s.redis_url = Some(seed.into());
        s.redis_cluster = true;
        s.fleet_secret = Some(fleet_secret().into());
        s.rate_limit_mode = Some(RateLimitMode::Redis);
        // No fallback: a decision here was leased from the cluster.
        s.rate_limit_on_redis_failure = OnRedisFailure::Closed;
    })
    .await;
    let (_, key) = app
        .create_key(pb::CreateKeyRequest {
            merchant_id: MERCHANT.into(),
            name: "clustered".into(),
            scopes: vec!["sales:read".into()],
            rate_limits: vec![
                per(3, Duration::from_secs(10)),
                pb::RateLimit { name: "minute".into(), ..per(100, Duration::from_secs(60)) },
            ],
            ..Default::default()
        })
        .await;
    // The cluster client connects in the background.
    let outcomes = first_lease_then_three_calls(&app, &key).await;
    let limited = deny(pb::DenyReason::RateLimited);
    assert_eq!(outcomes, [allowed(), allowed(), limited], "3 per 10 s, the first call included");
    let r = app.verify.verify(sales(&key)).await.unwrap().into_inner();
    assert_eq!(r.rate_limit.map(|s| (s.name, s.remaining)), Some(("fleet".to_owned(), 0)));

    // A shared credit balance lives in the cluster too, in its key's slot.
    let (metered, plaintext) = app
        .create_key(pb::CreateKeyRequest {
            merchant_id: MERCHANT.into(),
            name: "clustered-credits".into(),
            scopes: vec!["sales:read".into()],
            credits: Some(pb::Credits { remaining: 10, refill: None }),
            ..Default::default()
        })
        .await;
    let paid = app.verify.verify(sales(&plaintext)).await.unwrap().into_inner();
    assert_eq!((outcome(&paid), paid.credits_remaining), (allowed(), Some(9)));
    // One credit leased for the call, then one topped up behind it.
    let entry = format!("keywarden:cr:{{{}}}", metered.id);
    let unleased = || {
        let out = crate::helpers::output_within(
            std::process::Command::new("redis-cli").args([
                "-c",
                "-p",
                &cluster.ports[0].to_string(),
                "hget",
                &entry,
                "balance",
            ]),
            Duration::from_secs(10),
            "redis-cli hget to answer",
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    until("2 of 10 leased from the cluster", || async { (unleased() == "8").then_some(()) }).await;
    app.stop().await;
    drop(cluster);
}

/// A Redis of this test's own that speaks only TLS (a certificate from a
/// private CA) and wants a password, stopped when dropped.
struct SecuredRedis {
    node: std::process::Child,
    port: u16,
    ca_file: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl SecuredRedis {
    const PASSWORD: &str = "redis-test-password-0123456789";

    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pki = crate::pki::Pki::new("test Redis CA");
        let leaf = pki.server(1);
        let path = |name: &str| dir.path().join(name);
        std::fs::write(path("ca.pem"), pki.ca_pem()).unwrap();
        std::fs::write(path("cert.pem"), &leaf.cert).unwrap();
        std::fs::write(path("key.pem"), &leaf.key).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let node = std::process::Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--tls-cert-file",
                "cert.pem",
                "--tls-key-file",
                "key.pem",
                "--tls-ca-cert-file",
                "ca.pem",
            ])
            .args([
                "--tls-auth-clients",
                "no",
                "--requirepass",
                Self::PASSWORD,
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .current_dir(dir.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server runs (.ci/run installs it)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "the TLS Redis did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { node, port, ca_file: path("ca.pem"), _dir: dir }
    }

    fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}", self.port)
    }
}

impl Drop for SecuredRedis {
    fn drop(&mut self) {
        let _ = self.node.kill();
        let _ = self.node.wait();
    }
}

/// TLS and the password come from the settings: with the private CA and
/// the password, leases are granted (the failure mode is `closed`, so only
/// a real lease admits); with a wrong password the replica logs Redis as
/// unreachable, and never the password, right or wrong.
async fn a_redis_behind_tls_and_a_password_is_reached_through_the_settings() {
    let redis = SecuredRedis::start();
    let (url, ca_file) = (redis.url(), redis.ca_file.clone());
    let mut app = spawn_app_with(Backend::Sqlite, move |s| {
        s.redis_url = Some(url.into());
        s.redis_password = Some(SecuredRedis::PASSWORD.into());
        s.redis_ca_file = Some(ca_file);
        s.fleet_secret = Some(fleet_secret().into());
        s.rate_limit_mode = Some(RateLimitMode::Redis);
        s.rate_limit_on_redis_failure = OnRedisFailure::Closed;
    })
    .await;
    let key = limited_key(&mut app, per(3, Duration::from_secs(10))).await;
    let outcomes = first_lease_then_three_calls(&app, &key).await;
    assert_eq!(outcomes, [allowed(), allowed(), deny(pb::DenyReason::RateLimited)]);

    let dir = tempfile::tempdir().unwrap();
    let wrong = "not-the-redis-password-987654321";
    let ca = redis.ca_file.to_string_lossy().into_owned();
    let replica = spawn_binary(
        &app.database_url,
        dir.path(),
        &[
            ("KEYWARDEN_REDIS_URL", &redis.url()),
            ("KEYWARDEN_REDIS_PASSWORD", wrong),
            ("KEYWARDEN_REDIS_CA_FILE", &ca),
            ("KEYWARDEN_FLEET_SECRET", &fleet_secret()),
        ],
    );
    until("the wrong password to be logged as Redis unreachable", || {
        let replica = &replica;
        async move { replica.logged("Redis is unreachable").then_some(()) }
    })
    .await;
    let logs = replica.logs.lock().unwrap().join("\n");
    // Refused by AUTH: so the TLS handshake, on the CA from the setting, passed.
    assert!(logs.contains("Password authentication failed"), "refused for the password: {logs}");
    assert!(!logs.contains(wrong) && !logs.contains(SecuredRedis::PASSWORD), "a password was logged");
    assert!(replica.stop().await.success());
    app.stop().await;
}
