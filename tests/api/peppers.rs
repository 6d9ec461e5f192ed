//! Pepper rotation without downtime: keys and operator tokens made under
//! generation 1 keep working once generation 2 is current, move to it on
//! their next use, and then no longer need pepper 1; `peppers status`
//! counts what is left on each generation.

use std::collections::HashMap;

use keywarden::{api::pb, config::Settings};
use secrecy::SecretString;

use crate::helpers::{
    AdminClient, Backend, TestApp, allowed, cli, create_sales_key, issue_operator, json, outcome, revoke,
    spawn_app, spawn_app_on, until, value,
};

backend_tests!(
    keys_and_operator_tokens_move_to_the_current_pepper_and_then_need_only_it,
    a_key_left_on_a_retired_pepper_fails_loudly_and_is_counted,
);

const PEPPER_2: &str = "MjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjI=";

/// Generation 2 added and current; generation 1 still configured.
fn rotated(s: &mut Settings) {
    s.peppers.insert("2".into(), SecretString::from(PEPPER_2));
    s.pepper_current = Some("2".into());
}

/// Generation 1 removed from the configuration.
fn retired(s: &mut Settings) {
    rotated(s);
    s.pepper = None;
}

async fn status(admin: &mut AdminClient) -> HashMap<String, pb::PepperGeneration> {
    let generations =
        admin.get_pepper_status(pb::GetPepperStatusRequest {}).await.unwrap().into_inner().generations;
    generations.into_iter().map(|g| (g.id.clone(), g)).collect()
}

/// (live keys, live operator tokens, inactive keys) on generation `id`.
async fn counts(admin: &mut AdminClient, id: &str) -> (i64, i64, i64) {
    status(admin).await.get(id).map_or((0, 0, 0), |g| (g.live_keys, g.live_operator_tokens, g.inactive_keys))
}

async fn stored_hash(app: &TestApp, key_id: &str) -> String {
    value(&app.database_url, &format!("SELECT key_hash FROM api_keys WHERE id = '{key_id}'")).await
}

async fn keys_and_operator_tokens_move_to_the_current_pepper_and_then_need_only_it(backend: Backend) {
    // Generation 1 only: a key used soon, one used later, a revoked one, an
    // operator token.
    let mut first = spawn_app(backend).await;
    let (used_id, used) = create_sales_key(&mut first.admin, "used").await;
    let (later_id, later) = create_sales_key(&mut first.admin, "later").await;
    let (revoked_id, _) = create_sales_key(&mut first.admin, "revoked").await;
    revoke(&mut first.admin, &revoked_id).await;
    let (_, operator) = issue_operator(&mut first.admin, "ops", pb::OperatorRole::Admin, &[]).await;
    // A webhook endpoint's secret is sealed under the current pepper too.
    first
        .admin
        .create_webhook_endpoint(pb::CreateWebhookEndpointRequest {
            url: "https://hooks.example.com/keywarden".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let answered = first.verify(&used, "", "sales:read").await;
    assert_eq!(outcome(&answered), allowed());
    assert!(stored_hash(&first, &used_id).await.starts_with("v1$"));
    first.settle().await;
    first.stop_serving().await;

    // Generation 2 current, generation 1 still configured.
    let mut app = spawn_app_on(&first, rotated).await;
    let before = status(&mut app.admin).await;
    let (one, two) = (&before["1"], &before["2"]);
    assert!(two.current && two.configured && !two.retirable);
    assert!(!one.current && one.configured && !one.retirable);
    assert_eq!((one.live_keys, one.live_operator_tokens, one.inactive_keys), (2, 1, 1));
    assert_eq!(
        (one.webhook_endpoints, two.webhook_endpoints),
        (1, 0),
        "sealed under the pepper it was made under"
    );
    assert_eq!((two.live_keys, two.live_operator_tokens), (0, 0));

    // An audit id issued under pepper 1 before the rollout is still placed.
    let recorded = app
        .verify
        .record_outcomes(pb::RecordOutcomesRequest {
            outcomes: vec![pb::Outcome { audit_event_id: answered.audit_event_id.clone(), status: 200 }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(recorded.updated, 1);

    // A generation-1 key keeps verifying, and is moved to generation 2.
    assert_eq!(outcome(&app.verify(&used, "", "sales:read").await), allowed());
    // So is the operator token, on its next use.
    let mut as_operator = app.admin_as(&operator);
    as_operator
        .get_pepper_status(pb::GetPepperStatusRequest {})
        .await
        .expect("the gen-1 token authenticates");
    until("the used key and the token to move to pepper 2", || {
        let mut admin = app.admin.clone();
        async move { (counts(&mut admin, "1").await == (1, 0, 1)).then_some(()) }
    })
    .await;
    assert!(stored_hash(&app, &used_id).await.starts_with("v2$2$"));
    assert_eq!(counts(&mut app.admin, "2").await, (1, 1, 0));

    // The other key moves when it is used; the webhook endpoint does not
    // move (its secret is not rehashed but sealed): generation 1 is
    // retirable once it is gone.
    assert_eq!(outcome(&app.verify(&later, "", "sales:read").await), allowed());
    until("the last live key to move to pepper 2", || {
        let mut admin = app.admin.clone();
        async move { (counts(&mut admin, "1").await.0 == 0).then_some(()) }
    })
    .await;
    assert!(!status(&mut app.admin).await["1"].retirable, "the endpoint still needs it");
    let hooks =
        app.admin.list_webhook_endpoints(pb::ListWebhookEndpointsRequest {}).await.unwrap().into_inner();
    let id = hooks.endpoints[0].id.clone();
    app.admin.delete_webhook_endpoint(pb::DeleteWebhookEndpointRequest { id }).await.unwrap();
    assert!(status(&mut app.admin).await["1"].retirable);
    assert_eq!(counts(&mut app.admin, "1").await, (0, 0, 1), "only the revoked key is left on generation 1");
    assert!(stored_hash(&app, &later_id).await.starts_with("v2$2$"));
    // The revoked key is never rehashed: it will never verify again.
    assert!(stored_hash(&app, &revoked_id).await.starts_with("v1$"));

    // New keys are made under generation 2, and the CLI tells the same story.
    let (new_id, new) = create_sales_key(&mut app.admin, "new").await;
    assert!(stored_hash(&app, &new_id).await.starts_with("v2$2$"));
    let (table, _) = cli(&app, &["peppers", "status"]);
    assert!(table.contains("PEPPER") && table.contains("RETIRABLE"), "{table}");
    let (out, _) = cli(&app, &["peppers", "status", "--json"]);
    let listed = json(&out);
    assert_eq!(listed["generations"][0]["id"], "2", "the current generation first: {listed}");
    assert_eq!(listed["generations"][0]["live_keys"], 3);
    assert_eq!(listed["generations"][1]["id"], "1");
    assert_eq!(listed["generations"][1]["retirable"], true);
    app.stop_serving().await;

    // Pepper 1 removed: everything that moved works without it.
    let mut retired_app = spawn_app_on(&first, retired).await;
    for key in [&used, &later, &new] {
        assert_eq!(outcome(&retired_app.verify(key, "", "sales:read").await), allowed());
    }
    let mut as_operator = retired_app.admin_as(&operator);
    let after = as_operator.get_pepper_status(pb::GetPepperStatusRequest {}).await.unwrap().into_inner();
    let one = after.generations.iter().find(|g| g.id == "1").expect("generation 1 is still stored");
    assert!(!one.configured && one.retirable);
    assert_eq!(one.inactive_keys, 1);
    retired_app.stop_serving().await;
    first.stop().await;
}

async fn a_key_left_on_a_retired_pepper_fails_loudly_and_is_counted(backend: Backend) {
    let mut first = spawn_app(backend).await;
    let (_, key) = create_sales_key(&mut first.admin, "never used").await;
    first.stop_serving().await;

    let mut app = spawn_app_on(&first, retired).await;
    // Not a wrong secret (NOT_FOUND, counted toward throttling): an error
    // that says which pepper is missing.
    let failed = app.verify.verify(crate::helpers::sales(&key)).await.unwrap_err();
    assert_eq!(failed.code(), tonic::Code::Internal, "{failed:?}");
    let one = status(&mut app.admin).await.remove("1").expect("generation 1 is stored");
    assert!(!one.configured && !one.retirable);
    assert_eq!(one.live_keys, 1);
    app.stop_serving().await;
    first.stop().await;
}
