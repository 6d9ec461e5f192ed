//! Per-key rate limits (issue 23): set through KeyAdmin, enforced by
//! Verify on the replica that answers (local mode).

use std::time::Duration;

use keywarden::api::pb;

use crate::helpers::{Backend, MERCHANT, TestApp, allowed, deny, outcome, spawn_app, violated_fields};

backend_tests!(
    a_key_limited_to_five_per_ten_seconds_refuses_the_sixth_call_until_its_window_has_passed,
    rate_limits_are_validated_by_field_kept_by_update_and_carried_by_regeneration,
);

fn limit(name: &str, limit: u32, window: Duration) -> pb::RateLimit {
    pb::RateLimit {
        name: name.into(),
        limit,
        window: Some(prost_types::Duration {
            seconds: window.as_secs() as i64,
            nanos: window.subsec_nanos() as i32,
        }),
    }
}

async fn limited_key(app: &mut TestApp, limits: Vec<pb::RateLimit>) -> (pb::ApiKey, String) {
    app.create_key(pb::CreateKeyRequest {
        merchant_id: MERCHANT.into(),
        name: "limited".into(),
        scopes: vec!["sales:read".into()],
        rate_limits: limits,
        ..Default::default()
    })
    .await
}

fn time(t: &Option<prost_types::Timestamp>) -> chrono::DateTime<chrono::Utc> {
    let t = t.as_ref().expect("a timestamp");
    chrono::DateTime::from_timestamp(t.seconds, t.nanos as u32).unwrap()
}

async fn a_key_limited_to_five_per_ten_seconds_refuses_the_sixth_call_until_its_window_has_passed(
    backend: Backend,
) {
    let mut app = spawn_app(backend).await;
    let (key, plaintext) = limited_key(&mut app, vec![limit("per-10s", 5, Duration::from_secs(10))]).await;
    let (_, unlimited) = app.key_with_scopes(&["sales:read"]).await;

    // A call the policy refuses takes no token; it also caches the key, so
    // that the burst below is five warm calls well within one token's 2 s.
    let wrong_scope = app.verify(&plaintext, "", "invoice:write").await;
    assert_eq!(outcome(&wrong_scope), deny(pb::DenyReason::InsufficientScope));
    assert_eq!(wrong_scope.rate_limit, None, "a denial by policy says nothing of limits");

    let started = chrono::Utc::now();
    let mut reset_at = started;
    for remaining in (0..5).rev() {
        let r = app.verify(&plaintext, "", "sales:read").await;
        assert_eq!(outcome(&r), allowed());
        let status = r.rate_limit.expect("an allowed call reports its tightest limit");
        assert_eq!((status.name.as_str(), status.limit, status.remaining), ("per-10s", 5, remaining));
        assert!(time(&status.reset_at) > reset_at, "each call pushes the full-again time later");
        reset_at = time(&status.reset_at);
    }
    let full_in = reset_at - started;
    assert!(
        full_in > chrono::Duration::seconds(9) && full_in <= chrono::Duration::milliseconds(10_500),
        "full again one window after the burst, not {full_in}"
    );

    let sixth = app.verify(&plaintext, "", "sales:read").await;
    assert_eq!(outcome(&sixth), deny(pb::DenyReason::RateLimited));
    let status = sixth.rate_limit.expect("a rate-limited call says which limit");
    assert_eq!((status.name.as_str(), status.remaining), ("per-10s", 0));
    assert!(time(&status.reset_at) >= reset_at, "the refusal took no token");
    // Other keys are not affected.
    assert_eq!(outcome(&app.verify(&unlimited, "", "sales:read").await), allowed());

    // The refusal is audited on the key, as a 429.
    let events = app.audit_of(&key.id).await;
    let refused = events.iter().find(|e| e.id == sixth.audit_event_id).expect("the refusal's row");
    assert_eq!((refused.deny_reason, refused.status), (pb::DenyReason::RateLimited as i32, 429));

    // Once the window has passed the whole limit is available again.
    let wait = (reset_at - chrono::Utc::now()).to_std().unwrap_or_default();
    tokio::time::sleep(wait + Duration::from_millis(50)).await;
    for _ in 0..5 {
        assert_eq!(outcome(&app.verify(&plaintext, "", "sales:read").await), allowed());
    }
    assert_eq!(outcome(&app.verify(&plaintext, "", "sales:read").await), deny(pb::DenyReason::RateLimited));
    app.stop().await;
}

async fn rate_limits_are_validated_by_field_kept_by_update_and_carried_by_regeneration(backend: Backend) {
    let mut app = spawn_app(backend).await;
    let refused = app
        .admin
        .create_key(pb::CreateKeyRequest {
            merchant_id: MERCHANT.into(),
            name: "bad limits".into(),
            scopes: vec!["sales:read".into()],
            rate_limits: vec![
                limit("burst", 0, Duration::from_secs(1)),
                limit("burst", 10, Duration::from_millis(500)),
                limit("Daily", 10, Duration::from_secs(86_401)),
            ],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        violated_fields(&refused),
        [
            "rate_limits[0].limit",
            "rate_limits[1].name",
            "rate_limits[1].window",
            "rate_limits[2].name",
            "rate_limits[2].window"
        ]
    );
    let keys = app
        .admin
        .list_keys(pb::ListKeysRequest { merchant_id: MERCHANT.into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert!(keys.api_keys.is_empty(), "a refused request changes nothing");

    let limits =
        vec![limit("burst", 1, Duration::from_secs(60)), limit("daily", 1000, Duration::from_secs(86_400))];
    let (key, plaintext) = limited_key(&mut app, limits.clone()).await;
    assert_eq!(key.rate_limits, limits);
    assert_eq!(outcome(&app.verify(&plaintext, "", "").await), allowed());
    assert_eq!(outcome(&app.verify(&plaintext, "", "").await), deny(pb::DenyReason::RateLimited));

    // An update of other fields keeps the limits; one naming them replaces
    // them, and the new limits apply at once.
    let update = |paths: &[&str], rate_limits: Vec<pb::RateLimit>| pb::UpdateKeyRequest {
        merchant_id: MERCHANT.into(),
        key_id: key.id.clone(),
        name: "renamed".into(),
        rate_limits,
        update_mask: Some(prost_types::FieldMask { paths: paths.iter().map(|p| (*p).to_owned()).collect() }),
        ..Default::default()
    };
    let renamed =
        app.admin.update_key(update(&["name"], vec![])).await.unwrap().into_inner().api_key.unwrap();
    assert_eq!(renamed.rate_limits, limits);
    let loosened = vec![limit("burst", 3, Duration::from_secs(60))];
    let updated = app
        .admin
        .update_key(update(&["rate_limits"], loosened.clone()))
        .await
        .unwrap()
        .into_inner()
        .api_key
        .unwrap();
    assert_eq!(updated.rate_limits, loosened);
    for _ in 0..3 {
        assert_eq!(outcome(&app.verify(&plaintext, "", "").await), allowed());
    }
    assert_eq!(outcome(&app.verify(&plaintext, "", "").await), deny(pb::DenyReason::RateLimited));
    let bad = app
        .admin
        .update_key(update(&["rate_limits"], vec![limit("x", 1, Duration::ZERO)]))
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&bad), ["rate_limits[0].window"]);

    // RegenerateKey's successor keeps the limits; clearing them lifts them.
    let regenerated = app
        .admin
        .regenerate_key(pb::RegenerateKeyRequest {
            merchant_id: MERCHANT.into(),
            key_id: key.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let successor = regenerated.api_key.unwrap();
    assert_eq!(successor.rate_limits, loosened);
    let cleared = app
        .admin
        .update_key(pb::UpdateKeyRequest { key_id: successor.id.clone(), ..update(&["rate_limits"], vec![]) })
        .await
        .unwrap()
        .into_inner()
        .api_key
        .unwrap();
    assert!(cleared.rate_limits.is_empty());
    for _ in 0..10 {
        let r = app.verify(&regenerated.plaintext_key, "", "").await;
        assert_eq!((outcome(&r), r.rate_limit), (allowed(), None));
    }
    app.stop().await;
}
