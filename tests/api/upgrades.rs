//! Rolling upgrades and rollbacks: a release serves a schema that the next
//! release has expanded (N−1 compatibility), and `migrate` never runs
//! backwards.

use keywarden::{api::pb, store::Store};
use sea_orm::{ConnectionTrait, Database, Statement};

use crate::helpers::{Backend, MERCHANT, allowed, deny, outcome, spawn_app_prepared};

backend_tests!(a_schema_migrated_by_the_next_release_is_served_and_never_migrated_back);

/// What the next release's expand-only migration might do: a column this
/// release does not read, and a table it does not know.
const FUTURE_MIGRATION: &str = "m20991231_000001_next_release";

async fn migrate_then_expand(url: String) {
    let store = Store::connect(&url, &Default::default()).await.unwrap();
    store.migrate().await.unwrap();
    store.close().await;
    let db = Database::connect(&url).await.unwrap();
    let backend = db.get_database_backend();
    for sql in [
        "ALTER TABLE api_keys ADD COLUMN rate_limit_per_minute INTEGER".to_owned(),
        "CREATE TABLE key_labels (key_id TEXT NOT NULL, label TEXT NOT NULL)".to_owned(),
        format!("INSERT INTO seaql_migrations (version, applied_at) VALUES ('{FUTURE_MIGRATION}', 0)"),
    ] {
        db.execute_raw(Statement::from_string(backend, sql)).await.unwrap();
    }
    db.close().await.unwrap();
}

async fn a_schema_migrated_by_the_next_release_is_served_and_never_migrated_back(backend: Backend) {
    // migrate_on_start is on (the default): the binary must still start.
    let mut app = spawn_app_prepared(backend, migrate_then_expand, |_| {}).await;
    let status = app.probes.store.schema_status().await.unwrap();
    assert_eq!(status.pending, Vec::<String>::new());
    assert_eq!(status.unknown, vec![FUTURE_MIGRATION.to_owned()]);

    // Admin and Verify work, the extra column unread and left alone.
    let (key, plaintext) = app.key_with_scopes(&["sales:read"]).await;
    assert_eq!(outcome(&app.verify(&plaintext, "", "sales:read").await), allowed());
    let listed = app
        .admin
        .list_keys(pb::ListKeysRequest { merchant_id: MERCHANT.into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.api_keys.len(), 1);
    crate::helpers::revoke(&mut app.admin, &key.id).await;
    assert_eq!(outcome(&app.verify(&plaintext, "", "sales:read").await), deny(pb::DenyReason::Revoked));

    // This release's migrate refuses to touch the newer schema, and says why.
    let refused = app.probes.store.migrate().await.unwrap_err().to_string();
    assert!(refused.contains(FUTURE_MIGRATION) && refused.contains("never runs backwards"), "{refused}");
    app.stop().await;
}
