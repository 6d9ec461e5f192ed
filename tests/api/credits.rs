//! Credits (issue 23): a balance each allowed Verify pays its cost from,
//! written to the database in the usage flushes (exactly, across a lost
//! acknowledgement and SIGTERM) and refilled at the UTC boundary by one
//! replica.

use chrono::{DateTime, Utc};
use keywarden::api::pb::{self, key_verify_client::KeyVerifyClient};

use crate::helpers::{
    Backend, MERCHANT, Proxy, TestApp, allowed, connect, deny, fleet_secret, outcome, redis_url, scalar,
    spawn_app, spawn_app_on, spawn_app_over, spawn_app_with, spawn_binary, until, violated_fields,
};

backend_tests!(
    each_allowed_call_pays_its_cost_until_the_balance_cannot,
    credits_are_validated_by_field_and_replaced_or_removed_by_update,
);
once_tests!(
    spending_is_exact_through_a_lost_flush_acknowledgement_and_sigterm(postgres),
    a_daily_refill_happens_at_midnight_utc_once_for_the_fleet(postgres, current_thread),
    a_daily_refill_reaches_a_balance_shared_through_redis(postgres, current_thread),
);

fn credits(remaining: i64, refill: Option<(i64, pb::RefillInterval)>) -> pb::Credits {
    pb::Credits {
        remaining,
        refill: refill.map(|(amount, interval)| pb::Refill { amount, interval: interval.into() }),
    }
}

async fn key_with_credits(app: &mut TestApp, c: pb::Credits) -> (pb::ApiKey, String) {
    app.create_key(pb::CreateKeyRequest {
        merchant_id: MERCHANT.into(),
        name: "metered".into(),
        scopes: vec!["sales:read".into()],
        credits: Some(c),
        ..Default::default()
    })
    .await
}

fn costing(key: &str, cost: u32) -> pb::VerifyRequest {
    pb::VerifyRequest { key: key.into(), required_scope: "sales:read".into(), cost, ..Default::default() }
}

async fn pay(
    client: &mut KeyVerifyClient<tonic::transport::Channel>,
    key: &str,
    cost: u32,
) -> pb::VerifyResponse {
    client.verify(costing(key, cost)).await.unwrap().into_inner()
}

async fn get(app: &mut TestApp, key_id: &str) -> pb::ApiKey {
    app.admin
        .get_key(pb::GetKeyRequest { merchant_id: MERCHANT.into(), key_id: key_id.into() })
        .await
        .unwrap()
        .into_inner()
        .api_key
        .unwrap()
}

async fn each_allowed_call_pays_its_cost_until_the_balance_cannot(backend: Backend) {
    let mut app = spawn_app(backend).await;
    let (key, plaintext) = key_with_credits(&mut app, credits(10, None)).await;
    let (_, unmetered) = app.key_with_scopes(&["sales:read"]).await;
    let mut client = app.verify.clone();

    let r = pay(&mut client, &plaintext, 3).await;
    assert_eq!((outcome(&r), r.credits_remaining), (allowed(), Some(7)));
    let r = pay(&mut client, &plaintext, 0).await;
    assert_eq!((outcome(&r), r.credits_remaining), (allowed(), Some(6)), "a cost of 0 is 1");
    // A call the balance cannot pay takes nothing.
    let r = pay(&mut client, &plaintext, 7).await;
    assert_eq!((outcome(&r), r.credits_remaining), (deny(pb::DenyReason::QuotaExhausted), Some(6)));
    let r = pay(&mut client, &plaintext, 6).await;
    assert_eq!((outcome(&r), r.credits_remaining), (allowed(), Some(0)));
    let r = pay(&mut client, &plaintext, 1).await;
    assert_eq!((outcome(&r), r.credits_remaining), (deny(pb::DenyReason::QuotaExhausted), Some(0)));
    // A call the policy refuses spends nothing and says nothing of credits.
    let wrong_scope = client
        .verify(pb::VerifyRequest {
            key: plaintext.clone(),
            required_scope: "invoice:write".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (outcome(&wrong_scope), wrong_scope.credits_remaining),
        (deny(pb::DenyReason::InsufficientScope), None)
    );
    // Keys without credits are unlimited and report none.
    let r = pay(&mut client, &unmetered, 1_000).await;
    assert_eq!((outcome(&r), r.credits_remaining), (allowed(), None));

    // GetKey counts what this replica has not flushed yet; the audit trail
    // has the refusals as 429s on the key.
    let shown = get(&mut app, &key.id).await;
    assert_eq!(shown.credits, Some(credits(0, None)));
    assert_eq!((shown.request_count, shown.denied_count), (3, 3));
    let refusals: Vec<i32> = app
        .audit_of(&key.id)
        .await
        .iter()
        .filter(|e| e.deny_reason == pb::DenyReason::QuotaExhausted as i32)
        .map(|e| e.status)
        .collect();
    assert_eq!(refusals, [429, 429]);
    app.settle().await;
    assert_eq!(
        scalar(&app.database_url, &format!("SELECT credits_remaining FROM api_keys WHERE id = '{}'", key.id))
            .await,
        0
    );
    app.stop().await;
}

async fn credits_are_validated_by_field_and_replaced_or_removed_by_update(backend: Backend) {
    let mut app = spawn_app(backend).await;
    let refused = app
        .admin
        .create_key(pb::CreateKeyRequest {
            merchant_id: MERCHANT.into(),
            name: "bad credits".into(),
            scopes: vec!["sales:read".into()],
            credits: Some(credits(-1, Some((0, pb::RefillInterval::Unspecified)))),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        violated_fields(&refused),
        ["credits.remaining", "credits.refill.amount", "credits.refill.interval"]
    );

    let (key, plaintext) = key_with_credits(&mut app, credits(1, None)).await;
    let mut client = app.verify.clone();
    assert_eq!(outcome(&pay(&mut client, &plaintext, 1).await), allowed());
    assert_eq!(outcome(&pay(&mut client, &plaintext, 1).await), deny(pb::DenyReason::QuotaExhausted));

    let update = |c: Option<pb::Credits>| pb::UpdateKeyRequest {
        merchant_id: MERCHANT.into(),
        key_id: key.id.clone(),
        credits: c,
        update_mask: Some(prost_types::FieldMask { paths: vec!["credits".into()] }),
        ..Default::default()
    };
    let monthly = credits(5, Some((100, pb::RefillInterval::Monthly)));
    let updated = app.admin.update_key(update(Some(monthly))).await.unwrap().into_inner().api_key.unwrap();
    assert_eq!(updated.credits, Some(monthly));
    let r = pay(&mut client, &plaintext, 2).await;
    assert_eq!((outcome(&r), r.credits_remaining), (allowed(), Some(3)), "the new balance applies at once");

    let unlimited = app.admin.update_key(update(None)).await.unwrap().into_inner().api_key.unwrap();
    assert_eq!(unlimited.credits, None);
    let r = pay(&mut client, &plaintext, 50).await;
    assert_eq!((outcome(&r), r.credits_remaining), (allowed(), None));
    app.stop().await;
}

/// A flush whose COMMIT landed but whose acknowledgement was lost is
/// retried under its id and not counted twice; SIGTERM flushes the rest.
/// The balance in the database is exactly what the answers said.
// Two threads: the proxy keeps serving while the replica is started.
async fn spending_is_exact_through_a_lost_flush_acknowledgement_and_sigterm() {
    let mut admin_app = spawn_app_with(Backend::postgres(), |_| {}).await;
    let (key, plaintext) = key_with_credits(&mut admin_app, credits(100, None)).await;
    let proxy = Proxy::start(Proxy::upstream_of(&admin_app.database_url)).await;
    // In the clear: the proxy reads the protocol to find the COMMIT.
    let through_proxy = format!("{}?sslmode=disable", proxy.url_for(&admin_app.database_url));
    let dir = tempfile::tempdir().unwrap();
    let replica = spawn_binary(&through_proxy, dir.path(), &[("KEYWARDEN_USAGE_FLUSH_INTERVAL_MS", "200")]);
    let mut client = KeyVerifyClient::new(connect(replica.addr).await);

    // The first flush that spends credits commits, and its acknowledgement
    // is lost with the connection.
    proxy.cut_before_acknowledging_commit_of(b"v.spent");
    let mut spent = 0;
    for _ in 0..10 {
        let r = pay(&mut client, &plaintext, 3).await;
        assert_eq!(outcome(&r), allowed());
        spent += 3;
        assert_eq!(r.credits_remaining, Some(100 - spent));
    }
    until("a flush to commit and lose its acknowledgement", || async { proxy.tripped().then_some(()) }).await;
    proxy.restore();
    until("the retried flush to be recognised as applied", || async {
        (replica.logged("usage flush had already been applied")
            || replica.logged("an unacknowledged usage flush had been applied"))
        .then_some(())
    })
    .await;
    for _ in 0..5 {
        let r = pay(&mut client, &plaintext, 2).await;
        spent += 2;
        assert_eq!((outcome(&r), r.credits_remaining), (allowed(), Some(100 - spent)));
    }

    assert!(replica.stop().await.success());
    let stored = |column: &str| format!("SELECT {column} FROM api_keys WHERE id = '{}'", key.id);
    assert_eq!(scalar(&admin_app.database_url, &stored("credits_remaining")).await, 100 - spent);
    assert_eq!(scalar(&admin_app.database_url, &stored("request_count")).await, 15);
    admin_app.stop().await;
}

/// How far to move the refill job's calendar so that it reads `lead`
/// before the next UTC midnight.
fn skew_to_midnight(lead: chrono::Duration) -> i64 {
    let now = Utc::now();
    let midnight = keywarden::keys::RefillInterval::Daily.next_boundary(now);
    (midnight - lead - now).num_milliseconds()
}

/// Two replicas whose refill calendars read just before midnight: at the boundary
/// one of them (the lock holder) sets the exhausted balance back to its
/// amount, once, and both admit the key again.
async fn a_daily_refill_happens_at_midnight_utc_once_for_the_fleet() {
    refill_at_midnight(false).await;
}

/// The same with the balance shared through Redis: the refill starts a new
/// epoch, from which Redis's copy is seeded again.
async fn a_daily_refill_reaches_a_balance_shared_through_redis() {
    refill_at_midnight(true).await;
}

async fn refill_at_midnight(shared: bool) {
    let skew = skew_to_midnight(chrono::Duration::seconds(3));
    let settings = move |s: &mut keywarden::config::Settings| {
        s.refill_clock_offset_ms = skew;
        if shared {
            s.redis_url = Some(redis_url().into());
            s.fleet_secret = Some(fleet_secret().into());
            s.rate_limit_mode = Some(keywarden::config::RateLimitMode::Redis);
        }
    };
    let mut a = spawn_app_over(Backend::postgres(), None, |_| async {}, settings).await;
    let b = spawn_app_on(&a, settings).await;
    let (key, plaintext) = key_with_credits(&mut a, credits(2, Some((5, pb::RefillInterval::Daily)))).await;
    let mut client = a.verify.clone();
    assert_eq!(pay(&mut client, &plaintext, 2).await.credits_remaining, Some(0));
    assert_eq!(outcome(&pay(&mut client, &plaintext, 1).await), deny(pb::DenyReason::QuotaExhausted));
    a.settle().await;
    let seq = |url: String, id: String| async move {
        scalar(&url, &format!("SELECT credits_seq FROM api_keys WHERE id = '{id}'")).await
    };
    let before = seq(a.database_url.clone(), key.id.clone()).await;

    for verify in [a.verify.clone(), b.verify.clone()] {
        until("the balance to be refilled at midnight", || {
            let (mut client, key) = (verify.clone(), plaintext.clone());
            async move {
                let r = pay(&mut client, &key, 1).await;
                (outcome(&r) == allowed()).then_some(r.credits_remaining)
            }
        })
        .await;
    }
    let refilled_at: DateTime<Utc> = crate::helpers::value(
        &a.database_url,
        &format!("SELECT credits_refilled_at FROM api_keys WHERE id = '{}'", key.id),
    )
    .await;
    let midnight = keywarden::keys::RefillInterval::Daily
        .last_boundary(Utc::now() + chrono::Duration::milliseconds(skew));
    assert_eq!(refilled_at, midnight, "refilled as of the boundary just passed");
    a.settle().await;
    b.settle().await;
    // One refill, and one flush of one call on each replica.
    let after = seq(a.database_url.clone(), key.id.clone()).await;
    assert_eq!(after - before, 3, "credits_seq moved {before} → {after}");
    assert_eq!(
        scalar(&a.database_url, &format!("SELECT credits_remaining FROM api_keys WHERE id = '{}'", key.id))
            .await,
        3,
        "5 after the refill, less one call on each replica"
    );
    let epoch =
        scalar(&a.database_url, &format!("SELECT credits_epoch FROM api_keys WHERE id = '{}'", key.id)).await;
    assert_eq!(epoch, 1, "one refill: one new epoch");
    if shared {
        let client = redis::Client::open(redis_url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let seeded: Option<i64> = redis::cmd("HGET")
            .arg(format!("keywarden:cr:{{{}}}", key.id))
            .arg("epoch")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(seeded, Some(1), "Redis's copy was seeded again from the refilled balance");
    }
    b.stop().await;
    a.stop().await;
}
