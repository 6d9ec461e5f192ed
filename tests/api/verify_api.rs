//! KeyVerify through the real server: decisions, deny reasons, audit rows,
//! outcomes and usage.

use std::time::Duration;

use crate::helpers::{
    Backend, MERCHANT, allowed, deny, eventually, outcome, sales, spawn_app, spawn_app_with, verify_until,
    violated_fields,
};
use keywarden::{
    api::pb::{self, DenyReason as R},
    store::usage::{UsageApplied, UsageDelta},
};
use prost_types::{FieldMask, Timestamp};

once_tests!(replicas_flushing_the_same_keys_in_any_order_never_deadlock(postgres),);

backend_tests!(
    openclaw_example_end_to_end,
    verify_expands_implied_scopes_and_authenticates_without_a_scope,
    verify_denies_malformed_keys_without_store_or_scrypt_work,
    verify_answers_not_found_for_unknown_prefix_and_wrong_secret_alike,
    verify_denies_revoked_key_on_next_call,
    verify_denies_expired_key_once_expiry_passes,
    verify_enforces_ipv4_ipv6_and_mapped_allow_lists,
    verify_denies_insufficient_scope,
    update_of_scopes_and_cidrs_takes_effect_on_next_verify,
    preset_keys_grant_the_preset_scopes,
    verify_rejects_caller_bugs_as_invalid_argument,
    record_outcomes_completes_a_row_still_queued_for_writing,
    record_outcomes_validates_statuses_and_ignores_unknown_ids,
    denials_are_audited_with_401_or_403,
    usage_counts_include_unflushed_uses_and_add_up_after_flush,
    a_usage_flush_applied_twice_is_counted_once,
    a_usage_flush_cut_short_keeps_its_counts_for_the_next,
    usage_counts_stay_exact_while_flushes_run_under_load,
    shutdown_spills_a_stuck_usage_flush_or_names_what_it_could_not_keep,
    audit_rows_carry_the_callers_trace_id_without_span_export,
    a_full_audit_queue_answers_unavailable_within_the_wait_bound,
    a_full_audit_queue_drops_and_counts_when_configured_to,
    a_row_the_database_refuses_becomes_a_dead_letter_and_its_batch_is_stored,
);

fn timestamp(t: chrono::DateTime<chrono::Utc>) -> Timestamp {
    Timestamp { seconds: t.timestamp(), nanos: t.timestamp_subsec_nanos() as i32 }
}

async fn audit_event(app: &mut crate::helpers::TestApp, id: &str) -> pb::AuditEvent {
    app.settle().await;
    let events = app
        .admin
        .list_audit_events(pb::ListAuditEventsRequest { merchant_id: MERCHANT.into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .events;
    events.into_iter().find(|e| e.id == id).unwrap_or_else(|| panic!("audit event {id} not listed"))
}

async fn openclaw_example_end_to_end(backend: Backend) {
    let mut app = spawn_app(backend).await;
    let (key, plaintext) = app
        .create_key(pb::CreateKeyRequest {
            merchant_id: MERCHANT.into(),
            name: "OpenClaw Invoice Bot".into(),
            scopes: ["customer:read", "customer:write", "invoice:read", "invoice:write", "sales:read"]
                .map(String::from)
                .to_vec(),
            ..Default::default()
        })
        .await;
    assert!(plaintext.starts_with("sntr_") && plaintext.len() == 54);
    assert_eq!(key.prefix, plaintext[..16]);

    let verdict = app
        .verify
        .verify(pb::VerifyRequest {
            key: plaintext.clone(),
            ip: "192.168.1.100".into(),
            required_scope: "invoice:write".into(),
            endpoint: "/public/api/v1/invoices".into(),
            method: "POST".into(),
            cost: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcome(&verdict), allowed());
    assert_eq!(verdict.merchant_id, MERCHANT);
    assert_eq!(verdict.key_id, key.id);
    assert_eq!(verdict.key_name, "OpenClaw Invoice Bot");
    assert!(!verdict.audit_event_id.is_empty());

    let recorded = app
        .verify
        .record_outcomes(pb::RecordOutcomesRequest {
            outcomes: vec![pb::Outcome { audit_event_id: verdict.audit_event_id.clone(), status: 201 }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(recorded.updated, 1);

    let event = audit_event(&mut app, &verdict.audit_event_id).await;
    assert!(event.timestamp.is_some());
    assert_eq!(event.api_key_id, key.id);
    assert_eq!(event.api_key_name, "OpenClaw Invoice Bot");
    assert_eq!(event.merchant_id, MERCHANT);
    assert_eq!(event.endpoint, "/public/api/v1/invoices");
    assert_eq!(event.method, "POST");
    assert_eq!(event.status, 201);
    assert_eq!(event.ip, "192.168.1.100");
    assert_eq!(event.kind, pb::AuditEventKind::Verify as i32);
    assert_eq!(event.decision, pb::Decision::Allow as i32);
    app.stop().await;
}

async fn verify_expands_implied_scopes_and_authenticates_without_a_scope(backend: Backend) {
    let mut app = spawn_app(backend).await;
    let (_, key) = app.key_with_scopes(&["invoice:write", "sales:read"]).await;
    let r = app.verify(&key, "", "invoice:read").await;
    assert_eq!(outcome(&r), allowed(), "write implies read");
    assert_eq!(r.scopes, ["invoice:read", "invoice:write", "sales:read"]);
    assert_eq!(outcome(&app.verify(&key, "", "").await), allowed(), "empty scope authenticates only");
    assert_eq!(outcome(&app.verify(&key, "", "customer:read").await), deny(R::InsufficientScope));
    app.stop().await;
}

async fn verify_denies_malformed_keys_without_store_or_scrypt_work(backend: Backend) {
    let mut app = spawn_app(backend).await;
    let (_, key) = app.key_with_scopes(&["sales:read"]).await;
    app.settle().await;
    let statements = app.probes.store.statements();
    let hashes = app.probes.pool.runs();
    let mut typo = key.clone().into_bytes();
    typo[20] = if typo[20] == b'a' { b'b' } else { b'a' };
    let typo = String::from_utf8(typo).unwrap();
    for garbage in
        ["", "sntr_", "Bearer x", &typo, &key[..53], &format!("{key}x"), &key.replace("sntr_", "sntx_")]
    {
        let r = app.verify(garbage, "", "").await;
        assert_eq!(outcome(&r), deny(R::Malformed), "{garbage:?}");
        assert!(r.merchant_id.is_empty() && r.key_id.is_empty());
    }
    assert_eq!(app.probes.pool.runs(), hashes, "no scrypt for malformed keys");
    // Only the audit writer's batched inserts may have touched the store.
    app.settle().await;
    let reads = app.probes.store.statements() - statements;
    assert!(reads <= 7, "malformed keys caused {reads} statements beyond audit inserts");
    app.stop().await;
}

async fn verify_answers_not_found_for_unknown_prefix_and_wrong_secret_alike(backend: Backend) {
    let mut app = spawn_app(backend).await;
    let (_, key) = app.key_with_scopes(&["sales:read"]).await;
    // Same prefix, different secret, valid checksum.
    let body = format!("{}{}", &key[..16], "A".repeat(32));
    let wrong_secret = keywarden::keys::format::checksummed(body);
    let other = keywarden::keys::PlainKey::generate(&keywarden::keys::KeyPrefix::default()).unwrap();
    for k in [wrong_secret.as_str(), other.expose()] {
        let r = app.verify(k, "", "").await;
        assert_eq!(outcome(&r), deny(R::NotFound), "{k}");
        assert!(r.merchant_id.is_empty() && r.key_id.is_empty() && r.key_name.is_empty());
    }
    app.stop().await;
}

async fn verify_denies_revoked_key_on_next_call(backend: Backend) {
    let mut app = spawn_app(backend).await;
    let (api_key, key) = app.key_with_scopes(&["sales:read"]).await;
    assert_eq!(outcome(&app.verify(&key, "", "sales:read").await), allowed());
    app.admin
        .revoke_key(pb::RevokeKeyRequest {
            merchant_id: MERCHANT.into(),
            key_id: api_key.id,
            reason: "leaked".into(),
        })
        .await
        .unwrap();
    let r = app.verify(&key, "", "sales:read").await;
    assert_eq!(outcome(&r), deny(R::Revoked));
    assert!(r.merchant_id.is_empty(), "identity is only disclosed on ALLOW");
    app.stop().await;
}

async fn verify_denies_expired_key_once_expiry_passes(backend: Backend) {
    let mut app = spawn_app(backend).await;
    // The key must be created and verified (two scrypt runs) before it
    // expires: the window is ten times what that took here, just now.
    let started = std::time::Instant::now();
    let (_, probe) = app.key_with_scopes(&["sales:read"]).await;
    assert_eq!(outcome(&app.verify(&probe, "", "sales:read").await), allowed());
    let window = started.elapsed() * 10;
    let expires = chrono::Utc::now() + window;
    let (_, key) = app
        .create_key(pb::CreateKeyRequest {
            merchant_id: MERCHANT.into(),
            name: "short-lived".into(),
            scopes: vec!["sales:read".into()],
            expires_at: Some(timestamp(expires)),
            ..Default::default()
        })
        .await;
    let r = app.verify(&key, "", "sales:read").await;
    assert_eq!(outcome(&r), allowed());
    assert_eq!(r.expires_at.unwrap().seconds, expires.timestamp());
    let after_expiry =
        verify_until("the key to expire", &app.verify, sales(&key), |r| outcome(r) != allowed()).await;
    assert!(chrono::Utc::now() >= expires);
    assert_eq!(outcome(&after_expiry), deny(R::Expired));
    app.stop().await;
}

async fn verify_enforces_ipv4_ipv6_and_mapped_allow_lists(backend: Backend) {
    let mut app = spawn_app(backend).await;
    let (created, key) = app
        .create_key(pb::CreateKeyRequest {
            merchant_id: MERCHANT.into(),
            name: "server integration".into(),
            scopes: vec!["sales:read".into()],
            allowed_cidrs: vec!["203.0.113.7".into(), "10.0.0.0/8".into(), "2001:DB8::/32".into()],
            ..Default::default()
        })
        .await;
    assert_eq!(created.allowed_cidrs, ["203.0.113.7", "10.0.0.0/8", "2001:db8::/32"]);
    for ip in ["203.0.113.7", "10.200.3.4", "2001:db8:1::5", "::ffff:10.1.1.1", "::ffff:203.0.113.7"] {
        assert_eq!(outcome(&app.verify(&key, ip, "sales:read").await), allowed(), "{ip}");
    }
    for ip in ["203.0.113.8", "11.0.0.1", "2001:db9::1", "::ffff:11.0.0.1", ""] {
        assert_eq!(outcome(&app.verify(&key, ip, "sales:read").await), deny(R::IpNotAllowed), "{ip:?}");
    }
    app.stop().await;
}

async fn verify_denies_insufficient_scope(backend: Backend) {
    let mut app = spawn_app(backend).await;
    let (_, key) = app.key_with_scopes(&["invoice:read"]).await;
    assert_eq!(outcome(&app.verify(&key, "", "invoice:write").await), deny(R::InsufficientScope));
    assert_eq!(outcome(&app.verify(&key, "", "invoice:read").await), allowed());
    app.stop().await;
}

async fn update_of_scopes_and_cidrs_takes_effect_on_next_verify(backend: Backend) {
    let mut app = spawn_app(backend).await;
    let (api_key, key) = app.key_with_scopes(&["invoice:write"]).await;
    assert_eq!(outcome(&app.verify(&key, "10.0.0.1", "invoice:write").await), allowed());
    app.admin
        .update_key(pb::UpdateKeyRequest {
            merchant_id: MERCHANT.into(),
            key_id: api_key.id.clone(),
            scopes: vec!["invoice:read".into()],
            update_mask: Some(FieldMask { paths: vec!["scopes".into()] }),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(outcome(&app.verify(&key, "10.0.0.1", "invoice:write").await), deny(R::InsufficientScope));
    app.admin
        .update_key(pb::UpdateKeyRequest {
            merchant_id: MERCHANT.into(),
            key_id: api_key.id.clone(),
            allowed_cidrs: vec!["192.168.0.0/16".into()],
            update_mask: Some(FieldMask { paths: vec!["allowed_cidrs".into()] }),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(outcome(&app.verify(&key, "10.0.0.1", "invoice:read").await), deny(R::IpNotAllowed));
    assert_eq!(outcome(&app.verify(&key, "192.168.4.4", "invoice:read").await), allowed());
    app.stop().await;
}

async fn preset_keys_grant_the_preset_scopes(backend: Backend) {
    let mut app = spawn_app(backend).await;
    let (created, key) = app
        .create_key(pb::CreateKeyRequest {
            merchant_id: MERCHANT.into(),
            name: "OpenClaw".into(),
            preset: "openclaw_skill".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(created.scopes, ["customer:write", "invoice:write", "sales:read"]);
    let r = app.verify(&key, "", "customer:read").await;
    assert_eq!(outcome(&r), allowed());
    assert_eq!(r.scopes, ["customer:read", "customer:write", "invoice:read", "invoice:write", "sales:read"]);
    app.stop().await;
}

async fn verify_rejects_caller_bugs_as_invalid_argument(backend: Backend) {
    let mut app = spawn_app(backend).await;
    let (_, key) = app.key_with_scopes(&["sales:read"]).await;
    let request = |ip: &str, scope: &str, endpoint: &str, method: &str| pb::VerifyRequest {
        key: key.clone(),
        ip: ip.into(),
        required_scope: scope.into(),
        endpoint: endpoint.into(),
        method: method.into(),
        cost: 0,
    };
    let cases = [
        (request("300.1.2.3", "", "/x", "GET"), "ip"),
        (request("", "Sales:Read", "/x", "GET"), "required_scope"),
        (request("", "payments:refund", "/x", "GET"), "required_scope"),
        (request("", "", "/x\r\nX-Injected: 1", "GET"), "endpoint"),
        (request("", "", &"/a".repeat(1100), "GET"), "endpoint"),
        (request("", "", "/x", "GET /x"), "method"),
        (pb::VerifyRequest { key: "k".repeat(129), ..Default::default() }, "key"),
    ];
    for (req, field) in cases {
        let status = app.verify.verify(req).await.unwrap_err();
        assert_eq!(violated_fields(&status), [field]);
    }
    app.settle().await;
    let events = app
        .admin
        .list_audit_events(pb::ListAuditEventsRequest { merchant_id: MERCHANT.into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert!(
        events.iter().all(|e| e.kind != pb::AuditEventKind::Verify as i32),
        "rejected calls are not verifications"
    );
    app.stop().await;
}

async fn record_outcomes_completes_a_row_still_queued_for_writing(backend: Backend) {
    let mut app = spawn_app(backend.clone()).await;
    let (_, key) = app.key_with_scopes(&["invoice:write"]).await;
    app.settle().await;
    // Hold the audit table so the writer cannot commit: the row stays in flight.
    let lock = crate::helpers::lock_audit_table(&app.database_url).await;
    let r = app.verify(&key, "", "invoice:write").await;
    let recorded = app
        .verify
        .record_outcomes(pb::RecordOutcomesRequest {
            outcomes: vec![pb::Outcome { audit_event_id: r.audit_event_id.clone(), status: 201 }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(recorded.updated, 1, "held for the queued row");
    assert!(
        app.probes
            .store
            .get_audit::<keywarden::audit::AuditRecord>(&r.audit_event_id)
            .await
            .unwrap()
            .is_none(),
        "row not written yet"
    );
    lock.release().await;
    let event = audit_event(&mut app, &r.audit_event_id).await;
    assert_eq!(event.status, 201);
    app.stop().await;
}

async fn record_outcomes_validates_statuses_and_ignores_unknown_ids(backend: Backend) {
    let mut app = spawn_app(backend).await;
    let (_, key) = app.key_with_scopes(&["sales:read"]).await;
    let ok = app.verify(&key, "", "sales:read").await;
    let denied = app.verify(&key, "", "invoice:read").await;
    for status in [99, 600, -1] {
        let err = app
            .verify
            .record_outcomes(pb::RecordOutcomesRequest {
                outcomes: vec![
                    pb::Outcome { audit_event_id: ok.audit_event_id.clone(), status: 200 },
                    pb::Outcome { audit_event_id: ok.audit_event_id.clone(), status },
                ],
            })
            .await
            .unwrap_err();
        assert_eq!(violated_fields(&err), ["outcomes[1].status"]);
    }
    app.settle().await;
    let updated = app
        .verify
        .record_outcomes(pb::RecordOutcomesRequest {
            outcomes: vec![
                pb::Outcome { audit_event_id: "0190aaaa-0000-7000-8000-000000000000".into(), status: 200 },
                pb::Outcome { audit_event_id: denied.audit_event_id.clone(), status: 200 },
                pb::Outcome { audit_event_id: ok.audit_event_id.clone(), status: 204 },
            ],
        })
        .await
        .unwrap()
        .into_inner()
        .updated;
    assert_eq!(updated, 1, "only the allowed row counts");
    assert_eq!(
        audit_event(&mut app, &ok.audit_event_id).await.status,
        204,
        "the invalid call changed nothing"
    );
    assert_eq!(audit_event(&mut app, &denied.audit_event_id).await.status, 403);
    app.stop().await;
}

async fn denials_are_audited_with_401_or_403(backend: Backend) {
    let mut app = spawn_app(backend).await;
    let (api_key, key) = app.key_with_scopes(&["sales:read"]).await;
    let malformed = app.verify("sntr_nope", "10.0.0.1", "").await;
    let scope = app.verify(&key, "10.0.0.1", "invoice:read").await;
    let unknown = keywarden::keys::PlainKey::generate(&keywarden::keys::KeyPrefix::default()).unwrap();
    let not_found = app.verify(unknown.expose(), "10.0.0.1", "").await;
    app.settle().await;
    // Calls of no merchant are counted in rollup rows, whose ids Verify returns.
    let m = app
        .probes
        .store
        .get_audit::<keywarden::audit::AuditRecord>(&malformed.audit_event_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((m.kind, m.count), (keywarden::audit::AuditKind::VerifyRollup, Some(1)));
    assert_eq!((m.status, m.api_key_id, m.key_prefix), (Some(401), None, None));
    let n = app
        .probes
        .store
        .get_audit::<keywarden::audit::AuditRecord>(&not_found.audit_event_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((n.kind, n.count), (keywarden::audit::AuditKind::VerifyRollup, Some(1)));
    assert_eq!((n.status, n.key_prefix.as_deref()), (Some(401), Some(&unknown.expose()[..16])));
    let s = audit_event(&mut app, &scope.audit_event_id).await;
    assert_eq!((s.status, s.api_key_id.as_str()), (403, api_key.id.as_str()));
    assert_eq!(s.deny_reason, R::InsufficientScope as i32);
    app.stop().await;
}

/// GetKeyUsage as an admin client sees it.
async fn usage(app: &crate::helpers::TestApp, key_id: &str) -> pb::GetKeyUsageResponse {
    app.admin
        .clone()
        .get_key_usage(pb::GetKeyUsageRequest { merchant_id: MERCHANT.into(), key_id: key_id.into() })
        .await
        .unwrap()
        .into_inner()
}

/// request_count and denied_count as GetKeyUsage answers them.
async fn counts(app: &crate::helpers::TestApp, key_id: &str) -> (i64, i64) {
    let usage = usage(app, key_id).await;
    (usage.request_count, usage.denied_count)
}

async fn usage_counts_include_unflushed_uses_and_add_up_after_flush(backend: Backend) {
    // A flush interval far beyond the test: counts can only come from memory.
    let mut app = spawn_app_with(backend, |s| s.usage_flush_interval_ms = 3_600_000).await;
    let (api_key, key) = app.key_with_scopes(&["sales:read"]).await;
    for _ in 0..5 {
        assert_eq!(outcome(&app.verify(&key, "", "sales:read").await), allowed());
    }
    for _ in 0..2 {
        assert_eq!(outcome(&app.verify(&key, "", "invoice:read").await), deny(R::InsufficientScope));
    }
    let before = usage(&app, &api_key.id).await;
    assert_eq!((before.request_count, before.denied_count), (5, 2));
    assert!(before.last_used_at.is_some());
    let listed = app
        .admin
        .get_key(pb::GetKeyRequest { merchant_id: MERCHANT.into(), key_id: api_key.id.clone() })
        .await
        .unwrap()
        .into_inner()
        .api_key
        .unwrap();
    assert_eq!((listed.request_count, listed.denied_count), (5, 2));
    app.probes.usage.flush().await.unwrap();
    assert_eq!(app.probes.usage.pending_keys(), 0);
    let after = usage(&app, &api_key.id).await;
    assert_eq!((after.request_count, after.denied_count), (5, 2), "flushing neither loses nor doubles");
    assert_eq!(after.last_used_at, before.last_used_at);
    let row = app.probes.store.find_by_id(&api_key.id).await.unwrap().unwrap();
    assert_eq!((row.request_count, row.denied_count), (5, 2), "the counts are in the database");
    app.stop().await;
}

/// A flush whose commit was never acknowledged is retried under the same
/// id; the store recognises it and does not add the counts again.
async fn a_usage_flush_applied_twice_is_counted_once(backend: Backend) {
    let mut app = spawn_app_with(backend, |s| s.usage_flush_interval_ms = 3_600_000).await;
    let (api_key, _) = app.key_with_scopes(&["sales:read"]).await;
    let delta = UsageDelta { allowed: 3, denied: 1, last_used_at: Some(chrono::Utc::now()), spent: 0 };
    let batch = [(api_key.id.as_str(), delta)];
    let store = app.probes.store.clone();
    assert!(matches!(
        store.apply_usage("flush-a", keywarden::clock::now(), &batch).await.unwrap(),
        UsageApplied::Applied(_)
    ));
    assert_eq!(
        store.apply_usage("flush-a", keywarden::clock::now(), &batch).await.unwrap(),
        UsageApplied::AlreadyApplied
    );
    assert_eq!(counts(&app, &api_key.id).await, (3, 1));
    assert!(matches!(
        store.apply_usage("flush-b", keywarden::clock::now(), &batch).await.unwrap(),
        UsageApplied::Applied(_)
    ));
    assert_eq!(counts(&app, &api_key.id).await, (6, 2), "another flush adds");
    // Retention forgets flush ids by age, and only by age.
    let now = chrono::Utc::now();
    assert_eq!(store.delete_usage_flushes_before(now - chrono::Duration::days(1)).await.unwrap(), 0);
    assert_eq!(store.delete_usage_flushes_before(now + chrono::Duration::minutes(1)).await.unwrap(), 2);
    app.stop().await;
}

/// A flush cancelled while it waits on a lock keeps its batch: the counts
/// stay visible meanwhile, and the next flush writes them, once.
async fn a_usage_flush_cut_short_keeps_its_counts_for_the_next(backend: Backend) {
    let mut app = spawn_app_with(backend, |s| s.usage_flush_interval_ms = 3_600_000).await;
    let (api_key, key) = app.key_with_scopes(&["sales:read"]).await;
    for _ in 0..3 {
        assert_eq!(outcome(&app.verify(&key, "", "sales:read").await), allowed());
    }
    let lock = crate::helpers::lock_table(&app.database_url, "api_keys").await;
    let cut = tokio::time::timeout(Duration::from_millis(500), app.probes.usage.flush()).await;
    assert!(cut.is_err(), "the flush should have been waiting on the lock");
    assert_eq!(counts(&app, &api_key.id).await, (3, 0), "counts are neither lost nor doubled meanwhile");
    lock.release().await;
    app.probes.usage.flush().await.unwrap();
    assert_eq!(app.probes.usage.pending_keys(), 0);
    let row = app.probes.store.find_by_id(&api_key.id).await.unwrap().unwrap();
    assert_eq!((row.request_count, row.denied_count), (3, 0), "written once");
    assert_eq!(counts(&app, &api_key.id).await, (3, 0));
    app.stop().await;
}

/// Flushes running while eight callers verify neither lose nor double a
/// use, and each ends (GetKeyUsage waits for flushes).
async fn usage_counts_stay_exact_while_flushes_run_under_load(backend: Backend) {
    let mut app = spawn_app_with(backend, |s| s.usage_flush_interval_ms = 3_600_000).await;
    let (api_key, key) = app.key_with_scopes(&["sales:read"]).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Eight callers at once, so that uses arrive during every write.
    let load: Vec<_> = (0..8)
        .map(|_| {
            let (mut verify, stop, key) = (app.verify.clone(), stop.clone(), key.clone());
            tokio::spawn(async move {
                let mut sent = 0_i64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let request = pb::VerifyRequest {
                        key: key.clone(),
                        required_scope: "sales:read".into(),
                        ..Default::default()
                    };
                    verify.verify(request).await.unwrap();
                    sent += 1;
                }
                sent
            })
        })
        .collect();
    eventually("uses to be counted", || (app.probes.usage.pending_keys() > 0).then_some(())).await;
    for _ in 0..20 {
        let flushed = tokio::time::timeout(Duration::from_secs(10), app.probes.usage.flush()).await;
        assert!(flushed.expect("a flush under load ended").is_ok());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut sent = 0;
    for caller in load {
        sent += caller.await.unwrap();
    }
    app.probes.usage.flush().await.unwrap();
    assert_eq!(counts(&app, &api_key.id).await, (sent, 0), "every use counted once");
    app.stop().await;
}

/// Shutdown waits for a usage flush stuck on a lock only until the flush
/// timeout. The count then waits on the usage spill for the next start;
/// with no spill (the spool off) shutdown names what it could not keep
/// instead of hanging.
async fn shutdown_spills_a_stuck_usage_flush_or_names_what_it_could_not_keep(backend: Backend) {
    for spool in [true, false] {
        let mut app = spawn_app_with(backend.clone(), |s| {
            s.usage_flush_interval_ms = 100;
            s.flush_timeout_ms = 1000;
            s.shutdown_grace_ms = 500;
            if !spool {
                s.audit_spool_max_bytes = 0;
            }
        })
        .await;
        let (api_key, key) = app.key_with_scopes(&["sales:read"]).await;
        app.settle().await;
        let lock = crate::helpers::lock_table(&app.database_url, "api_keys").await;
        assert_eq!(outcome(&app.verify(&key, "", "sales:read").await), allowed());
        // The flusher takes the count and blocks on the lock.
        eventually("a flush to start", || app.probes.usage.flush_in_progress().then_some(())).await;
        let ended = app.stop_within(Duration::from_secs(20)).await;
        if spool {
            ended.expect("a spilled count is kept, not lost");
            let spill = keywarden::usage::spill::Spill::open(&app.data_dir().join("spool/usage")).unwrap();
            let (batches, _) = spill.load().unwrap();
            let spilled: i64 =
                batches.iter().filter_map(|b| b.deltas.get(&api_key.id)).map(|d| d.allowed).sum();
            assert_eq!(spilled, 1, "the stuck count is on the spill");
        } else {
            let message = format!("{:#}", ended.expect_err("the stuck count is reported"));
            assert!(message.contains("usage of 1 keys unwritten and not on local disk"), "{message}");
        }
        lock.release().await;
        app.stop().await;
    }
}

async fn audit_rows_carry_the_callers_trace_id_without_span_export(backend: Backend) {
    // No span subscriber on this test's runtime: nothing exports spans.
    let mut app = spawn_app(backend).await;
    let (_, key) = app.key_with_scopes(&["sales:read"]).await;
    let mut request = tonic::Request::new(pb::VerifyRequest { key, ..Default::default() });
    request
        .metadata_mut()
        .insert("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".parse().unwrap());
    let with_parent = app.verify.verify(request).await.unwrap().into_inner();
    let without = app.verify(&"x".repeat(10), "", "").await;
    app.settle().await;
    let row = app
        .probes
        .store
        .get_audit::<keywarden::audit::AuditRecord>(&with_parent.audit_event_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.trace_id.as_deref(), Some("0af7651916cd43dd8448eb211c80319c"));
    let row = app
        .probes
        .store
        .get_audit::<keywarden::audit::AuditRecord>(&without.audit_event_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.trace_id, None);
    app.stop().await;
}

async fn verify_rows(app: &crate::helpers::TestApp) -> usize {
    app.probes.audit.written() as usize
}

async fn a_full_audit_queue_answers_unavailable_within_the_wait_bound(backend: Backend) {
    // No linger: the writer takes one row and goes straight to the write.
    let mut app = spawn_app_with(backend, |s| {
        s.audit_queue_capacity = 1;
        s.audit_linger_ms = 0;
        s.audit_queue_wait_ms = 300;
        // A spool with no room: the overflow mode applies as without one.
        s.audit_spool_max_bytes = 1;
    })
    .await;
    let (_, key) = app.key_with_scopes(&["sales:read"]).await;
    app.settle().await;
    let written = verify_rows(&app).await;
    // The writer cannot commit: one row in its hands, one in the queue...
    let lock = crate::helpers::lock_audit_table(&app.database_url).await;
    app.verify(&key, "", "").await;
    eventually("the writer to take the row", || (app.probes.audit.depth() == 0).then_some(())).await;
    app.verify(&key, "", "").await;
    // ...so the next Verify waits the bound for room, then fails closed:
    // no decision without its audit row.
    let started = std::time::Instant::now();
    let refused = app.verify.verify(pb::VerifyRequest { key: key.clone(), ..Default::default() }).await;
    let waited = started.elapsed();
    let status = refused.expect_err("no decision without its audit row");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("audit"), "{}", status.message());
    assert!(waited >= Duration::from_millis(300), "answered after {waited:?}, before the bound");
    assert!(waited < Duration::from_secs(3), "answered after {waited:?}, long past the 300 ms bound");
    assert_eq!(app.probes.audit.refused(), 1);
    lock.release().await;
    assert_eq!(outcome(&app.verify(&key, "", "").await), allowed(), "serving again once rows move");
    app.settle().await;
    assert_eq!(
        verify_rows(&app).await - written,
        3,
        "every answered call's row written, none for the refused one"
    );
    assert_eq!(app.probes.audit.dropped(), 0);
    app.stop().await;
}

async fn a_full_audit_queue_drops_and_counts_when_configured_to(backend: Backend) {
    let mut app = spawn_app_with(backend, |s| {
        s.audit_queue_capacity = 1;
        s.audit_linger_ms = 0;
        s.audit_overflow = keywarden::config::Overflow::Drop;
        s.audit_queue_wait_ms = 50;
        // A spool with no room: the overflow mode applies as without one.
        s.audit_spool_max_bytes = 1;
    })
    .await;
    let (_, key) = app.key_with_scopes(&["sales:read"]).await;
    app.settle().await;
    let written = verify_rows(&app).await;
    let lock = crate::helpers::lock_audit_table(&app.database_url).await;
    // The first row reaches the writer, which then cannot commit it.
    assert_eq!(outcome(&app.verify(&key, "", "").await), allowed());
    eventually("the writer to take the row", || (app.probes.audit.depth() == 0).then_some(())).await;
    let started = std::time::Instant::now();
    for _ in 0..10 {
        assert_eq!(outcome(&app.verify(&key, "", "").await), allowed());
    }
    assert!(started.elapsed() < Duration::from_secs(3), "each Verify waits at most the 50 ms bound");
    lock.release().await;
    app.settle().await;
    let dropped = app.probes.audit.dropped() as usize;
    assert_eq!(dropped, 9, "one row queued behind the stuck one, the other nine dropped");
    assert_eq!(verify_rows(&app).await - written + dropped, 11, "every row is either written or counted");
    app.stop().await;
}

/// One row the database refuses for what it holds (a constraint the test
/// adds) must not block the rows batched with it: the batch is written in
/// halves, the refused row is kept as a dead letter with the reason (in a
/// file when the database refuses that too), and the writer goes on.
async fn a_row_the_database_refuses_becomes_a_dead_letter_and_its_batch_is_stored(backend: Backend) {
    let mut data_dir = None;
    // A long linger puts the calls below in one batch.
    let mut app = spawn_app_with(backend, |s| {
        s.audit_linger_ms = 500;
        data_dir = Some(s.data_dir.clone());
    })
    .await;
    let (_, plaintext) = app.key_with_scopes(&["sales:read"]).await;
    let poison: &[&str] = if app.database_url.starts_with("sqlite:") {
        &[
            "CREATE TRIGGER poison BEFORE INSERT ON audit_events WHEN NEW.endpoint LIKE '/poison%' \
             BEGIN SELECT RAISE(ABORT, 'poisoned row'); END",
            "CREATE TRIGGER poison_letter BEFORE INSERT ON audit_dead_letters WHEN NEW.\"row\" LIKE '%/poison-twice%' \
             BEGIN SELECT RAISE(ABORT, 'poisoned letter'); END",
        ]
    } else {
        &[
            "ALTER TABLE audit_events ADD CONSTRAINT poison CHECK (endpoint NOT LIKE '/poison%')",
            "ALTER TABLE audit_dead_letters ADD CONSTRAINT poison_letter CHECK (\"row\" NOT LIKE '%/poison-twice%')",
        ]
    };
    for statement in poison {
        crate::helpers::execute(&app.database_url, statement).await;
    }

    let mut ids = Vec::new();
    for endpoint in ["/a", "/b", "/c", "/poison", "/d", "/e", "/f", "/g"] {
        let r = app
            .verify
            .verify(pb::VerifyRequest {
                key: plaintext.clone(),
                required_scope: "sales:read".into(),
                endpoint: endpoint.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        ids.push((endpoint, r.audit_event_id));
    }
    app.settle().await;
    for (endpoint, id) in &ids {
        let stored = crate::helpers::scalar(
            &app.database_url,
            &format!("SELECT COUNT(*) FROM audit_events WHERE id = '{id}'"),
        )
        .await;
        let dead = crate::helpers::scalar(
            &app.database_url,
            &format!("SELECT COUNT(*) FROM audit_dead_letters WHERE id = '{id}' AND reason LIKE '%poison%'"),
        )
        .await;
        let expected = if *endpoint == "/poison" { (0, 1) } else { (1, 0) };
        assert_eq!((stored, dead), expected, "{endpoint}: (stored, dead-lettered)");
    }
    let row =
        crate::helpers::value::<String>(&app.database_url, "SELECT \"row\" FROM audit_dead_letters").await;
    assert!(row.contains("/poison") && row.contains(&ids[3].1), "the dead letter holds the row: {row}");
    let kept: serde_json::Value = serde_json::from_str(&row).expect("the dead letter's row is JSON");
    assert_eq!((kept["endpoint"].as_str(), kept["id"].as_str()), (Some("/poison"), Some(ids[3].1.as_str())));
    let metrics = crate::helpers::parse_metrics(&app.probes.exporter.render());
    assert_eq!(metrics["keywarden_audit_dead_letters_total"], 1.0);

    // A row whose dead letter is refused too goes to a file in the data
    // directory; the writer goes on and later rows land.
    let twice = app
        .verify
        .verify(pb::VerifyRequest {
            key: plaintext.clone(),
            required_scope: "sales:read".into(),
            endpoint: "/poison-twice".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let r = app.verify(&plaintext, "", "sales:read").await;
    app.settle().await;
    let later = format!("SELECT COUNT(*) FROM audit_events WHERE id = '{}'", r.audit_event_id);
    assert_eq!(crate::helpers::scalar(&app.database_url, &later).await, 1);
    let file = data_dir.unwrap().join(keywarden::config::DEAD_LETTER_FILE);
    let lines = std::fs::read_to_string(&file).unwrap_or_default();
    assert!(lines.contains(&twice.audit_event_id) && lines.contains("poison"), "{}: {lines}", file.display());
    let metrics = crate::helpers::parse_metrics(&app.probes.exporter.render());
    assert_eq!(metrics["keywarden_audit_dead_letters_total"], 2.0);
    app.stop().await;
}

/// Replicas flush usage for the same hot keys every interval, each in the
/// order its own map holds them, in chunks of 500 keys per statement. Two
/// flushers of 1,000 keys in opposite orders, over and over: each holds
/// its first chunk's rows while its second waits for the other's, and
/// PostgreSQL aborts one of the pair. Every flush succeeding says the rows
/// are taken in one order.
async fn replicas_flushing_the_same_keys_in_any_order_never_deadlock() {
    let mut app = spawn_app_with(Backend::postgres(), |s| s.usage_flush_interval_ms = 3_600_000).await;
    let (model, _) = app.key_with_scopes(&["sales:read"]).await;
    // 999 more rows like it (no scrypt: they are never verified).
    crate::helpers::execute(
        &app.database_url,
        &format!(
            "INSERT INTO api_keys SELECT (jsonb_populate_record(NULL::api_keys, to_jsonb(k) || \
             jsonb_build_object('id', 'clone-' || lpad(g::text, 4, '0'), 'prefix', 'sntr_c' || lpad(g::text, 10, '0')))).* \
             FROM api_keys k, generate_series(1, 999) g WHERE k.id = '{}'",
            model.id
        ),
    )
    .await;
    let ids: Vec<String> =
        std::iter::once(model.id.clone()).chain((1..1000).map(|g| format!("clone-{g:04}"))).collect();
    const FLUSHES: usize = 10;
    let flusher = |reversed: bool| {
        let (store, mut ids) = (app.probes.store.clone(), ids.clone());
        if reversed {
            ids.reverse();
        }
        tokio::spawn(async move {
            let delta = UsageDelta { allowed: 1, denied: 0, last_used_at: None, spent: 0 };
            for n in 0..FLUSHES {
                let batch: Vec<(&str, UsageDelta)> = ids.iter().map(|id| (id.as_str(), delta)).collect();
                let order = if reversed { "reversed" } else { "given" };
                store
                    .apply_usage(&format!("flush-{order}-{n}"), keywarden::clock::now(), &batch)
                    .await
                    .unwrap_or_else(|e| panic!("flush {n} in the {order} order: {e}"));
            }
        })
    };
    let (a, b) = (flusher(false), flusher(true));
    a.await.unwrap();
    b.await.unwrap();
    let counted = crate::helpers::scalar(
        &app.database_url,
        &format!("SELECT count(*) FROM api_keys WHERE request_count = {}", 2 * FLUSHES),
    )
    .await;
    assert_eq!(counted, 1000, "every key counted once per flush");
    app.stop().await;
}
