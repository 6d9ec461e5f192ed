//! Warm start through the fleet tier: a key one replica verified by scrypt
//! is recognised by a freshly started replica without scrypt, through a
//! real Redis (`KEYWARDEN_TEST_REDIS_URL`, default the machine's at
//! 127.0.0.1:6379). Each test has its own fleet secret, so tests sharing
//! the Redis never see each other's entries.

use keywarden::api::pb::{self, key_verify_client::KeyVerifyClient};

use crate::helpers::{
    Backend, Replica, connect, create_sales_key, deny, fleet_secret, metrics_of, outcome, redis_url, revoke,
    sales, spawn_app_with, spawn_binary, until,
};

async fn redis_get(key: &str) -> Option<String> {
    let client = redis::Client::open(redis_url()).unwrap();
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

#[tokio::test]
#[cfg_attr(skip_postgres_tests, ignore = "KEYWARDEN_TEST_POSTGRES_URL is empty")]
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
    assert_eq!(redis_get(&entry).await.as_deref(), Some(key_id.as_str()), "the entry names the key");
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
    until("B to deny the revoked key", || async {
        (outcome(&verify_on(&b, &key).await) == deny(pb::DenyReason::Revoked)).then_some(())
    })
    .await;

    // A replica started after the revocation has nothing to skip scrypt
    // with, and does not publish a revoked key again.
    let dir_c = tempfile::tempdir().unwrap();
    let c = start_replica(&a.database_url, dir_c.path(), &secret, &redis_url());
    assert_eq!(outcome(&verify_on(&c, &key).await), deny(pb::DenyReason::Revoked));
    assert_eq!(metric(&c, "keywarden_scrypt_runs_total").await, 1.0);
    assert_eq!(metric(&c, "keywarden_warm_start_hits_total").await, 0.0);
    assert_eq!(warm_entry_of(&key_id).await, None, "a revoked key is not published again");

    for replica in [b, c] {
        crate::helpers::sigterm(&replica.child);
        crate::helpers::exited(replica.child).await;
    }
    a.stop().await;
}

backend_tests!(a_redis_outage_only_means_scrypt_again);

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
    crate::helpers::sigterm(&replica.child);
    crate::helpers::exited(replica.child).await;
    app.stop().await;
}
