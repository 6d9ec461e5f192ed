//! Operator credentials: the role matrix on every KeyAdmin RPC, merchant
//! limits, the token lifecycle (shown once, stored as a digest, revoked and
//! expired tokens refused), and the audit of every refusal.

use keywarden::api::pb;
use tonic::Code;

use crate::helpers::{
    AdminClient, Backend, MERCHANT, OTHER_MERCHANT, TestApp, create_sales_key, issue_operator, scalar,
    spawn_app, violated_fields,
};

backend_tests!(
    every_role_may_call_exactly_its_rpcs,
    a_merchant_limited_token_cannot_reach_another_merchant_whatever_it_guesses,
    operator_tokens_are_shown_once_stored_as_digests_and_refused_once_revoked_or_expired,
    refused_calls_are_audited_at_most_twice_per_peer_and_minute,
);

const RPCS: [&str; 13] = [
    "CreateKey",
    "GetKey",
    "ListKeys",
    "UpdateKey",
    "RevokeKey",
    "RegenerateKey",
    "GetKeyUsage",
    "ListAuditEvents",
    "ListScopes",
    "CreateOperatorToken",
    "ListOperatorTokens",
    "RevokeOperatorToken",
    "GetPepperStatus",
];

/// Calls `rpc` as `caller` with arguments that succeed for a caller allowed
/// to make the call; `setup` (the bootstrap admin) makes what it acts on.
async fn call(rpc: &str, caller: &mut AdminClient, setup: &mut AdminClient) -> Result<(), tonic::Status> {
    let (key_id, _) = create_sales_key(setup, "matrix").await;
    let (token_id, _) = issue_operator(setup, "matrix", pb::OperatorRole::Auditor, &[]).await;
    let merchant_id = MERCHANT.to_owned();
    match rpc {
        "CreateKey" => caller
            .create_key(pb::CreateKeyRequest {
                merchant_id,
                name: "made".into(),
                scopes: vec!["sales:read".into()],
                ..Default::default()
            })
            .await
            .map(drop),
        "GetKey" => caller.get_key(pb::GetKeyRequest { merchant_id, key_id }).await.map(drop),
        "ListKeys" => {
            caller.list_keys(pb::ListKeysRequest { merchant_id, ..Default::default() }).await.map(drop)
        }
        "UpdateKey" => caller
            .update_key(pb::UpdateKeyRequest {
                merchant_id,
                key_id,
                name: "renamed".into(),
                update_mask: Some(prost_types::FieldMask { paths: vec!["name".into()] }),
                ..Default::default()
            })
            .await
            .map(drop),
        "RevokeKey" => caller
            .revoke_key(pb::RevokeKeyRequest { merchant_id, key_id, reason: String::new() })
            .await
            .map(drop),
        "RegenerateKey" => caller
            .regenerate_key(pb::RegenerateKeyRequest { merchant_id, key_id, grace_period: None })
            .await
            .map(drop),
        "GetKeyUsage" => caller.get_key_usage(pb::GetKeyUsageRequest { merchant_id, key_id }).await.map(drop),
        "ListAuditEvents" => caller
            .list_audit_events(pb::ListAuditEventsRequest { merchant_id, ..Default::default() })
            .await
            .map(drop),
        "ListScopes" => caller.list_scopes(pb::ListScopesRequest {}).await.map(drop),
        "CreateOperatorToken" => caller
            .create_operator_token(pb::CreateOperatorTokenRequest {
                name: "made".into(),
                role: pb::OperatorRole::Auditor as i32,
                ..Default::default()
            })
            .await
            .map(drop),
        "ListOperatorTokens" => {
            caller.list_operator_tokens(pb::ListOperatorTokensRequest::default()).await.map(drop)
        }
        "RevokeOperatorToken" => {
            caller.revoke_operator_token(pb::RevokeOperatorTokenRequest { id: token_id }).await.map(drop)
        }
        "GetPepperStatus" => caller.get_pepper_status(pb::GetPepperStatusRequest {}).await.map(drop),
        other => panic!("no such RPC {other}"),
    }
}

async fn every_role_may_call_exactly_its_rpcs(backend: Backend) {
    let mut app = spawn_app(backend).await;
    // The issue's table, written out rather than read from the code under test.
    let matrix: [(pb::OperatorRole, &[&str]); 3] = [
        (pb::OperatorRole::Admin, &RPCS),
        // Every key RPC (the first nine), none of the ADMIN-only ones.
        (pb::OperatorRole::KeyManager, &RPCS[..9]),
        (pb::OperatorRole::Auditor, &["GetKey", "ListKeys", "GetKeyUsage", "ListAuditEvents", "ListScopes"]),
    ];
    for (role, allowed) in matrix {
        let (_, token) = issue_operator(&mut app.admin, &format!("{role:?}"), role, &[]).await;
        let mut caller = app.admin_as(&token);
        for rpc in RPCS {
            let result = call(rpc, &mut caller, &mut app.admin).await;
            if allowed.contains(&rpc) {
                assert!(result.is_ok(), "{role:?} {rpc}: {result:?}");
            } else {
                let status = result.expect_err(&format!("{role:?} may not call {rpc}"));
                assert_eq!(status.code(), Code::PermissionDenied, "{role:?} {rpc}: {status:?}");
            }
        }
    }
    // Every admin action and every denial names its actor: the token's name.
    app.settle().await;
    let anonymous = scalar(
        &app.database_url,
        "SELECT COUNT(*) FROM audit_events WHERE kind NOT IN ('VERIFY', 'AUTHENTICATION_FAILED') \
         AND (actor IS NULL OR actor = '')",
    )
    .await;
    assert_eq!(anonymous, 0, "admin rows without an actor");
    for (role, allowed) in matrix {
        let by_role = |kinds: &str| {
            format!("SELECT COUNT(*) FROM audit_events WHERE actor = '{role:?}' AND kind IN ({kinds})")
        };
        let denied = scalar(&app.database_url, &by_role("'ACCESS_DENIED'")).await;
        assert_eq!(
            denied as usize,
            RPCS.len() - allowed.len(),
            "{role:?}: one ACCESS_DENIED row per refused RPC"
        );
        if allowed.contains(&"CreateKey") {
            let created = scalar(&app.database_url, &by_role("'KEY_CREATED'")).await;
            // CreateKey, and RegenerateKey's successor.
            assert_eq!(created, 2, "{role:?}: its key creations name it");
        }
    }
    app.stop().await;
}

async fn a_merchant_limited_token_cannot_reach_another_merchant_whatever_it_guesses(backend: Backend) {
    let mut app = spawn_app(backend).await;
    let (other_key, _) = app
        .create_key(pb::CreateKeyRequest {
            merchant_id: OTHER_MERCHANT.into(),
            name: "theirs".into(),
            scopes: vec!["sales:read".into()],
            ..Default::default()
        })
        .await;
    let (_, token) =
        issue_operator(&mut app.admin, "support", pb::OperatorRole::KeyManager, &[MERCHANT]).await;
    let mut support = app.admin_as(&token);
    let (own_key, _) = create_sales_key(&mut support, "ours").await;

    // Naming the other merchant: refused before anything is read.
    let refused = [
        support
            .get_key(pb::GetKeyRequest { merchant_id: OTHER_MERCHANT.into(), key_id: other_key.id.clone() })
            .await
            .map(drop),
        support
            .list_keys(pb::ListKeysRequest { merchant_id: OTHER_MERCHANT.into(), ..Default::default() })
            .await
            .map(drop),
        support
            .revoke_key(pb::RevokeKeyRequest {
                merchant_id: OTHER_MERCHANT.into(),
                key_id: other_key.id.clone(),
                reason: String::new(),
            })
            .await
            .map(drop),
        support
            .list_audit_events(pb::ListAuditEventsRequest {
                merchant_id: OTHER_MERCHANT.into(),
                ..Default::default()
            })
            .await
            .map(drop),
        support
            .create_key(pb::CreateKeyRequest {
                merchant_id: OTHER_MERCHANT.into(),
                name: "planted".into(),
                scopes: vec!["sales:read".into()],
                ..Default::default()
            })
            .await
            .map(drop),
    ];
    for result in refused {
        assert_eq!(result.unwrap_err().code(), Code::PermissionDenied);
    }
    // Naming its own merchant with the other merchant's key id: not found.
    for status in [
        support
            .get_key(pb::GetKeyRequest { merchant_id: MERCHANT.into(), key_id: other_key.id.clone() })
            .await
            .unwrap_err(),
        support
            .revoke_key(pb::RevokeKeyRequest {
                merchant_id: MERCHANT.into(),
                key_id: other_key.id.clone(),
                reason: String::new(),
            })
            .await
            .unwrap_err(),
    ] {
        assert_eq!(status.code(), Code::NotFound);
    }
    let theirs = app
        .admin
        .get_key(pb::GetKeyRequest { merchant_id: OTHER_MERCHANT.into(), key_id: other_key.id.clone() })
        .await
        .unwrap()
        .into_inner()
        .api_key
        .unwrap();
    assert_eq!(theirs.status, pb::KeyStatus::Active as i32, "the other merchant's key was changed");
    let planted = scalar(
        &app.database_url,
        &format!("SELECT COUNT(*) FROM api_keys WHERE merchant_id = '{OTHER_MERCHANT}'"),
    )
    .await;
    assert_eq!(planted, 1, "a key was created for the other merchant");
    assert!(
        support.get_key(pb::GetKeyRequest { merchant_id: MERCHANT.into(), key_id: own_key }).await.is_ok()
    );

    app.settle().await;
    let denials = scalar(
        &app.database_url,
        &format!(
            "SELECT COUNT(*) FROM audit_events WHERE kind = 'ACCESS_DENIED' AND actor = 'support' \
             AND merchant_id IS NULL AND detail LIKE '%named merchant {OTHER_MERCHANT}%' \
             AND ip = '127.0.0.1' AND status = 403"
        ),
    )
    .await;
    assert_eq!(denials, 5, "one row of no merchant per refused RPC, naming actor, merchant and peer");
    // The other merchant's trail holds none of another tenant's operator
    // names or addresses.
    let in_their_trail = scalar(
        &app.database_url,
        &format!(
            "SELECT COUNT(*) FROM audit_events WHERE merchant_id = '{OTHER_MERCHANT}' AND actor = 'support'"
        ),
    )
    .await;
    assert_eq!(in_their_trail, 0, "a refusal was filed in the other merchant's trail");
    let listed = app
        .admin
        .list_audit_events(pb::ListAuditEventsRequest {
            merchant_id: OTHER_MERCHANT.into(),
            page_size: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert!(listed.iter().all(|e| e.actor != "support"), "{listed:?}");
    app.stop().await;
}

async fn operator_tokens_are_shown_once_stored_as_digests_and_refused_once_revoked_or_expired(
    backend: Backend,
) {
    let mut app = spawn_app(backend).await;
    let (id, token) =
        issue_operator(&mut app.admin, "rotating-bot", pb::OperatorRole::Auditor, &[MERCHANT]).await;
    assert!(token.starts_with("kwop_") && token.len() == 54, "{token}");
    let mut bot = app.admin_as(&token);
    bot.list_keys(pb::ListKeysRequest { merchant_id: MERCHANT.into(), ..Default::default() }).await.unwrap();

    let listed =
        app.admin.list_operator_tokens(pb::ListOperatorTokensRequest::default()).await.unwrap().into_inner();
    let shown = listed.operator_tokens.iter().find(|t| t.id == id).unwrap();
    assert_eq!(
        (shown.name.as_str(), shown.role, shown.created_by.as_str()),
        ("rotating-bot", pb::OperatorRole::Auditor as i32, "admin")
    );
    assert_eq!(shown.merchant_ids, [MERCHANT]);

    let revoked =
        app.admin.revoke_operator_token(pb::RevokeOperatorTokenRequest { id: id.clone() }).await.unwrap();
    assert!(revoked.into_inner().operator_token.unwrap().revoked_at.is_some());
    let status = bot
        .list_keys(pb::ListKeysRequest { merchant_id: MERCHANT.into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!((status.code(), status.message()), (Code::Unauthenticated, "operator token revoked"));
    // Revoking again is a no-op.
    app.admin.revoke_operator_token(pb::RevokeOperatorTokenRequest { id: id.clone() }).await.unwrap();

    // An expiring token works until it expires, then is refused.
    let soon = chrono::Utc::now() + chrono::Duration::milliseconds(1500);
    let expiring = app
        .admin
        .create_operator_token(pb::CreateOperatorTokenRequest {
            name: "short-lived".into(),
            role: pb::OperatorRole::Auditor as i32,
            merchant_ids: vec![],
            expires_at: Some(keywarden::api::convert::timestamp(soon)),
        })
        .await
        .unwrap()
        .into_inner()
        .plaintext_token;
    let mut short = app.admin_as(&expiring);
    assert!(short.list_scopes(pb::ListScopesRequest {}).await.is_ok());
    crate::helpers::until("the token to expire", || {
        let mut short = short.clone();
        async move {
            let status = short.list_scopes(pb::ListScopesRequest {}).await.err()?;
            (status.code() == Code::Unauthenticated && status.message() == "operator token expired")
                .then_some(())
        }
    })
    .await;

    // Bad requests name their fields and create nothing.
    let before = scalar(&app.database_url, "SELECT COUNT(*) FROM operator_tokens").await;
    let bad = app
        .admin
        .create_operator_token(pb::CreateOperatorTokenRequest {
            name: String::new(),
            role: pb::OperatorRole::Admin as i32,
            merchant_ids: vec![MERCHANT.into()],
            expires_at: None,
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&bad), ["name", "merchant_ids"]);
    let unspecified = app
        .admin
        .create_operator_token(pb::CreateOperatorTokenRequest { name: "x".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&unspecified), ["role"]);
    assert_eq!(scalar(&app.database_url, "SELECT COUNT(*) FROM operator_tokens").await, before);

    // Neither token, nor its secret part, is anywhere in the database.
    app.settle().await;
    for plaintext in [&token, &expiring] {
        let secret = &plaintext[16..];
        let found = scalar(
            &app.database_url,
            &format!(
                "SELECT (SELECT COUNT(*) FROM operator_tokens WHERE name || role || merchant_ids || prefix || digest || created_by LIKE '%{secret}%') \
                 + (SELECT COUNT(*) FROM audit_events WHERE COALESCE(detail, '') || COALESCE(key_prefix, '') || COALESCE(actor, '') LIKE '%{secret}%')"
            ),
        )
        .await;
        assert_eq!(found, 0, "an operator token's secret is stored");
    }
    let lifecycle = scalar(
        &app.database_url,
        "SELECT COUNT(*) FROM audit_events WHERE actor = 'admin' AND kind IN ('OPERATOR_TOKEN_CREATED', 'OPERATOR_TOKEN_REVOKED')",
    )
    .await;
    assert_eq!(lifecycle, 3, "two creations and one revocation (the repeat changed nothing)");
    app.stop().await;
}

async fn refused_calls_are_audited_at_most_twice_per_peer_and_minute(backend: Backend) {
    let mut app: TestApp = spawn_app(backend).await;
    const FLOOD: usize = 40;
    let mut garbage = app.admin_as("kwop_not-even-well-formed");
    let mut wrong = app.admin_as("a-wrong-bootstrap-token-0123456789");
    for _ in 0..FLOOD {
        for client in [&mut garbage, &mut wrong] {
            let status = client.list_scopes(pb::ListScopesRequest {}).await.unwrap_err();
            assert_eq!(status.code(), Code::Unauthenticated);
            assert!(
                !status.message().contains("wrong-bootstrap"),
                "the token came back: {}",
                status.message()
            );
        }
    }
    let counted =
        crate::helpers::parse_metrics(&app.probes.exporter.render())["keywarden_admin_unauthenticated_total"];
    assert_eq!(counted, (2 * FLOOD) as f64);
    app.settle().await;
    let rows = || {
        scalar(
            &app.database_url,
            "SELECT COUNT(*) FROM audit_events WHERE kind = 'AUTHENTICATION_FAILED' AND ip = '127.0.0.1'",
        )
    };
    let first = rows().await;
    // Two series (malformed token, unknown token), a first row each; four
    // if the flood straddled a minute.
    assert!((2..=4).contains(&first), "{first} rows for {} refusals", 2 * FLOOD);
    let url = app.database_url.clone();
    app.stop_serving().await;
    let summarised = scalar(
        &url,
        "SELECT COUNT(*) FROM audit_events WHERE kind = 'AUTHENTICATION_FAILED' AND detail LIKE '%more in the minute%'",
    )
    .await;
    assert!(summarised >= 1, "the repeats were not summarised at shutdown");
    let total = scalar(&url, "SELECT COUNT(*) FROM audit_events WHERE kind = 'AUTHENTICATION_FAILED'").await;
    assert!(total <= 8, "{total} rows for {} refusals", 2 * FLOOD);
    app.stop().await;
}
