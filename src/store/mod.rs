//! Persistence on sea-orm: SQLite (embedded default) or PostgreSQL.
//!
//! [`Store`] owns the connection pool and exposes the queries the service
//! needs as plain async methods over domain types; sea-orm models stay in
//! here. Every statement sent is counted, so tests and the benchmark can show
//! how much database work a code path costs.

pub mod audit;
pub mod credits;
pub mod deliveries;
pub mod entity;
pub mod events;
pub mod keys;
pub mod lane;
pub mod migration;
pub mod operators;
pub mod peppers;
pub mod schedule;
pub mod usage;
pub mod webhooks;

use std::{
    str::FromStr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use sea_orm::{
    ConnectionTrait, DatabaseConnection, DbBackend, DbErr, RuntimeErr, SqlxPostgresConnector,
    SqlxSqliteConnector, Statement,
    sqlx::{
        self,
        postgres::{PgConnectOptions, PgPool, PgPoolOptions},
        sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
    },
};
use sea_orm_migration::MigratorTrait;
use thiserror::Error;

use migration::Migrator;

/// A position in a newest-first listing (keys, operator tokens, audit
/// events): the time and id of the last row of the page before. Rows are
/// ordered by time, then id, both descending: keyset pagination, stable
/// under concurrent inserts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub at: chrono::DateTime<chrono::Utc>,
    pub id: String,
}

impl Cursor {
    /// The rows after this position, given the listing's time and id
    /// columns.
    fn after<C: sea_orm::ColumnTrait>(&self, at_col: C, id_col: C) -> impl sea_orm::sea_query::IntoCondition {
        use sea_orm::ExprTrait as _;
        at_col.lt(self.at).or(at_col.eq(self.at).and(id_col.lt(self.id.as_str())))
    }
}

/// This binary's migrations against a database's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SchemaStatus {
    /// This binary's migrations the database lacks.
    pub pending: Vec<String>,
    /// Migrations in the database this binary does not know: a newer
    /// release's, which the schema policy says this one can ignore.
    pub unknown: Vec<String>,
}

/// Which database the store talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

#[derive(Debug, Error)]
pub enum StoreError {
    /// The database cannot be reached right now; worth retrying later.
    #[error("database unavailable: {0}")]
    Unavailable(#[source] DbErr),
    #[error("database error: {0}")]
    Db(#[source] DbErr),
    /// A row that cannot be read back into the domain, e.g. a damaged hash.
    #[error("stored {what} of {id} is unreadable: {detail}")]
    Corrupt { id: String, what: &'static str, detail: String },
    #[error("unsupported database URL {0:?}: use sqlite:// or postgres://")]
    UnsupportedUrl(String),
    #[error("the database schema is behind this binary: pending migrations {0:?}; run `keywarden migrate`")]
    SchemaBehind(Vec<String>),
    /// The database was migrated by a newer release. Serving on it is fine
    /// (releases are N-1 compatible); migrating it with this binary is not.
    #[error(
        "the database schema is ahead of this binary: migrations {0:?} come from a newer release; \
         `migrate` never runs backwards (run the newer release's `migrate`, or none)"
    )]
    SchemaAhead(Vec<String>),
    /// Migrations of a newer release applied while one of this binary's own
    /// is missing: not a state any sequence of releases produces.
    #[error("the database schema has newer migrations {unknown:?} but lacks this binary's {pending:?}")]
    SchemaGap { pending: Vec<String>, unknown: Vec<String> },
}

/// Database errors since start, for the metrics endpoint.
static DB_ERRORS: AtomicU64 = AtomicU64::new(0);

pub fn db_errors() -> u64 {
    DB_ERRORS.load(Ordering::Relaxed)
}

impl From<DbErr> for StoreError {
    fn from(e: DbErr) -> Self {
        DB_ERRORS.fetch_add(1, Ordering::Relaxed);
        if is_unavailable(&e) { Self::Unavailable(e) } else { Self::Db(e) }
    }
}

/// A raw sqlx error from a bulk path, classified like sea-orm's.
fn sqlx_error(e: sqlx::Error) -> StoreError {
    StoreError::from(DbErr::Exec(RuntimeErr::SqlxError(Arc::new(e))))
}

impl StoreError {
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }

    /// Whether the database refused the statement for what it holds (a
    /// constraint, a value it cannot store), so that running it again can
    /// never succeed; locks, timeouts and lost connections are not.
    pub fn is_permanent(&self) -> bool {
        let Self::Db(DbErr::Exec(RuntimeErr::SqlxError(e)) | DbErr::Query(RuntimeErr::SqlxError(e))) = self
        else {
            return false;
        };
        let Some(db) = e.as_database_error() else { return false };
        let Some(code) = db.code() else { return false };
        if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
            // SQLite's extended result code; the primary code is its low
            // byte: TOOBIG, CONSTRAINT, MISMATCH, RANGE.
            return code.parse::<u32>().is_ok_and(|n| matches!(n & 0xff, 18 | 19 | 20 | 25));
        }
        // PostgreSQL's SQLSTATE: class 22 data exception, class 23
        // integrity constraint violation.
        code.starts_with("22") || code.starts_with("23")
    }
}

/// Connection-level failures, as opposed to errors in what was asked.
fn is_unavailable(e: &DbErr) -> bool {
    match e {
        DbErr::ConnectionAcquire(_) | DbErr::Conn(_) => true,
        DbErr::Exec(RuntimeErr::SqlxError(e)) | DbErr::Query(RuntimeErr::SqlxError(e)) => matches!(
            **e,
            sqlx::Error::Io(_)
                | sqlx::Error::Tls(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed
                | sqlx::Error::Protocol(_)
        ),
        _ => false,
    }
}

/// Pool sizing and timeouts.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub max_connections: u32,
    pub acquire_timeout: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self { max_connections: 10, acquire_timeout: Duration::from_secs(2) }
    }
}

/// The PostgreSQL channel that carries key changes between replicas.
pub const CHANGES_CHANNEL: &str = "keywarden_key_changes";
/// application_name of the connection that LISTENs (operators can find it in
/// pg_stat_activity).
pub const LISTENER_APPLICATION: &str = "keywarden-listener";

/// The database, its backend, and a count of statements sent to it.
#[derive(Debug, Clone)]
pub struct Store {
    db: DatabaseConnection,
    backend: Backend,
    statements: Arc<AtomicU64>,
    reads: Arc<AtomicU64>,
    /// PostgreSQL only: a one-connection pool for the change listener, so
    /// that it never competes with queries for a connection.
    listen_pool: Option<PgPool>,
}

impl Store {
    /// On PostgreSQL, takes the advisory lock `lock` for the rest of `txn`
    /// if no other transaction holds it; `false` means another replica is
    /// doing this work now. SQLite has one writer: always `true`.
    pub(crate) async fn try_transaction_lock(
        &self,
        txn: &sea_orm::DatabaseTransaction,
        lock: i64,
    ) -> Result<bool, StoreError> {
        use sea_orm::ConnectionTrait;
        if self.backend() != Backend::Postgres {
            return Ok(true);
        }
        self.count(1);
        Ok(txn
            .query_one_raw(sea_orm::Statement::from_sql_and_values(
                self.db_backend(),
                "SELECT pg_try_advisory_xact_lock($1)",
                [sea_orm::Value::from(lock)],
            ))
            .await?
            .and_then(|row| row.try_get_by_index::<bool>(0).ok())
            .unwrap_or(false))
    }

    /// Connects lazily-validated pools: `sqlite://path?mode=rwc` or `postgres://…`.
    pub async fn connect(url: &str, options: &StoreOptions) -> Result<Self, StoreError> {
        let (db, backend) = if url.starts_with("sqlite:") {
            // WAL lets readers run beside the single writer; NORMAL sync is
            // durable across process crashes, which is what WAL mode promises.
            let connect = SqliteConnectOptions::from_str(url)
                .map_err(|e| StoreError::Db(DbErr::Conn(RuntimeErr::SqlxError(Arc::new(e)))))?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                .busy_timeout(Duration::from_secs(5))
                .foreign_keys(true)
                // 32 MiB of page cache per connection instead of 2 MiB: the
                // audit table's indexes are written on every batch, and
                // re-reading their pages from the file is what a row costs.
                .pragma("cache_size", "-32768")
                // Checkpoint every ~40 MiB of WAL instead of ~4 MiB: audit
                // batches rewrite the same index pages again and again, and
                // each checkpoint copies them back into the database file.
                .pragma("wal_autocheckpoint", "10000");
            let pool = SqlitePoolOptions::new()
                .max_connections(options.max_connections)
                .acquire_timeout(options.acquire_timeout)
                // No reaper task (see the PostgreSQL pool below).
                .idle_timeout(None)
                .max_lifetime(None)
                .connect_with(connect)
                .await
                .map_err(|e| StoreError::Unavailable(DbErr::Conn(RuntimeErr::SqlxError(Arc::new(e)))))?;
            (SqlxSqliteConnector::from_sqlx_sqlite_pool(pool), Backend::Sqlite)
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            let connect = PgConnectOptions::from_str(url)
                .map_err(|e| StoreError::Db(DbErr::Conn(RuntimeErr::SqlxError(Arc::new(e)))))?;
            // sqlx 0.9's reaper (the task idle_timeout and max_lifetime
            // start) reads the idle count while `release` has pushed a
            // connection but not yet counted it; a concurrent acquire can make
            // the count wrap to usize::MAX, and the reaper then loops over
            // "idle" connections without ever yielding, which pins a runtime
            // thread and hangs shutdown. Without either timeout there is no
            // reaper; connections are checked before each use instead
            // (sqlx's test_before_acquire), and the pool is small and bounded.
            let pool = PgPoolOptions::new()
                .max_connections(options.max_connections)
                .acquire_timeout(options.acquire_timeout)
                .idle_timeout(None)
                .max_lifetime(None)
                .connect_with(connect.clone().application_name("keywarden"))
                .await
                .map_err(|e| StoreError::Unavailable(DbErr::Conn(RuntimeErr::SqlxError(Arc::new(e)))))?;
            let listen_pool = PgPoolOptions::new()
                .max_connections(1)
                .acquire_timeout(options.acquire_timeout)
                .max_lifetime(None)
                .idle_timeout(None)
                .connect_lazy_with(connect.application_name(LISTENER_APPLICATION));
            return Ok(Self {
                db: SqlxPostgresConnector::from_sqlx_postgres_pool(pool),
                backend: Backend::Postgres,
                statements: Arc::new(AtomicU64::new(0)),
                reads: Arc::new(AtomicU64::new(0)),
                listen_pool: Some(listen_pool),
            });
        } else {
            return Err(StoreError::UnsupportedUrl(redact_url(url)));
        };
        Ok(Self {
            db,
            backend,
            statements: Arc::new(AtomicU64::new(0)),
            reads: Arc::new(AtomicU64::new(0)),
            listen_pool: None,
        })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub(crate) fn db(&self) -> &DatabaseConnection {
        &self.db
    }

    pub(crate) fn db_backend(&self) -> DbBackend {
        match self.backend {
            Backend::Sqlite => DbBackend::Sqlite,
            Backend::Postgres => DbBackend::Postgres,
        }
    }

    /// The same database, with counters of its own: for background jobs
    /// that poll whatever the load (the event relay, the expiry scan), so
    /// that [`Self::statements`] and [`Self::reads`] keep measuring what
    /// calls cost.
    pub fn counted_apart(&self) -> Self {
        Self { statements: Arc::default(), reads: Arc::default(), ..self.clone() }
    }

    /// Statements sent since start.
    pub fn statements(&self) -> u64 {
        self.statements.load(Ordering::Relaxed)
    }

    /// Standalone SELECTs since start (reads inside transactions are counted
    /// only in [`Self::statements`]).
    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    fn count(&self, statements: u64) {
        self.statements.fetch_add(statements, Ordering::Relaxed);
    }

    fn count_read(&self) {
        self.count(1);
        self.reads.fetch_add(1, Ordering::Relaxed);
    }

    /// Applies pending migrations. On PostgreSQL an advisory lock makes
    /// replicas that start together take turns instead of racing. Refuses a
    /// schema that holds migrations this binary does not know: a newer
    /// release migrated it, and migrations only ever run forwards.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        match self.backend {
            Backend::Sqlite => self.migrate_forwards().await,
            Backend::Postgres => {
                let pool = self.db.get_postgres_connection_pool();
                let mut conn =
                    pool.acquire().await.map_err(|e| DbErr::Conn(RuntimeErr::SqlxError(Arc::new(e))))?;
                sqlx::query("SELECT pg_advisory_lock($1)")
                    .bind(MIGRATION_LOCK)
                    .execute(&mut *conn)
                    .await
                    .map_err(|e| DbErr::Exec(RuntimeErr::SqlxError(Arc::new(e))))?;
                let result = self.migrate_forwards().await;
                let unlock = sqlx::query("SELECT pg_advisory_unlock($1)")
                    .bind(MIGRATION_LOCK)
                    .execute(&mut *conn)
                    .await;
                result?;
                unlock.map_err(|e| DbErr::Exec(RuntimeErr::SqlxError(Arc::new(e))))?;
                Ok(())
            }
        }
    }

    /// Reads the status again, under the lock: another replica may have
    /// migrated since the caller looked.
    async fn migrate_forwards(&self) -> Result<(), StoreError> {
        let status = self.schema_status().await?;
        if !status.unknown.is_empty() {
            return Err(StoreError::SchemaAhead(status.unknown));
        }
        if !status.pending.is_empty() {
            Migrator::up(&self.db, None).await?;
        }
        Ok(())
    }

    /// Readies the schema for serving: applies this binary's pending
    /// migrations when `migrate` is set, and accepts a schema a newer
    /// release migrated (returned, for the caller to log).
    pub async fn prepare_schema(&self, migrate: bool) -> Result<SchemaStatus, StoreError> {
        let status = self.schema_status().await?;
        match (status.pending.is_empty(), status.unknown.is_empty()) {
            (true, _) => Ok(status),
            (false, true) if migrate => {
                self.migrate().await?;
                Ok(SchemaStatus::default())
            }
            (false, true) => Err(StoreError::SchemaBehind(status.pending)),
            (false, false) => Err(StoreError::SchemaGap { pending: status.pending, unknown: status.unknown }),
        }
    }

    /// This binary's migrations against those recorded in the database.
    pub async fn schema_status(&self) -> Result<SchemaStatus, StoreError> {
        let applied = self.applied_migrations().await?;
        let known: Vec<String> = Migrator::migrations().iter().map(|m| m.name().to_owned()).collect();
        Ok(SchemaStatus {
            pending: known.iter().filter(|m| !applied.contains(m)).cloned().collect(),
            unknown: applied.into_iter().filter(|m| !known.contains(m)).collect(),
        })
    }

    /// Versions in `seaql_migrations`, oldest first; none before the first
    /// migration created the table. Read-only: `get_migration_models` alone
    /// would create the table on a database that has none.
    async fn applied_migrations(&self) -> Result<Vec<String>, StoreError> {
        let table = Migrator::migration_table_name().to_string();
        if !sea_orm_migration::SchemaManager::new(&self.db).has_table(table).await? {
            return Ok(Vec::new());
        }
        Ok(Migrator::get_migration_models(&self.db).await?.into_iter().map(|m| m.version).collect())
    }

    /// The database's clock, to microseconds on PostgreSQL and
    /// milliseconds on SQLite; read as text so both backends parse alike.
    /// The health monitor's ping; like other timed reads, not counted in
    /// [`Self::statements`] (that count is what serving calls costs).
    pub async fn database_time(&self) -> Result<chrono::DateTime<chrono::Utc>, StoreError> {
        let sql = match self.backend() {
            Backend::Postgres => {
                r#"SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')"#
            }
            Backend::Sqlite => "SELECT strftime('%Y-%m-%dT%H:%M:%fZ', 'now')",
        };
        let text = self
            .db
            .query_one_raw(Statement::from_string(self.db_backend(), sql))
            .await?
            .and_then(|row| row.try_get_by_index::<String>(0).ok())
            .unwrap_or_default();
        chrono::DateTime::parse_from_rfc3339(&text).map(|t| t.with_timezone(&chrono::Utc)).map_err(|e| {
            StoreError::Corrupt {
                id: "now".into(),
                what: "database clock reading",
                detail: format!("{text:?}: {e}"),
            }
        })
    }

    /// Ids as one JSON-array parameter, for `jsonb_array_elements_text($n::jsonb)`
    /// on PostgreSQL: one bound value however many ids.
    pub(crate) fn json_ids<'a>(ids: impl IntoIterator<Item = &'a str>) -> Result<sea_orm::Value, StoreError> {
        let ids: Vec<&str> = ids.into_iter().collect();
        serde_json::to_string(&ids)
            .map(sea_orm::Value::from)
            .map_err(|e| StoreError::Db(sea_orm::DbErr::Custom(format!("encoding ids: {e}"))))
    }

    /// `NOTIFY channel` with an empty payload (the change feed's heartbeat).
    /// Not counted in [`Self::statements`]: it runs on a timer.
    pub async fn notify(&self, channel: &str) -> Result<(), StoreError> {
        self.db
            .execute_raw(Statement::from_sql_and_values(
                self.db_backend(),
                "SELECT pg_notify($1, '')",
                [sea_orm::Value::from(channel.to_owned())],
            ))
            .await?;
        Ok(())
    }

    /// The change listener's pool; `None` on SQLite (one process, so changes
    /// are announced in-process).
    pub fn listen_pool(&self) -> Option<&PgPool> {
        self.listen_pool.as_ref()
    }

    pub async fn close(&self) {
        if let Some(pool) = &self.listen_pool {
            pool.close().await;
        }
        let _ = self.db.clone().close().await;
    }
}

/// Arbitrary constant naming keywarden's migration lock.
const MIGRATION_LOCK: i64 = 0x6b65_7977_6172_6465;

/// The URL without its password, for error messages.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}://{}:***@{}", &url[..scheme], user, &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

/// A migrated SQLite store in a fresh temporary directory, for unit tests
/// that need a real database; the directory lives as long as the guard.
#[cfg(test)]
pub(crate) async fn temp_sqlite_store() -> (Store, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("keywarden.db").display());
    let store = Store::connect(&url, &StoreOptions::default()).await.unwrap();
    store.migrate().await.unwrap();
    (store, dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_passwords_in_messages() {
        assert_eq!(redact_url("postgres://u:secret@h:5432/db"), "postgres://u:***@h:5432/db");
        assert_eq!(redact_url("sqlite://data/k.db"), "sqlite://data/k.db");
    }
}
