//! Credits shared by the fleet (issue 23, `rate_limit_mode = "redis"`):
//! Redis holds what no replica has leased of a key's balance
//! (`keywarden:cr:{<key id>}`), replicas spend leases in memory and give
//! unused ones back, and the database stays the exact record.

use keywarden::{
    api::pb::{self, key_verify_client::KeyVerifyClient},
    config::{RateLimitMode, Settings},
};

use crate::helpers::{
    Backend, MERCHANT, Proxy, TestApp, allowed, connect, deny, fleet_secret, metrics_of, outcome, redis_url,
    scalar, spawn_app, spawn_app_on, spawn_app_with, spawn_binary, until,
};

once_tests!(
    three_replicas_share_one_balance_and_admit_exactly_what_it_holds(postgres, current_thread),
    leased_credits_go_back_when_idle_and_at_shutdown(postgres, current_thread),
    an_update_of_the_credits_seeds_the_shared_balance_again(current_thread),
    a_redis_outage_leaves_credits_to_each_replicas_own_view,
);

fn fleet(settings: &mut Settings) {
    settings.redis_url = Some(redis_url().into());
    settings.fleet_secret = Some(fleet_secret().into());
    settings.rate_limit_mode = Some(RateLimitMode::Redis);
}

async fn metered_key(app: &mut TestApp, remaining: i64) -> (pb::ApiKey, String) {
    app.create_key(pb::CreateKeyRequest {
        merchant_id: MERCHANT.into(),
        name: "shared-credits".into(),
        scopes: vec!["sales:read".into()],
        credits: Some(pb::Credits { remaining, refill: None }),
        ..Default::default()
    })
    .await
}

async fn pay(
    client: &mut KeyVerifyClient<tonic::transport::Channel>,
    key: &str,
    cost: u32,
) -> pb::VerifyResponse {
    let request = pb::VerifyRequest {
        key: key.into(),
        required_scope: "sales:read".into(),
        cost,
        ..Default::default()
    };
    client.verify(request).await.unwrap().into_inner()
}

/// `(epoch, unleased balance)` of a key's entry in Redis, if it has one.
async fn shared_balance(key_id: &str) -> Option<(i64, i64)> {
    let client = redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.expect("the test Redis answers");
    let fields: Vec<Option<i64>> = redis::cmd("HMGET")
        .arg(format!("keywarden:cr:{{{key_id}}}"))
        .arg("epoch")
        .arg("balance")
        .query_async(&mut conn)
        .await
        .unwrap();
    Some((fields[0]?, fields[1]?))
}

async fn stored_balance(app: &TestApp, key_id: &str) -> i64 {
    scalar(&app.database_url, &format!("SELECT credits_remaining FROM api_keys WHERE id = '{key_id}'")).await
}

/// Three replicas spend one balance of 100 through Redis: calls spread
/// over them admit exactly 100, the database holds exactly 0 after they
/// stop, and Redis's copy is spent too. (Without sharing, each replica
/// would learn of the others' spending only at their flushes.)
async fn three_replicas_share_one_balance_and_admit_exactly_what_it_holds() {
    let mut a = spawn_app_with(Backend::postgres(), fleet).await;
    let b = spawn_app_on(&a, fleet).await;
    let c = spawn_app_on(&a, fleet).await;
    let (key, plaintext) = metered_key(&mut a, 100).await;

    let clients = [a.verify.clone(), b.verify.clone(), c.verify.clone()];
    let (mut admitted, mut refused) = (0, 0);
    for _ in 0..20 {
        let mut calls = tokio::task::JoinSet::new();
        for i in 0..15 {
            let (mut client, key) = (clients[i % 3].clone(), plaintext.clone());
            calls.spawn(async move { pay(&mut client, &key, 1).await });
        }
        for r in calls.join_all().await {
            if outcome(&r) == allowed() {
                admitted += 1;
            } else {
                assert_eq!(outcome(&r), deny(pb::DenyReason::QuotaExhausted));
                refused += 1;
            }
        }
    }
    assert_eq!((admitted, refused), (100, 200), "exactly the balance, fleet-wide");
    assert_eq!(shared_balance(&key.id).await, Some((0, 0)), "Redis's copy is spent");

    let mut c = c;
    let mut b = b;
    c.stop_serving().await;
    b.stop_serving().await;
    a.stop_serving().await;
    assert_eq!(stored_balance(&a, &key.id).await, 0, "every credit spent is written");
    a.stop().await;
}

/// Credits a replica leased and stopped using go back to the fleet: when
/// its calls move to another replica, and when it shuts down. Nothing is
/// lost either way: the two replicas spend exactly the balance.
async fn leased_credits_go_back_when_idle_and_at_shutdown() {
    let mut a = spawn_app_with(Backend::postgres(), fleet).await;
    let mut b = spawn_app_on(&a, fleet).await;
    let (key, plaintext) = metered_key(&mut a, 100).await;

    // One call on A leases a sixteenth of the balance, and spends one.
    let mut on_a = a.verify.clone();
    assert_eq!(pay(&mut on_a, &plaintext, 1).await.credits_remaining, Some(99));
    assert_eq!(shared_balance(&key.id).await, Some((0, 93)), "7 leased to A");
    until("A's idle lease to go back", || async {
        (shared_balance(&key.id).await == Some((0, 99))).then_some(())
    })
    .await;

    // B spends 50 and stops holding a lease of its own, which goes back.
    let mut on_b = b.verify.clone();
    for _ in 0..50 {
        assert_eq!(outcome(&pay(&mut on_b, &plaintext, 1).await), allowed());
    }
    b.stop_serving().await;
    assert_eq!(shared_balance(&key.id).await, Some((0, 49)), "B's unused credits are back");

    for _ in 0..49 {
        assert_eq!(outcome(&pay(&mut on_a, &plaintext, 1).await), allowed());
    }
    let r = pay(&mut on_a, &plaintext, 1).await;
    assert_eq!((outcome(&r), r.credits_remaining), (deny(pb::DenyReason::QuotaExhausted), Some(0)));
    a.stop_serving().await;
    assert_eq!(stored_balance(&a, &key.id).await, 0);
    a.stop().await;
}

/// Setting the balance outright starts a new epoch: Redis's copy is
/// seeded again from the database, and credits leased from the old one
/// (here, the one credit held) are not spent against the new one.
async fn an_update_of_the_credits_seeds_the_shared_balance_again() {
    let mut app = spawn_app_with(Backend::Sqlite, fleet).await;
    let (key, plaintext) = metered_key(&mut app, 10).await;
    let mut client = app.verify.clone();
    let r = pay(&mut client, &plaintext, 3).await;
    assert_eq!((outcome(&r), r.credits_remaining), (allowed(), Some(7)));
    // Leased: what the call needed, then a top-up of ⌈7 / 16⌉ = 1 behind it.
    until("the top-up", || async { (shared_balance(&key.id).await == Some((0, 6))).then_some(()) }).await;

    app.admin
        .update_key(pb::UpdateKeyRequest {
            merchant_id: MERCHANT.into(),
            key_id: key.id.clone(),
            credits: Some(pb::Credits { remaining: 50, refill: None }),
            update_mask: Some(prost_types::FieldMask { paths: vec!["credits".into()] }),
            ..Default::default()
        })
        .await
        .unwrap();
    let r = pay(&mut client, &plaintext, 1).await;
    assert_eq!((outcome(&r), r.credits_remaining), (allowed(), Some(49)));
    // Seeded with 50 at epoch 1; a lease of ⌈50 / 16⌉ = 4 went to the replica.
    assert_eq!(shared_balance(&key.id).await, Some((1, 46)));
    app.stop_serving().await;
    assert_eq!(stored_balance(&app, &key.id).await, 49);
    app.stop().await;
}

/// With Redis away, a replica decides on its own view of the balance (the
/// stored balance less its own spending), counts and logs it once, and
/// leases again when Redis is back.
async fn a_redis_outage_leaves_credits_to_each_replicas_own_view() {
    let mut app = spawn_app(Backend::Sqlite).await;
    let proxy = Proxy::start(Proxy::upstream_of_redis(&redis_url())).await;
    let dir = tempfile::tempdir().unwrap();
    let redis = proxy.url_for(&format!("{}/", redis_url().trim_end_matches('/')));
    let replica = spawn_binary(
        &app.database_url,
        dir.path(),
        &[
            ("KEYWARDEN_REDIS_URL", &redis),
            ("KEYWARDEN_FLEET_SECRET", &fleet_secret()),
            ("KEYWARDEN_RATE_LIMIT_MODE", "redis"),
        ],
    );
    let mut client = KeyVerifyClient::new(connect(replica.addr).await);
    let metric = |series: &'static str| {
        let at = replica.metrics.expect("metrics are served");
        async move { *metrics_of(at).await.get(series).unwrap_or_else(|| panic!("{series} missing")) }
    };

    let warning = "credits cannot lease from Redis";
    let warnings = || replica.logs.lock().unwrap().iter().filter(|l| l.contains(warning)).count();
    let (healthy, healthy_key) = metered_key(&mut app, 100).await;
    until("the replica to lease credits from Redis", || {
        let (mut client, key, id) = (client.clone(), healthy_key.clone(), healthy.id.clone());
        async move {
            pay(&mut client, &key, 1).await;
            shared_balance(&id).await
        }
    })
    .await;
    assert!(metric("keywarden_credit_lease_refills_total").await >= 1.0);
    assert_eq!(metric("keywarden_credits_degraded").await, 0.0);
    let warned_before = warnings();

    proxy.cut();
    let (_, key) = metered_key(&mut app, 5).await;
    let fallbacks_before = metric("keywarden_credit_fallback_decisions_total").await;
    let mut outcomes = Vec::new();
    for _ in 0..6 {
        outcomes.push(outcome(&pay(&mut client, &key, 1).await));
    }
    let exhausted = deny(pb::DenyReason::QuotaExhausted);
    assert_eq!(outcomes, [vec![allowed(); 5], vec![exhausted]].concat());
    assert_eq!(metric("keywarden_credit_fallback_decisions_total").await - fallbacks_before, 6.0);
    assert_eq!(metric("keywarden_credits_degraded").await, 1.0);
    assert_eq!(warnings() - warned_before, 1, "one line per transition, not per call");

    proxy.restore();
    until("credits to lease from Redis again", || {
        let (mut client, key) = (client.clone(), healthy_key.clone());
        let replica = &replica;
        async move {
            pay(&mut client, &key, 1).await;
            replica.logged("credits lease from Redis again").then_some(())
        }
    })
    .await;
    assert_eq!(metric("keywarden_credits_degraded").await, 0.0);
    assert!(replica.stop().await.success());
    app.stop().await;
}
