//! A key's states short of revocation, and the labels it carries:
//! DisableKey and EnableKey (refused with DENY_REASON_DISABLED on every
//! replica, audited, evented, reversible), and metadata (returned on
//! Verify, never used in a decision, bounded and refused by field).

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use keywarden::api::pb;

use crate::{
    events::{data_text, listed_n},
    helpers::*,
};

backend_tests!(
    a_disabled_key_is_refused_until_enabled_and_both_are_audited_and_evented,
    a_revoked_key_can_be_neither_disabled_nor_enabled,
    metadata_round_trips_through_create_update_and_verify,
    each_metadata_limit_is_refused_naming_the_entry,
);
once_tests!(disabling_on_one_replica_is_obeyed_by_another_within_a_second(postgres));

async fn disable(admin: &mut AdminClient, key_id: &str, reason: &str) -> Result<pb::ApiKey, tonic::Status> {
    admin
        .disable_key(pb::DisableKeyRequest {
            merchant_id: MERCHANT.into(),
            key_id: key_id.into(),
            reason: reason.into(),
        })
        .await
        .map(|r| r.into_inner().api_key.unwrap())
}

async fn enable(admin: &mut AdminClient, key_id: &str) -> Result<pb::ApiKey, tonic::Status> {
    admin
        .enable_key(pb::EnableKeyRequest { merchant_id: MERCHANT.into(), key_id: key_id.into() })
        .await
        .map(|r| r.into_inner().api_key.unwrap())
}

fn meta(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

async fn a_disabled_key_is_refused_until_enabled_and_both_are_audited_and_evented(backend: Backend) {
    let mut app = spawn_app_with(backend, |s| s.events_poll_interval_ms = 50).await;
    let (id, key) = create_sales_key(&mut app.admin, "suspected").await;
    assert_eq!(outcome(&app.verify(&key, "", "sales:read").await), allowed());

    let disabled = disable(&mut app.admin, &id, "seen in a support ticket").await.unwrap();
    assert_eq!(disabled.status, pb::KeyStatus::Disabled as i32);
    assert_eq!(disabled.disabled_reason, "seen in a support ticket");
    let since = disabled.disabled_at.expect("disabled_at is set");
    assert_eq!(outcome(&app.verify(&key, "", "sales:read").await), deny(pb::DenyReason::Disabled));
    // Twice changes nothing: the first time and reason stand.
    let again = disable(&mut app.admin, &id, "another reason").await.unwrap();
    assert_eq!(
        (again.disabled_at, again.disabled_reason.as_str()),
        (Some(since), "seen in a support ticket")
    );
    let listed = app
        .admin
        .list_keys(pb::ListKeysRequest { merchant_id: MERCHANT.into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .api_keys;
    assert_eq!(listed[0].status, pb::KeyStatus::Disabled as i32, "ListKeys shows it");

    let enabled = enable(&mut app.admin, &id).await.unwrap();
    assert_eq!(enabled.status, pb::KeyStatus::Active as i32);
    assert!(enabled.disabled_at.is_none() && enabled.disabled_reason.is_empty());
    assert_eq!(outcome(&app.verify(&key, "", "sales:read").await), allowed());
    assert_eq!(enable(&mut app.admin, &id).await.unwrap().status, pb::KeyStatus::Active as i32, "idempotent");

    let trail = app.audit_of(&id).await;
    let kinds: Vec<i32> = trail.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds.iter().filter(|k| **k == pb::AuditEventKind::KeyDisabled as i32).count(),
        1,
        "one row for the one disable that changed something"
    );
    assert!(kinds.contains(&(pb::AuditEventKind::KeyEnabled as i32)));
    let denial =
        trail.iter().find(|e| e.deny_reason == pb::DenyReason::Disabled as i32).expect("the denial's row");
    assert_eq!(denial.kind, pb::AuditEventKind::Verify as i32);
    let events = listed_n(&app.admin, &["key.disabled", "key.enabled"], 2).await;
    assert_eq!(events.iter().map(|e| e.r#type.as_str()).collect::<Vec<_>>(), ["key.disabled", "key.enabled"]);
    assert_eq!(data_text(&events[0], "reason"), "seen in a support ticket");

    // A KEY_MANAGER may; an AUDITOR may not.
    let (_, manager) =
        issue_operator(&mut app.admin, "manager", pb::OperatorRole::KeyManager, &[MERCHANT]).await;
    let (_, auditor) =
        issue_operator(&mut app.admin, "auditor", pb::OperatorRole::Auditor, &[MERCHANT]).await;
    disable(&mut app.admin_as(&manager), &id, "").await.unwrap();
    enable(&mut app.admin_as(&manager), &id).await.unwrap();
    let refused = disable(&mut app.admin_as(&auditor), &id, "").await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    let bad = disable(&mut app.admin, &id, "line\nbreak").await.unwrap_err();
    assert_eq!(violated_fields(&bad), ["reason"]);
    app.stop().await;
}

async fn a_revoked_key_can_be_neither_disabled_nor_enabled(backend: Backend) {
    let mut app = spawn_app(backend).await;
    let (id, key) = create_sales_key(&mut app.admin, "disabled, then revoked").await;
    disable(&mut app.admin, &id, "").await.unwrap();
    revoke(&mut app.admin, &id).await;
    assert_eq!(
        outcome(&app.verify(&key, "", "sales:read").await),
        deny(pb::DenyReason::Revoked),
        "revocation is the stronger statement"
    );
    for refused in
        [enable(&mut app.admin, &id).await.unwrap_err(), disable(&mut app.admin, &id, "").await.unwrap_err()]
    {
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");
    }
    let missing = disable(&mut app.admin, &uuid::Uuid::now_v7().to_string(), "").await.unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    app.stop().await;
}

async fn metadata_round_trips_through_create_update_and_verify(backend: Backend) {
    let mut app = spawn_app_with(backend, |s| s.events_poll_interval_ms = 50).await;
    let (created, key) = app
        .create_key(pb::CreateKeyRequest {
            merchant_id: MERCHANT.into(),
            name: "labelled".into(),
            scopes: vec!["sales:read".into()],
            metadata: meta(&[("plan", "gold"), ("team", "Zahlungsverkehr")]),
            ..Default::default()
        })
        .await;
    assert_eq!(created.metadata, meta(&[("plan", "gold"), ("team", "Zahlungsverkehr")]));
    let verified = app.verify(&key, "", "sales:read").await;
    assert_eq!(verified.metadata, created.metadata, "returned on Verify");
    let refused = app.verify(&key, "", "invoice:write").await;
    assert!(refused.metadata.is_empty(), "only on ALLOW");

    let update = |metadata, paths: &[&str]| pb::UpdateKeyRequest {
        merchant_id: MERCHANT.into(),
        key_id: created.id.clone(),
        metadata,
        update_mask: Some(prost_types::FieldMask { paths: paths.iter().map(|p| (*p).to_owned()).collect() }),
        ..Default::default()
    };
    let updated = app
        .admin
        .update_key(update(meta(&[("plan", "platinum")]), &["metadata"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.api_key.unwrap().metadata, meta(&[("plan", "platinum")]), "replaced whole");
    assert_eq!(app.verify(&key, "", "sales:read").await.metadata, meta(&[("plan", "platinum")]), "at once");
    let untouched = app
        .admin
        .update_key(pb::UpdateKeyRequest { name: "renamed".into(), ..update(HashMap::new(), &["name"]) })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(untouched.api_key.unwrap().metadata, meta(&[("plan", "platinum")]), "not in the mask, kept");
    let cleared = app.admin.update_key(update(HashMap::new(), &["metadata"])).await.unwrap().into_inner();
    assert!(cleared.api_key.unwrap().metadata.is_empty());

    let created_event = listed_n(&app.admin, &["key.created"], 1).await;
    let data = created_event[0].data.as_ref().unwrap();
    let labels = match data.fields.get("metadata").and_then(|v| v.kind.clone()) {
        Some(prost_types::value::Kind::StructValue(s)) => s.fields.len(),
        other => panic!("no metadata in the event: {other:?}"),
    };
    assert_eq!(labels, 2, "events show the metadata");
    app.stop().await;
}

async fn each_metadata_limit_is_refused_naming_the_entry(backend: Backend) {
    let mut app = spawn_app(backend).await;
    let create = |metadata: HashMap<String, String>| pb::CreateKeyRequest {
        merchant_id: MERCHANT.into(),
        name: "labelled".into(),
        scopes: vec!["sales:read".into()],
        metadata,
        ..Default::default()
    };
    let seventeen: HashMap<String, String> = (0..17).map(|i| (format!("k{i}"), "v".into())).collect();
    let nine_big: HashMap<String, String> = (0..9).map(|i| (format!("k{i}"), "v".repeat(500))).collect();
    // A long name is quoted cut, as every error quotes caller input.
    let long_name = format!("metadata[\"{}\"…]", "n".repeat(64));
    for (what, metadata, field) in [
        ("an upper-case name", meta(&[("Plan", "gold")]), "metadata[\"Plan\"]"),
        ("a name starting with '-'", meta(&[("-x", "gold")]), "metadata[\"-x\"]"),
        ("a 65-character name", meta(&[(&"n".repeat(65), "v")]), long_name.as_str()),
        ("a 513-byte value", meta(&[("plan", &"v".repeat(513))]), "metadata[\"plan\"]"),
        ("a control character", meta(&[("plan", "gold\u{7}")]), "metadata[\"plan\"]"),
        ("17 entries", seventeen, "metadata"),
        ("more than 4 KiB", nine_big, "metadata"),
    ] {
        let refused = app.admin.create_key(create(metadata)).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{what}");
        assert_eq!(violated_fields(&refused), [field], "{what}");
    }
    let listed = app
        .admin
        .list_keys(pb::ListKeysRequest { merchant_id: MERCHANT.into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert!(listed.api_keys.is_empty(), "nothing was created");
    app.stop().await;
}

/// Keys cached on B, Verify load on B; each disable on A must be obeyed
/// by B within a second, and each enable too.
async fn disabling_on_one_replica_is_obeyed_by_another_within_a_second() {
    let mut a = spawn_app(Backend::postgres()).await;
    let mut b = spawn_app_on(&a, |_| {}).await;
    const KEYS: usize = 20;
    let mut keys = Vec::new();
    for i in 0..KEYS {
        let (id, key) = create_sales_key(&mut a.admin, &format!("fleet disable {i}")).await;
        assert_eq!(outcome(&b.verify(&key, "", "sales:read").await), allowed());
        keys.push((id, key));
    }
    let (_, busy) = create_sales_key(&mut a.admin, "busy").await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load: Vec<_> = (0..4)
        .map(|_| {
            let (mut verify, busy, stop) = (b.verify.clone(), busy.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    verify.verify(sales(&busy)).await.unwrap();
                }
            })
        })
        .collect();
    let mut lags = Vec::new();
    for (id, key) in &keys {
        for (disabled, expected) in [(true, deny(pb::DenyReason::Disabled)), (false, allowed())] {
            if disabled {
                disable(&mut a.admin, id, "fleet test").await.unwrap();
            } else {
                enable(&mut a.admin, id).await.unwrap();
            }
            let answered = Instant::now();
            loop {
                if outcome(&b.verify(key, "", "sales:read").await) == expected {
                    lags.push(answered.elapsed());
                    break;
                }
                assert!(answered.elapsed() < Duration::from_secs(5), "B ignores a change made 5 s ago");
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    lags.sort();
    let (p50, p99) = (lags[lags.len() / 2], lags[((lags.len() - 1) as f64 * 0.99).round() as usize]);
    eprintln!(
        "disable/enable on A -> obeyed on B over {} changes under load: p50 {p50:?}, p99 {p99:?}",
        lags.len()
    );
    assert!(p99 <= Duration::from_secs(1), "p99 {p99:?}");
    b.stop().await;
    a.stop().await;
}
