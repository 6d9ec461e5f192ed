//! What the benchmark programs share: a throwaway PostgreSQL database next
//! to the one an admin URL names, so a run never touches existing data.

#![allow(dead_code, clippy::unwrap_used)]

use sea_orm::sqlx::{AssertSqlSafe, Connection, Executor, PgConnection};

/// Creates database `name` (dropping a leftover of the same name) and
/// returns its URL.
pub async fn create_postgres(admin_url: &str, name: &str) -> String {
    let mut conn = PgConnection::connect(admin_url).await.unwrap();
    let _ = conn.execute(AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))).await;
    conn.execute(AssertSqlSafe(format!("CREATE DATABASE {name}"))).await.unwrap();
    let base = admin_url.rsplit_once('/').map_or(admin_url, |(b, _)| b);
    format!("{base}/{name}")
}

/// Drops database `name`, best effort: a benchmark that ends anyway should
/// not fail over its clean-up.
pub async fn drop_postgres(admin_url: &str, name: &str) {
    if let Ok(mut conn) = PgConnection::connect(admin_url).await {
        let _ = conn.execute(AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))).await;
    }
}
