//! KeyAdmin through the real server: lifecycle, validation, pagination,
//! isolation between merchants, authentication and the audit trail.

use keywarden::api::pb::{self, DenyReason as R, KeyStatus};
use prost_types::{Duration as PbDuration, FieldMask, Timestamp};
use tonic::Code;

use crate::helpers::{
    Backend, MERCHANT, OTHER_MERCHANT, PORTAL_TOKEN, Proxy, TestApp, allowed, deny, outcome, spawn_app,
    spawn_app_over, until, violated_fields,
};

backend_tests!(
    create_shows_the_plaintext_once_and_stores_only_its_hash,
    create_rejects_bad_input_naming_each_field_and_changes_nothing,
    create_accepts_exactly_one_of_scopes_or_preset,
    list_keys_pages_newest_first_with_stable_cursors,
    list_keys_hides_revoked_keys_unless_asked,
    update_changes_only_masked_fields_and_can_clear_limits,
    update_rejects_empty_or_unknown_masks_and_revoked_keys,
    revoke_is_immediate_and_idempotent,
    regenerate_without_grace_revokes_the_old_key_at_once,
    regenerate_with_grace_keeps_the_old_key_verifying_while_rotating,
    regenerate_refuses_revoked_keys_and_long_grace_periods,
    another_merchants_keys_are_not_found,
    admin_calls_need_a_valid_token_and_record_its_name,
    list_scopes_shows_the_catalogue_implications_and_presets,
    audit_trail_filters_by_key_and_time_and_pages,
    admin_actions_are_audited_in_the_same_transaction,
    a_change_whose_audit_row_cannot_be_written_does_not_happen,
);
once_tests!(committed_changes_answer_what_they_committed_when_the_database_goes_right_after(
    postgres,
    current_thread
),);

fn create_req(name: &str, scopes: &[&str]) -> pb::CreateKeyRequest {
    pb::CreateKeyRequest {
        merchant_id: MERCHANT.into(),
        name: name.into(),
        scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
        ..Default::default()
    }
}

fn ts(t: chrono::DateTime<chrono::Utc>) -> Timestamp {
    Timestamp { seconds: t.timestamp(), nanos: t.timestamp_subsec_nanos() as i32 }
}

fn mask(paths: &[&str]) -> Option<FieldMask> {
    Some(FieldMask { paths: paths.iter().map(|p| (*p).to_owned()).collect() })
}

async fn get(app: &mut TestApp, merchant: &str, id: &str) -> Result<pb::ApiKey, tonic::Status> {
    app.admin
        .get_key(pb::GetKeyRequest { merchant_id: merchant.into(), key_id: id.into() })
        .await
        .map(|r| r.into_inner().api_key.unwrap())
}

async fn list(app: &mut TestApp, page_size: i32, token: &str, include_revoked: bool) -> pb::ListKeysResponse {
    app.admin
        .list_keys(pb::ListKeysRequest {
            merchant_id: MERCHANT.into(),
            page_size,
            page_token: token.into(),
            include_revoked,
        })
        .await
        .unwrap()
        .into_inner()
}

async fn revoke(app: &mut TestApp, id: &str) -> pb::ApiKey {
    app.admin
        .revoke_key(pb::RevokeKeyRequest {
            merchant_id: MERCHANT.into(),
            key_id: id.into(),
            reason: "test".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .api_key
        .unwrap()
}

/// Every column of every row, as text, for "the secret is nowhere" checks.
async fn dump_database(app: &TestApp) -> String {
    use sea_orm::{ConnectionTrait, Database, Statement};
    let db = Database::connect(&app.database_url).await.unwrap();
    let backend = db.get_database_backend();
    let mut out = String::new();
    for table in ["api_keys", "audit_events"] {
        let sql = match backend {
            sea_orm::DbBackend::Postgres => format!("SELECT row_to_json(t)::text AS j FROM {table} t"),
            _ => format!("SELECT * FROM {table}"),
        };
        for row in db.query_all_raw(Statement::from_string(backend, sql)).await.unwrap() {
            out.push_str(&format!("{row:?}\n"));
        }
    }
    out
}

async fn create_shows_the_plaintext_once_and_stores_only_its_hash(backend: Backend) {
    let mut app = spawn_app(backend).await;
    let (created, plaintext) = app.create_key(create_req("Website Checkout", &["invoice:write"])).await;
    assert_eq!(created.status, KeyStatus::Active as i32);
    assert_eq!(created.created_by, "admin");
    assert_eq!(created.prefix, &plaintext[..16]);
    let fetched = get(&mut app, MERCHANT, &created.id).await.unwrap();
    assert_eq!(fetched.prefix, created.prefix);
    let listed = list(&mut app, 0, "", false).await;
    assert!(format!("{fetched:?}{listed:?}").contains(&created.prefix));
    assert!(!format!("{fetched:?}{listed:?}").contains(&plaintext[16..]));
    app.settle().await;
    let dump = dump_database(&app).await;
    assert!(!dump.contains(&plaintext[16..]), "no part of the secret may be stored");
    let row = app.probes.store.find_by_id(&created.id).await.unwrap().unwrap();
    assert!(row.hash.to_string().starts_with("v1$"));
    assert_eq!(row.hash.to_string().split('$').count(), 3);
    app.stop().await;
}

async fn create_rejects_bad_input_naming_each_field_and_changes_nothing(backend: Backend) {
    let mut app = spawn_app(backend).await;
    let past = chrono::Utc::now() - chrono::Duration::minutes(1);
    let many_cidrs: Vec<String> = (0..101).map(|i| format!("10.0.0.{i}")).collect();
    let cases: Vec<(pb::CreateKeyRequest, Vec<&str>)> = vec![
        (
            pb::CreateKeyRequest { merchant_id: "".into(), ..create_req("n", &["sales:read"]) },
            vec!["merchant_id"],
        ),
        (
            pb::CreateKeyRequest { merchant_id: "a b".into(), ..create_req("n", &["sales:read"]) },
            vec!["merchant_id"],
        ),
        (
            pb::CreateKeyRequest { merchant_id: "m".repeat(65), ..create_req("n", &["sales:read"]) },
            vec!["merchant_id"],
        ),
        (create_req("", &["sales:read"]), vec!["name"]),
        (create_req(&"n".repeat(101), &["sales:read"]), vec!["name"]),
        (create_req("bad\u{7}name", &["sales:read"]), vec!["name"]),
        (create_req("n", &["Invoice:Read"]), vec!["scopes"]),
        (create_req("n", &["sales:read", "sales:read"]), vec!["scopes"]),
        (create_req("n", &["payments:refund"]), vec!["scopes"]),
        (create_req("n", &[]), vec!["scopes"]),
        (
            pb::CreateKeyRequest { expires_at: Some(ts(past)), ..create_req("n", &["sales:read"]) },
            vec!["expires_at"],
        ),
        (
            pb::CreateKeyRequest {
                allowed_cidrs: vec!["10.0.0.1".into(), "10.1.2.3/8".into()],
                ..create_req("n", &["sales:read"])
            },
            vec!["allowed_cidrs[1]"],
        ),
        (
            pb::CreateKeyRequest {
                allowed_cidrs: vec!["example.com".into()],
                ..create_req("n", &["sales:read"])
            },
            vec!["allowed_cidrs[0]"],
        ),
        (
            pb::CreateKeyRequest { allowed_cidrs: many_cidrs, ..create_req("n", &["sales:read"]) },
            vec!["allowed_cidrs"],
        ),
        (
            pb::CreateKeyRequest { merchant_id: "".into(), ..create_req("", &["nope:nope"]) },
            vec!["merchant_id", "name", "scopes"],
        ),
    ];
    for (request, fields) in cases {
        let status = app.admin.create_key(request.clone()).await.unwrap_err();
        assert_eq!(violated_fields(&status), fields, "{request:?}");
        assert!(fields.iter().all(|f| status.message().contains(f.split('[').next().unwrap())));
    }
    let err = app.admin.create_key(create_req("n", &["Invoice:Read"])).await.unwrap_err();
    assert!(
        err.message().contains("case-sensitive") && err.message().contains("invoice:read"),
        "{}",
        err.message()
    );
    assert!(list(&mut app, 0, "", true).await.api_keys.is_empty(), "nothing was created");
    assert!(app.audit_of("").await.is_empty(), "nothing was audited");
    assert_eq!(app.probes.pool.runs(), 0, "no key was even hashed");
    app.stop().await;
}

async fn create_accepts_exactly_one_of_scopes_or_preset(backend: Backend) {
    let mut app = spawn_app(backend).await;
    let both = pb::CreateKeyRequest { preset: "crm_integration".into(), ..create_req("n", &["sales:read"]) };
    assert_eq!(violated_fields(&app.admin.create_key(both).await.unwrap_err()), ["preset"]);
    let unknown = pb::CreateKeyRequest { preset: "everything".into(), ..create_req("n", &[]) };
    let err = app.admin.create_key(unknown).await.unwrap_err();
    assert_eq!(violated_fields(&err), ["preset"]);
    assert!(err.message().contains("website_checkout"));
    for (preset, scopes) in [
        ("openclaw_skill", vec!["customer:write", "invoice:write", "sales:read"]),
        ("website_checkout", vec!["customer:write", "invoice:write"]),
        ("analytics_dashboard", vec!["invoice:read", "sales:read"]),
        ("crm_integration", vec!["customer:read", "customer:write", "invoice:read"]),
    ] {
        let (key, _) =
            app.create_key(pb::CreateKeyRequest { preset: preset.into(), ..create_req(preset, &[]) }).await;
        assert_eq!(key.scopes, scopes, "{preset}");
    }
    app.stop().await;
}

async fn list_keys_pages_newest_first_with_stable_cursors(backend: Backend) {
    let mut app = spawn_app(backend).await;
    let mut created = Vec::new();
    for i in 0..7 {
        created.push(app.create_key(create_req(&format!("key {i}"), &["sales:read"])).await.0.id);
    }
    created.reverse();
    let first = list(&mut app, 3, "", false).await;
    assert_eq!(first.api_keys.len(), 3);
    // A key created between pages must not shift the cursor.
    let (newest, _) = app.create_key(create_req("late", &["sales:read"])).await;
    let second = list(&mut app, 3, &first.next_page_token, false).await;
    let third = list(&mut app, 3, &second.next_page_token, false).await;
    assert!(third.next_page_token.is_empty());
    let seen: Vec<String> =
        [first.api_keys, second.api_keys, third.api_keys].concat().into_iter().map(|k| k.id).collect();
    assert_eq!(seen, created);
    let everything = list(&mut app, 0, "", false).await.api_keys;
    assert_eq!(everything[0].id, newest.id);
    assert_eq!(everything.len(), 8);
    for token in ["garbage!", "bm90LWEtdG9rZW4"] {
        let status = app
            .admin
            .list_keys(pb::ListKeysRequest {
                merchant_id: MERCHANT.into(),
                page_token: token.into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(violated_fields(&status), ["page_token"]);
    }
    let status = app
        .admin
        .list_keys(pb::ListKeysRequest { merchant_id: MERCHANT.into(), page_size: -1, ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["page_size"]);
    app.stop().await;
}

async fn list_keys_hides_revoked_keys_unless_asked(backend: Backend) {
    let mut app = spawn_app(backend).await;
    let (kept, _) = app.key_with_scopes(&["sales:read"]).await;
    let (gone, _) = app.key_with_scopes(&["sales:read"]).await;
    revoke(&mut app, &gone.id).await;
    let ids = |r: pb::ListKeysResponse| r.api_keys.into_iter().map(|k| k.id).collect::<Vec<_>>();
    assert_eq!(ids(list(&mut app, 0, "", false).await), std::slice::from_ref(&kept.id));
    assert_eq!(ids(list(&mut app, 0, "", true).await), [gone.id, kept.id]);
    app.stop().await;
}

async fn update_changes_only_masked_fields_and_can_clear_limits(backend: Backend) {
    let mut app = spawn_app(backend).await;
    let expiry = chrono::Utc::now() + chrono::Duration::days(30);
    let (key, plaintext) = app
        .create_key(pb::CreateKeyRequest {
            allowed_cidrs: vec!["10.0.0.0/8".into()],
            expires_at: Some(ts(expiry)),
            ..create_req("before", &["invoice:read"])
        })
        .await;
    let updated = app
        .admin
        .update_key(pb::UpdateKeyRequest {
            merchant_id: MERCHANT.into(),
            key_id: key.id.clone(),
            name: "after".into(),
            scopes: vec!["sales:read".into()],
            update_mask: mask(&["name"]),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .api_key
        .unwrap();
    assert_eq!(updated.name, "after");
    assert_eq!(updated.scopes, ["invoice:read"], "scopes were not in the mask");
    assert_eq!(updated.allowed_cidrs, ["10.0.0.0/8"]);
    let cleared = app
        .admin
        .update_key(pb::UpdateKeyRequest {
            merchant_id: MERCHANT.into(),
            key_id: key.id.clone(),
            update_mask: mask(&["allowed_cidrs", "expires_at"]),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .api_key
        .unwrap();
    assert!(cleared.allowed_cidrs.is_empty() && cleared.expires_at.is_none());
    assert_eq!(cleared.name, "after");
    assert_eq!(outcome(&app.verify(&plaintext, "8.8.8.8", "invoice:read").await), allowed());
    app.stop().await;
}

async fn update_rejects_empty_or_unknown_masks_and_revoked_keys(backend: Backend) {
    let mut app = spawn_app(backend).await;
    let (key, _) = app.key_with_scopes(&["sales:read"]).await;
    let update = |paths: &[&str], name: &str, scopes: &[&str]| pb::UpdateKeyRequest {
        merchant_id: MERCHANT.into(),
        key_id: key.id.clone(),
        name: name.into(),
        scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
        update_mask: mask(paths),
        ..Default::default()
    };
    let past = chrono::Utc::now() - chrono::Duration::seconds(5);
    for (request, field) in [
        (update(&[], "x", &[]), "update_mask"),
        (pb::UpdateKeyRequest { update_mask: None, ..update(&[], "x", &[]) }, "update_mask"),
        (update(&["prefix"], "x", &[]), "update_mask"),
        (update(&["name"], "", &[]), "name"),
        (update(&["scopes"], "", &[]), "scopes"),
        (update(&["scopes"], "", &["Sales:Read"]), "scopes"),
        (
            pb::UpdateKeyRequest { expires_at: Some(ts(past)), ..update(&["expires_at"], "", &[]) },
            "expires_at",
        ),
    ] {
        let status = app.admin.update_key(request).await.unwrap_err();
        assert_eq!(violated_fields(&status), [field]);
    }
    let unchanged = get(&mut app, MERCHANT, &key.id).await.unwrap();
    assert_eq!(
        (unchanged.name.as_str(), unchanged.scopes.clone()),
        ("test key", vec!["sales:read".to_owned()])
    );
    revoke(&mut app, &key.id).await;
    let status = app.admin.update_key(update(&["name"], "renamed", &[])).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    app.stop().await;
}

async fn revoke_is_immediate_and_idempotent(backend: Backend) {
    let mut app = spawn_app(backend).await;
    let (key, plaintext) = app.key_with_scopes(&["sales:read"]).await;
    let first = revoke(&mut app, &key.id).await;
    assert_eq!(first.status, KeyStatus::Revoked as i32);
    assert_eq!(first.revoke_reason, "test");
    assert_eq!(outcome(&app.verify(&plaintext, "", "").await), deny(R::Revoked));
    let second = app
        .admin
        .revoke_key(pb::RevokeKeyRequest {
            merchant_id: MERCHANT.into(),
            key_id: key.id.clone(),
            reason: "again".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .api_key
        .unwrap();
    assert_eq!(second.revoked_at, first.revoked_at, "revoked_at unchanged");
    assert_eq!(second.revoke_reason, "test");
    let revocations =
        app.audit_of(&key.id).await.into_iter().filter(|e| e.kind == pb::AuditEventKind::KeyRevoked as i32);
    assert_eq!(revocations.count(), 1);
    app.stop().await;
}

async fn regenerate(
    app: &mut TestApp,
    id: &str,
    grace: Option<PbDuration>,
) -> Result<pb::RegenerateKeyResponse, tonic::Status> {
    app.admin
        .regenerate_key(pb::RegenerateKeyRequest {
            merchant_id: MERCHANT.into(),
            key_id: id.into(),
            grace_period: grace,
        })
        .await
        .map(|r| r.into_inner())
}

async fn regenerate_without_grace_revokes_the_old_key_at_once(backend: Backend) {
    let mut app = spawn_app(backend).await;
    let expiry = chrono::Utc::now() + chrono::Duration::days(90);
    let (old, old_plaintext) = app
        .create_key(pb::CreateKeyRequest {
            allowed_cidrs: vec!["10.0.0.0/8".into()],
            expires_at: Some(ts(expiry)),
            ..create_req("rotating", &["invoice:write"])
        })
        .await;
    let done = regenerate(&mut app, &old.id, None).await.unwrap();
    let new = done.api_key.unwrap();
    let previous = done.previous_key.unwrap();
    assert_ne!(new.id, old.id);
    assert_ne!(done.plaintext_key, old_plaintext);
    assert_eq!(
        (new.name.as_str(), &new.scopes, &new.allowed_cidrs),
        ("rotating", &old.scopes, &old.allowed_cidrs)
    );
    let lifetime = expiry.timestamp() - old.created_at.unwrap().seconds;
    let new_lifetime = new.expires_at.unwrap().seconds - new.created_at.unwrap().seconds;
    assert!((lifetime - new_lifetime).abs() <= 1, "the successor keeps the old key's lifetime");
    assert_eq!(previous.replaced_by_key_id, new.id);
    assert_eq!(previous.status, KeyStatus::Revoked as i32);
    assert_eq!(outcome(&app.verify(&old_plaintext, "10.0.0.1", "invoice:write").await), deny(R::Revoked));
    let r = app.verify(&done.plaintext_key, "10.0.0.1", "invoice:write").await;
    assert_eq!((outcome(&r), r.key_id.as_str()), (allowed(), new.id.as_str()));
    app.stop().await;
}

async fn regenerate_with_grace_keeps_the_old_key_verifying_while_rotating(backend: Backend) {
    let mut app = spawn_app(backend).await;
    let (old, old_plaintext) = app.key_with_scopes(&["sales:read"]).await;
    // Identified before the grace starts: only cached work races its end.
    assert_eq!(outcome(&app.verify(&old_plaintext, "", "sales:read").await), allowed());
    let done = regenerate(&mut app, &old.id, Some(PbDuration { seconds: 2, nanos: 0 })).await.unwrap();
    let previous = done.previous_key.unwrap();
    assert_eq!(previous.status, KeyStatus::Rotating as i32);
    assert_eq!(outcome(&app.verify(&old_plaintext, "", "sales:read").await), allowed());
    assert_eq!(outcome(&app.verify(&done.plaintext_key, "", "sales:read").await), allowed());
    let status = regenerate(&mut app, &old.id, None).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "a rotating key already has a successor");
    let verify = app.verify.clone();
    let after_grace = until("the grace period to end", || {
        let (mut client, key) = (verify.clone(), old_plaintext.clone());
        async move {
            let request =
                pb::VerifyRequest { key, required_scope: "sales:read".into(), ..Default::default() };
            let r = client.verify(request).await.unwrap().into_inner();
            Some(outcome(&r)).filter(|o| *o != allowed())
        }
    })
    .await;
    assert_eq!(after_grace, deny(R::Revoked));
    assert_eq!(get(&mut app, MERCHANT, &old.id).await.unwrap().status, KeyStatus::Revoked as i32);
    app.stop().await;
}

async fn regenerate_refuses_revoked_keys_and_long_grace_periods(backend: Backend) {
    let mut app = spawn_app(backend).await;
    let (key, _) = app.key_with_scopes(&["sales:read"]).await;
    for grace in [PbDuration { seconds: 7 * 86_400 + 1, nanos: 0 }, PbDuration { seconds: -1, nanos: 0 }] {
        let status = regenerate(&mut app, &key.id, Some(grace)).await.unwrap_err();
        assert_eq!(violated_fields(&status), ["grace_period"]);
    }
    assert!(regenerate(&mut app, &key.id, Some(PbDuration { seconds: 7 * 86_400, nanos: 0 })).await.is_ok());
    let (other, _) = app.key_with_scopes(&["sales:read"]).await;
    revoke(&mut app, &other.id).await;
    let status = regenerate(&mut app, &other.id, None).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("revoked"));
    app.stop().await;
}

async fn another_merchants_keys_are_not_found(backend: Backend) {
    let mut app = spawn_app(backend).await;
    let (key, plaintext) = app.key_with_scopes(&["sales:read"]).await;
    let id = key.id.clone();
    let other = OTHER_MERCHANT.to_owned();
    assert_eq!(get(&mut app, &other, &id).await.unwrap_err().code(), Code::NotFound);
    let mut admin = app.admin.clone();
    let codes = [
        admin
            .update_key(pb::UpdateKeyRequest {
                merchant_id: other.clone(),
                key_id: id.clone(),
                name: "stolen".into(),
                update_mask: mask(&["name"]),
                ..Default::default()
            })
            .await
            .unwrap_err()
            .code(),
        admin
            .revoke_key(pb::RevokeKeyRequest {
                merchant_id: other.clone(),
                key_id: id.clone(),
                reason: String::new(),
            })
            .await
            .unwrap_err()
            .code(),
        admin
            .regenerate_key(pb::RegenerateKeyRequest {
                merchant_id: other.clone(),
                key_id: id.clone(),
                grace_period: None,
            })
            .await
            .unwrap_err()
            .code(),
        admin
            .get_key_usage(pb::GetKeyUsageRequest { merchant_id: other.clone(), key_id: id.clone() })
            .await
            .unwrap_err()
            .code(),
    ];
    assert_eq!(codes, [Code::NotFound; 4]);
    let listed = admin
        .list_keys(pb::ListKeysRequest {
            merchant_id: other.clone(),
            include_revoked: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(listed.api_keys.is_empty());
    app.settle().await;
    let events = admin
        .list_audit_events(pb::ListAuditEventsRequest { merchant_id: other, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert!(events.events.is_empty());
    let still = get(&mut app, MERCHANT, &id).await.unwrap();
    assert_eq!((still.name.as_str(), still.status), ("test key", KeyStatus::Active as i32));
    assert_eq!(outcome(&app.verify(&plaintext, "", "").await), allowed());
    app.stop().await;
}

async fn admin_calls_need_a_valid_token_and_record_its_name(backend: Backend) {
    let mut app = spawn_app(backend).await;
    let mut anonymous = keywarden::api::pb::key_admin_client::KeyAdminClient::new(app.channel());
    let status = anonymous.list_scopes(pb::ListScopesRequest {}).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let mut wrong = app.admin_as("not-the-token-at-all-0000");
    let status = wrong.create_key(create_req("n", &["sales:read"])).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(list(&mut app, 0, "", true).await.api_keys.is_empty());
    let mut portal = app.admin_as(PORTAL_TOKEN);
    let created = portal.create_key(create_req("from portal", &["sales:read"])).await.unwrap().into_inner();
    let key = created.api_key.unwrap();
    assert_eq!(key.created_by, "portal");
    let events = app.audit_of(&key.id).await;
    assert_eq!(events[0].actor, "portal");
    assert_eq!(events[0].kind, pb::AuditEventKind::KeyCreated as i32);
    app.stop().await;
}

async fn list_scopes_shows_the_catalogue_implications_and_presets(backend: Backend) {
    let mut app = spawn_app(backend).await;
    let r = app.admin.list_scopes(pb::ListScopesRequest {}).await.unwrap().into_inner();
    let scopes: Vec<(String, Vec<String>)> = r.scopes.into_iter().map(|s| (s.name, s.implies)).collect();
    let s = |n: &str, i: &[&str]| (n.to_owned(), i.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>());
    assert_eq!(
        scopes,
        [
            s("customer:read", &[]),
            s("customer:write", &["customer:read"]),
            s("invoice:read", &[]),
            s("invoice:write", &["invoice:read"]),
            s("sales:read", &[]),
        ]
    );
    let presets: Vec<(String, Vec<String>, String)> =
        r.presets.into_iter().map(|p| (p.name, p.scopes, p.use_case)).collect();
    assert_eq!(presets.len(), 4);
    assert_eq!(presets[0].0, "openclaw_skill");
    assert_eq!(presets[0].2, "AI agent sending invoices");
    app.stop().await;
}

async fn audit_trail_filters_by_key_and_time_and_pages(backend: Backend) {
    let mut app = spawn_app(backend).await;
    let (a, key_a) = app.key_with_scopes(&["sales:read"]).await;
    let (b, key_b) = app.key_with_scopes(&["sales:read"]).await;
    for _ in 0..3 {
        app.verify(&key_a, "", "").await;
    }
    // The boundary is read off the server's own stamps (its clock follows
    // the database's, which may sit a little behind this process's): one
    // microsecond after the newest row so far, with a pause so that the
    // next stamps are past it.
    let before = app.audit_of(&a.id).await;
    let newest = before
        .iter()
        .filter_map(|e| e.timestamp.as_ref())
        .map(|t| chrono::DateTime::from_timestamp(t.seconds, t.nanos as u32).unwrap())
        .max()
        .unwrap();
    let boundary = newest + chrono::Duration::microseconds(1);
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    app.verify(&key_b, "", "").await;
    app.verify(&key_a, "", "").await;
    let a_events = app.audit_of(&a.id).await;
    assert_eq!(a_events.len(), 5, "1 created + 4 verified");
    assert!(a_events.iter().all(|e| e.api_key_id == a.id));
    let stamps: Vec<i64> = a_events
        .iter()
        .map(|e| {
            e.timestamp.as_ref().unwrap().seconds * 1_000_000_000
                + i64::from(e.timestamp.as_ref().unwrap().nanos)
        })
        .collect();
    assert!(stamps.windows(2).all(|w| w[0] >= w[1]), "newest first");
    let mut admin = app.admin.clone();
    let recent = admin
        .list_audit_events(pb::ListAuditEventsRequest {
            merchant_id: MERCHANT.into(),
            start_time: Some(ts(boundary)),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(recent.len(), 2);
    assert_eq!(recent[1].api_key_id, b.id);
    let older = admin
        .list_audit_events(pb::ListAuditEventsRequest {
            merchant_id: MERCHANT.into(),
            end_time: Some(ts(boundary)),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(older.len(), 5, "two creations and three verifications");
    let mut pages = Vec::new();
    let mut token = String::new();
    loop {
        let page = admin
            .list_audit_events(pb::ListAuditEventsRequest {
                merchant_id: MERCHANT.into(),
                page_size: 2,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        pages.extend(page.events.into_iter().map(|e| e.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(pages.len(), 7);
    pages.sort();
    pages.dedup();
    assert_eq!(pages.len(), 7, "no event twice");
    let status = admin
        .list_audit_events(pb::ListAuditEventsRequest {
            merchant_id: MERCHANT.into(),
            start_time: Some(ts(boundary)),
            end_time: Some(ts(boundary)),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["end_time"]);
    app.stop().await;
}

async fn admin_actions_are_audited_in_the_same_transaction(backend: Backend) {
    let mut app = spawn_app(backend).await;
    let (key, _) = app.key_with_scopes(&["sales:read"]).await;
    app.admin
        .update_key(pb::UpdateKeyRequest {
            merchant_id: MERCHANT.into(),
            key_id: key.id.clone(),
            name: "renamed".into(),
            update_mask: mask(&["name"]),
            ..Default::default()
        })
        .await
        .unwrap();
    let regenerated = regenerate(&mut app, &key.id, None).await.unwrap();
    let kinds: Vec<(i32, String, String)> =
        app.audit_of(&key.id).await.into_iter().map(|e| (e.kind, e.actor, e.api_key_name)).collect();
    use pb::AuditEventKind as K;
    assert_eq!(
        kinds,
        [
            (K::KeyRegenerated as i32, "admin".to_owned(), "renamed".to_owned()),
            (K::KeyUpdated as i32, "admin".to_owned(), "renamed".to_owned()),
            (K::KeyCreated as i32, "admin".to_owned(), "test key".to_owned()),
        ]
    );
    let successor = app.audit_of(&regenerated.api_key.unwrap().id).await;
    assert_eq!(successor.len(), 1);
    assert!(successor[0].detail.contains(&key.id));
    app.stop().await;
}

/// The audit row is part of the change: when the database refuses the row
/// (a trigger injects the failure), the change is rolled back with it. A
/// row written after the commit, or queued, would leave the change made
/// and unaudited.
async fn a_change_whose_audit_row_cannot_be_written_does_not_happen(backend: Backend) {
    let mut app = spawn_app(backend.clone()).await;
    let (key, plaintext) = app.key_with_scopes(&["sales:read"]).await;
    let refuse = |kind: &str| match backend {
        Backend::Sqlite => format!(
            "CREATE TRIGGER refuse_{kind} BEFORE INSERT ON audit_events WHEN NEW.kind = '{kind}' \
             BEGIN SELECT RAISE(ABORT, 'injected audit failure'); END"
        ),
        Backend::Postgres(_) => format!(
            "CREATE FUNCTION refuse_{kind}() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN RAISE EXCEPTION 'injected audit failure'; END $$; \
             CREATE TRIGGER refuse_{kind} BEFORE INSERT ON audit_events FOR EACH ROW \
             WHEN (NEW.kind = '{kind}') EXECUTE FUNCTION refuse_{kind}()"
        ),
    };
    for kind in ["KEY_CREATED", "KEY_UPDATED", "KEY_REVOKED", "KEY_REGENERATED"] {
        crate::helpers::execute(&app.database_url, &refuse(kind)).await;
    }
    let lister = app.admin.clone();
    let keys = || {
        let mut lister = lister.clone();
        async move {
            let request = pb::ListKeysRequest { merchant_id: MERCHANT.into(), ..Default::default() };
            lister.list_keys(request).await.unwrap().into_inner().api_keys
        }
    };
    let before = keys().await;

    let created = app
        .admin
        .create_key(pb::CreateKeyRequest {
            merchant_id: MERCHANT.into(),
            name: "never created".into(),
            scopes: vec!["sales:read".into()],
            ..Default::default()
        })
        .await;
    assert!(created.is_err(), "created without its audit row: {created:?}");
    let updated = app
        .admin
        .update_key(pb::UpdateKeyRequest {
            merchant_id: MERCHANT.into(),
            key_id: key.id.clone(),
            name: "never renamed".into(),
            update_mask: mask(&["name"]),
            ..Default::default()
        })
        .await;
    assert!(updated.is_err(), "updated without its audit row");
    assert!(regenerate(&mut app, &key.id, None).await.is_err(), "regenerated without its audit row");
    let revoked = app
        .admin
        .revoke_key(pb::RevokeKeyRequest {
            merchant_id: MERCHANT.into(),
            key_id: key.id.clone(),
            reason: String::new(),
        })
        .await;
    assert!(revoked.is_err(), "revoked without its audit row");

    assert_eq!(keys().await, before, "no key created, renamed, rotated or revoked");
    assert_eq!(outcome(&app.verify(&plaintext, "", "sales:read").await), allowed(), "the key still verifies");
    app.stop().await;
}

/// The database goes away right after it acknowledges the change's COMMIT:
/// the answer comes from the transaction itself, so RegenerateKey still
/// returns the only copy of the new plaintext and RevokeKey its result.
async fn committed_changes_answer_what_they_committed_when_the_database_goes_right_after() {
    let backend = Backend::postgres();
    let Backend::Postgres(server) = &backend else { unreachable!() };
    let proxy = Proxy::start(Proxy::upstream_of(server)).await;
    let mut app = spawn_app_over(
        backend.clone(),
        None,
        |_| async {},
        |s| {
            // In the clear: the proxy reads the protocol to find the COMMIT.
            s.database_url =
                s.database_url.as_deref().map(|url| format!("{}?sslmode=disable", proxy.url_for(url)));
            s.db_acquire_timeout_ms = 500;
        },
    )
    .await;
    let (old, old_plaintext) = app.key_with_scopes(&["sales:read"]).await;
    let (revoked, revoked_plaintext) = app.key_with_scopes(&["sales:read"]).await;

    proxy.cut_after_commit_of(b"regenerated");
    let done = regenerate(&mut app, &old.id, None).await.expect("the committed rotation is answered");
    assert!(proxy.tripped(), "the database went away right after the rotation's commit");
    let new = done.api_key.unwrap();
    assert_eq!(done.previous_key.unwrap().replaced_by_key_id, new.id);

    proxy.restore();
    proxy.cut_after_commit_of(b"laptop stolen");
    let answered = app
        .admin
        .revoke_key(pb::RevokeKeyRequest {
            merchant_id: MERCHANT.into(),
            key_id: revoked.id.clone(),
            reason: "laptop stolen".into(),
        })
        .await
        .expect("the committed revocation is answered")
        .into_inner();
    assert!(proxy.tripped(), "the database went away right after the revocation's commit");
    assert_eq!(answered.api_key.unwrap().status, KeyStatus::Revoked as i32);

    // What was answered is what the database holds.
    proxy.restore();
    let verify = app.verify.clone();
    for (key, expected) in [
        (done.plaintext_key, allowed()),
        (old_plaintext, deny(R::Revoked)),
        (revoked_plaintext, deny(R::Revoked)),
    ] {
        until("the database to answer again", || {
            let (mut client, key) = (verify.clone(), key.clone());
            async move {
                let request =
                    pb::VerifyRequest { key, required_scope: "sales:read".into(), ..Default::default() };
                client.verify(request).await.ok().map(|r| outcome(&r.into_inner()))
            }
        })
        .await;
        assert_eq!(outcome(&app.verify(&key, "", "sales:read").await), expected);
    }
    app.stop().await;
}
