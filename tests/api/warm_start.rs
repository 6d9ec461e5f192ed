//! Warm start through the fleet tier: a key one replica verified by scrypt
//! is recognised by a freshly started replica without scrypt, through a
//! real Redis (`KEYWARDEN_TEST_REDIS_URL`, default the machine's at
//! 127.0.0.1:6379). Each test has its own fleet secret, so tests sharing
//! the Redis never see each other's entries. A Redis writer who watches
//! MONITOR never makes a key verify that was not issued.

use keywarden::api::pb::{self, key_verify_client::KeyVerifyClient};

use crate::helpers::{
    Backend, Replica, connect, create_sales_key, deny, fleet_secret, metrics_of, outcome, redis_url, revoke,
    sales, spawn_app_with, spawn_binary, until, verify_until,
};

async fn redis_get(key: &str) -> Option<String> {
    redis_get_on(&redis_url(), key).await
}

async fn redis_get_on(url: &str, key: &str) -> Option<String> {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.expect("the test Redis answers");
    redis::cmd("GET").arg(key).query_async(&mut conn).await.unwrap()
}

/// The warm-start entry a key id's owner entry names, if any.
async fn warm_entry_of(key_id: &str) -> Option<String> {
    redis_get(&keywarden::fleet::owner_entry(key_id)).await
}

fn start_replica(database_url: &str, dir: &std::path::Path, secret: &str, redis: &str) -> Replica {
    spawn_binary(database_url, dir, &[("KEYWARDEN_REDIS_URL", redis), ("KEYWARDEN_FLEET_SECRET", secret)])
}

async fn verify_on(replica: &Replica, key: &str) -> pb::VerifyResponse {
    let mut client = KeyVerifyClient::new(connect(replica.addr).await);
    client.verify(sales(key)).await.unwrap().into_inner()
}

async fn metric(replica: &Replica, series: &str) -> f64 {
    let metrics = metrics_of(replica.metrics.expect("metrics are served")).await;
    *metrics.get(series).unwrap_or_else(|| panic!("{series} missing"))
}

async fn a_key_verified_on_one_replica_verifies_on_a_fresh_one_without_scrypt_until_revoked() {
    let secret = fleet_secret();
    let (url, s) = (redis_url(), secret.clone());
    let mut a = spawn_app_with(Backend::postgres(), move |settings| {
        settings.redis_url = Some(url.into());
        settings.fleet_secret = Some(s.into());
    })
    .await;
    let (key_id, key) = create_sales_key(&mut a.admin, "warm").await;
    let (other_id, other_key) = create_sales_key(&mut a.admin, "never verified").await;

    // Replica A runs scrypt once and publishes the key.
    assert_eq!(outcome(&a.verify.verify(sales(&key)).await.unwrap().into_inner()), crate::helpers::allowed());
    let entry = until("A to publish the key's warm-start entry", || warm_entry_of(&key_id)).await;
    let value = redis_get(&entry).await.expect("the entry has a value");
    assert!(value.starts_with(&format!("{key_id}.")), "the entry names the key, then its tag: {value}");
    assert!(!entry.contains(&key[8..]), "the entry's name holds no part of the key");

    // A freshly started replica B recognises it without scrypt.
    let dir = tempfile::tempdir().unwrap();
    let b = start_replica(&a.database_url, dir.path(), &secret, &redis_url());
    let allowed = verify_on(&b, &key).await;
    assert_eq!(outcome(&allowed), crate::helpers::allowed());
    assert_eq!(allowed.merchant_id, crate::helpers::MERCHANT);
    assert_eq!(metric(&b, "keywarden_scrypt_runs_total").await, 0.0, "B ran no scrypt");
    assert_eq!(metric(&b, "keywarden_warm_start_hits_total").await, 1.0);

    // A wrong secret with the key's prefix is not in the map: scrypt says no.
    let wrong = crate::helpers::wrong_secret(&key, 1);
    assert_eq!(outcome(&verify_on(&b, &wrong).await), deny(pb::DenyReason::NotFound));
    assert_eq!(metric(&b, "keywarden_scrypt_runs_total").await, 1.0);
    // A key the fleet has not seen is checked by scrypt, then published.
    assert_eq!(outcome(&verify_on(&b, &other_key).await), crate::helpers::allowed());
    assert_eq!(metric(&b, "keywarden_scrypt_runs_total").await, 2.0);
    until("B to publish the other key", || warm_entry_of(&other_id)).await;

    // Revocation deletes the entry before RevokeKey answers, and both
    // replicas deny the key.
    revoke(&mut a.admin, &key_id).await;
    assert_eq!(warm_entry_of(&key_id).await, None, "the owner entry is gone");
    assert_eq!(redis_get(&entry).await, None, "the warm-start entry is gone");
    assert_eq!(
        outcome(&a.verify.verify(sales(&key)).await.unwrap().into_inner()),
        deny(pb::DenyReason::Revoked)
    );
    let on_b = KeyVerifyClient::new(connect(b.addr).await);
    let revoked = |r: &pb::VerifyResponse| outcome(r) == deny(pb::DenyReason::Revoked);
    verify_until("B to deny the revoked key", &on_b, sales(&key), revoked).await;

    // A replica started after the revocation has nothing to skip scrypt
    // with, and does not publish a revoked key again.
    let dir_c = tempfile::tempdir().unwrap();
    let c = start_replica(&a.database_url, dir_c.path(), &secret, &redis_url());
    assert_eq!(outcome(&verify_on(&c, &key).await), deny(pb::DenyReason::Revoked));
    assert_eq!(metric(&c, "keywarden_scrypt_runs_total").await, 1.0);
    assert_eq!(metric(&c, "keywarden_warm_start_hits_total").await, 0.0);
    assert_eq!(warm_entry_of(&key_id).await, None, "a revoked key is not published again");

    for replica in [b, c] {
        replica.sigterm();
        replica.exited().await;
    }
    a.stop().await;
}

backend_tests!(a_redis_outage_only_means_scrypt_again);
once_tests!(
    a_key_verified_on_one_replica_verifies_on_a_fresh_one_without_scrypt_until_revoked(
        postgres,
        current_thread
    ),
    a_redis_writer_cannot_make_a_forged_key_verify_with_a_bare_id_or_a_copied_value(postgres, current_thread),
    a_forged_key_never_reaches_the_rehasher_during_a_pepper_rotation(postgres, current_thread),
);

async fn a_redis_outage_only_means_scrypt_again(backend: Backend) {
    let app = spawn_app_with(backend, |_| {}).await;
    let mut admin = app.admin.clone();
    let (_, key) = create_sales_key(&mut admin, "no redis").await;
    // Nothing listens on port 1.
    let dir = tempfile::tempdir().unwrap();
    let replica = start_replica(&app.database_url, dir.path(), &fleet_secret(), "redis://127.0.0.1:1");
    for _ in 0..3 {
        assert_eq!(outcome(&verify_on(&replica, &key).await), crate::helpers::allowed());
    }
    assert_eq!(metric(&replica, "keywarden_scrypt_runs_total").await, 1.0, "once, then the local cache");
    assert_eq!(metric(&replica, "keywarden_warm_start_hits_total").await, 0.0);
    assert_eq!(metric(&replica, "keywarden_warm_start_misses_total").await, 1.0);
    assert!(metric(&replica, "keywarden_redis_errors_total").await >= 1.0);
    until("the unreachable Redis to be logged once", || async {
        replica.logged("Redis is unreachable").then_some(())
    })
    .await;
    let warnings = replica.logs.lock().unwrap().iter().filter(|l| l.contains("Redis is unreachable")).count();
    assert_eq!(warnings, 1, "one line per transition, not per failure");
    replica.sigterm();
    replica.exited().await;
    app.stop().await;
}

/// Someone who can read Redis's traffic (MONITOR, or plaintext `redis://`
/// on the wire) and write to it, but holds no fleet secret. Each attack
/// runs in a Redis database of its own, so the names it learns are the
/// replicas' of that test alone.
struct RedisWriter {
    url: String,
    db: u32,
    seen: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl RedisWriter {
    async fn watching(db: u32) -> Self {
        use tokio_stream::StreamExt as _;
        let url = format!("{}/{db}", redis_url().trim_end_matches('/'));
        let client = redis::Client::open(url.as_str()).unwrap();
        let mut lines = client.get_async_monitor().await.expect("MONITOR").into_on_message::<String>();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = std::sync::Arc::clone(&seen);
        tokio::spawn(async move {
            while let Some(line) = lines.next().await {
                kept.lock().unwrap().push(line);
            }
        });
        Self { url, db, seen }
    }

    /// How many commands have been seen so far.
    fn mark(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// The warm-start name a replica looked up after `mark`, in this
    /// writer's database.
    async fn looked_up_since(&self, mark: usize) -> String {
        let db = format!("[{} ", self.db);
        until("a warm-start lookup on MONITOR", || async {
            let seen = self.seen.lock().unwrap();
            seen[mark..]
                .iter()
                .filter(|line| line.contains(&db) && line.contains("\"GETEX\""))
                .find_map(|line| line.split('"').nth(3).filter(|n| n.starts_with("keywarden:warm:")))
                .map(str::to_owned)
        })
        .await
    }

    async fn set(&self, name: &str, value: &str) {
        let mut conn =
            redis::Client::open(self.url.as_str()).unwrap().get_multiplexed_async_connection().await.unwrap();
        redis::cmd("SET").arg(name).arg(value).query_async::<()>(&mut conn).await.unwrap();
    }

    async fn delete(&self, name: &str) {
        let mut conn =
            redis::Client::open(self.url.as_str()).unwrap().get_multiplexed_async_connection().await.unwrap();
        redis::cmd("DEL").arg(name).query_async::<()>(&mut conn).await.unwrap();
    }

    async fn get(&self, name: &str) -> Option<String> {
        redis_get_on(&self.url, name).await
    }
}

/// A replica on the attacked Redis, with the fleet's secret and `extra`.
fn fresh_replica(
    database_url: &str,
    secret: &str,
    redis: &str,
    extra: &[(&str, &str)],
) -> (Replica, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let env = [&[("KEYWARDEN_REDIS_URL", redis), ("KEYWARDEN_FLEET_SECRET", secret)][..], extra].concat();
    (spawn_binary(database_url, dir.path(), &env), dir)
}

async fn stop_replica(replica: Replica) {
    replica.sigterm();
    replica.exited().await;
}

/// What the attacker has learned before writing anything.
struct Attack {
    /// Replica A, on PostgreSQL and the attacked Redis.
    a: crate::helpers::TestApp,
    victim_id: String,
    victim: String,
    /// The victim's public prefix, another secret, a valid checksum.
    forged: String,
    /// The warm-start name the forged key looks up, learned from MONITOR.
    name: String,
    /// The value of the victim's genuine entry.
    genuine: String,
}

/// The victim's key is used once on A, so that its genuine entry exists;
/// the forged key is sent to A once, and MONITOR shows what it looks up.
async fn attack_setup(attacker: &RedisWriter, secret: &str) -> Attack {
    let (url, s) = (attacker.url.clone(), secret.to_owned());
    let mut a = spawn_app_with(Backend::postgres(), move |settings| {
        settings.redis_url = Some(url.into());
        settings.fleet_secret = Some(s.into());
    })
    .await;
    let (victim_id, victim) = create_sales_key(&mut a.admin, "victim").await;
    assert_eq!(
        outcome(&a.verify.verify(sales(&victim)).await.unwrap().into_inner()),
        crate::helpers::allowed()
    );
    let owner = keywarden::fleet::owner_entry(&victim_id);
    let genuine_entry = until("A to publish the victim's entry", || attacker.get(&owner)).await;
    let genuine = until("the victim's entry to hold a value", || attacker.get(&genuine_entry)).await;

    let forged = crate::helpers::wrong_secret(&victim, 7);
    let mark = attacker.mark();
    let refused = a.verify.verify(sales(&forged)).await.unwrap().into_inner();
    assert_eq!(outcome(&refused), deny(pb::DenyReason::NotFound));
    let name = attacker.looked_up_since(mark).await;
    Attack { a, victim_id, victim, forged, name, genuine }
}

async fn a_redis_writer_cannot_make_a_forged_key_verify_with_a_bare_id_or_a_copied_value() {
    let (attacker, secret) = (RedisWriter::watching(11).await, fleet_secret());
    let Attack { a, victim_id, victim, forged, name, genuine } = attack_setup(&attacker, &secret).await;

    for (what, planted) in
        [("a bare id", victim_id.as_str()), ("a value copied from the victim's entry", genuine.as_str())]
    {
        attacker.set(&name, planted).await;
        let (fresh, _dir) = fresh_replica(&a.database_url, &secret, &attacker.url, &[]);
        let answer = verify_on(&fresh, &forged).await;
        assert_eq!(outcome(&answer), deny(pb::DenyReason::NotFound), "{what} made a forged key verify");
        assert_eq!(metric(&fresh, "keywarden_warm_start_hits_total").await, 0.0, "{what} was taken as a hit");
        assert_eq!(
            metric(&fresh, "keywarden_scrypt_runs_total").await,
            1.0,
            "{what}: scrypt ran as without Redis"
        );
        // The victim's genuine entry still spares the fresh replica scrypt.
        assert_eq!(outcome(&verify_on(&fresh, &victim).await), crate::helpers::allowed());
        assert_eq!(metric(&fresh, "keywarden_warm_start_hits_total").await, 1.0);
        assert_eq!(metric(&fresh, "keywarden_scrypt_runs_total").await, 1.0);
        stop_replica(fresh).await;
    }
    a.stop().await;
}

async fn a_forged_key_never_reaches_the_rehasher_during_a_pepper_rotation() {
    let (attacker, secret) = (RedisWriter::watching(12).await, fleet_secret());
    let Attack { a, victim_id, victim, forged, name, .. } = attack_setup(&attacker, &secret).await;
    attacker.set(&name, &victim_id).await;
    let stored_hash = || async {
        crate::helpers::value::<String>(
            &a.database_url,
            &format!("SELECT key_hash FROM api_keys WHERE id = '{victim_id}'"),
        )
        .await
    };
    assert!(stored_hash().await.starts_with("v1$"));

    // Generation 2 current: every key checked under generation 1 is offered
    // to the rehasher, which would store the forged key's hash.
    let rotated = [("KEYWARDEN_PEPPERS", ROTATED_PEPPERS), ("KEYWARDEN_PEPPER_CURRENT", "2")];
    let (fresh, _dir) = fresh_replica(&a.database_url, &secret, &attacker.url, &rotated);
    assert_eq!(outcome(&verify_on(&fresh, &forged).await), deny(pb::DenyReason::NotFound));
    // The victim's own use moves the row to generation 2 (the rehasher's
    // work, now done), with the victim's plaintext.
    assert_eq!(outcome(&verify_on(&fresh, &victim).await), crate::helpers::allowed());
    until("the victim's key to be rehashed under generation 2", || async {
        stored_hash().await.starts_with("v2$2$").then_some(())
    })
    .await;
    stop_replica(fresh).await;

    // With the attacker's entry gone, a fresh replica still refuses the
    // forged key and takes the real one.
    attacker.delete(&name).await;
    let (later, _dir) = fresh_replica(&a.database_url, &secret, &attacker.url, &rotated);
    assert_eq!(outcome(&verify_on(&later, &forged).await), deny(pb::DenyReason::NotFound));
    assert_eq!(outcome(&verify_on(&later, &victim).await), crate::helpers::allowed());
    stop_replica(later).await;
    a.stop().await;
}

/// Generation 2 of the pepper, beside the helpers' generation 1.
const ROTATED_PEPPERS: &str = r#"{2="MjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjI="}"#;
