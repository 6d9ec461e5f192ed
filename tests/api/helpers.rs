//! Test harness: `spawn_app` starts the real server (real gRPC on
//! 127.0.0.1:0, real store, real scrypt) in-process and returns clients.
//! Every app gets its own database: a temporary SQLite file, or a fresh
//! database on the PostgreSQL at `KEYWARDEN_TEST_POSTGRES_URL` (default: the
//! machine's, postgres://postgres@127.0.0.1:5432/test; set it empty to skip
//! the PostgreSQL runs on a machine without one).

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use keywarden::{
    api::pb::{self, key_admin_client::KeyAdminClient, key_verify_client::KeyVerifyClient},
    config::Settings,
    startup::{Application, Probes},
};
use secrecy::SecretString;
use tokio::{sync::oneshot, task::JoinHandle};
use tonic::{
    Request, Status,
    metadata::MetadataValue,
    service::{Interceptor, interceptor::InterceptedService},
    transport::Channel,
};

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789abcdef";
pub const PORTAL_TOKEN: &str = "test-portal-token-0123456789abcdef";
pub const MERCHANT: &str = "cmm3zkkx000006ogg8arp52qb";
pub const OTHER_MERCHANT: &str = "m_other";
/// 32 bytes of 0x2a, base64.
pub const PEPPER: &str = "KioqKioqKioqKioqKioqKioqKioqKioqKioqKioqKio=";

#[derive(Debug, Clone)]
pub enum Backend {
    Sqlite,
    Postgres(String),
}

/// Where this project's machines (and CI) run PostgreSQL.
pub const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

impl Backend {
    /// The machine's PostgreSQL unless `KEYWARDEN_TEST_POSTGRES_URL` names
    /// another. Set empty, it opts out: build.rs then marks every PostgreSQL
    /// test ignored, so a skipped run shows as skipped, never as passed.
    pub fn postgres() -> Self {
        match std::env::var("KEYWARDEN_TEST_POSTGRES_URL") {
            Ok(url) if url.is_empty() => {
                panic!("KEYWARDEN_TEST_POSTGRES_URL is empty: this PostgreSQL test should have been ignored")
            }
            Ok(url) => Self::Postgres(url),
            Err(_) => Self::Postgres(DEFAULT_POSTGRES_URL.to_owned()),
        }
    }
}

/// Generates `sqlite::name` and `postgres::name` tests from `async fn name(Backend)`,
/// each bounded by [`TEST_LIMIT`].
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    $crate::helpers::bounded(stringify!($name), super::$name($crate::helpers::Backend::Sqlite)).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                #[cfg_attr(skip_postgres_tests, ignore = "KEYWARDEN_TEST_POSTGRES_URL is empty")]
                async fn $name() {
                    $crate::helpers::bounded(stringify!($name), super::$name($crate::helpers::Backend::postgres())).await
                }
            )*
        }
    };
}

/// Generates `once::name` tests from `async fn name()`, each bounded by
/// [`TEST_LIMIT`]. Flags after a name: `postgres` for one that needs
/// PostgreSQL (ignored when it is opted out of), `faketime` for one that
/// needs libfaketime (ignored without it), `current_thread` for one
/// whose runtime must be a single thread (a thread-local span subscriber
/// then sees every task).
macro_rules! once_tests {
    (@test [$($attr:tt)*] [$($flavor:tt)*] $name:ident []) => {
        #[tokio::test $($flavor)*]
        $($attr)*
        async fn $name() {
            $crate::helpers::bounded(stringify!($name), super::$name()).await
        }
    };
    (@test [$($attr:tt)*] [$($flavor:tt)*] $name:ident [postgres $($rest:ident)*]) => {
        once_tests!(@test
            [$($attr)* #[cfg_attr(skip_postgres_tests, ignore = "KEYWARDEN_TEST_POSTGRES_URL is empty")]]
            [$($flavor)*] $name [$($rest)*]);
    };
    (@test [$($attr:tt)*] [$($flavor:tt)*] $name:ident [faketime $($rest:ident)*]) => {
        once_tests!(@test
            [$($attr)* #[cfg_attr(skip_faketime_tests, ignore = "libfaketime is not installed (Debian's faketime)")]]
            [$($flavor)*] $name [$($rest)*]);
    };
    (@test [$($attr:tt)*] [$($flavor:tt)*] $name:ident [current_thread $($rest:ident)*]) => {
        once_tests!(@test [$($attr)*] [] $name [$($rest)*]);
    };
    ($($name:ident $(($($flag:ident),*))?),* $(,)?) => {
        mod once {
            $(
                once_tests!(@test [] [(flavor = "multi_thread", worker_threads = 2)] $name [$($($flag)*)?]);
            )*
        }
    };
}

/// The longest a single test may run (the longest, an outage of a minute
/// under load, takes about 80 s).
pub const TEST_LIMIT: Duration = Duration::from_secs(300);

tokio::task_local! {
    /// What the running test last waited for (set by [`until`]).
    static WAITING: Arc<Mutex<String>>;
}

/// Runs `test` for at most [`TEST_LIMIT`]; past it, fails naming the test
/// and what it was last waiting for, instead of hanging the suite.
pub async fn bounded(name: &str, test: impl Future<Output = ()>) {
    bounded_by(TEST_LIMIT, name, test).await;
}

pub async fn bounded_by(limit: Duration, name: &str, test: impl Future<Output = ()>) {
    let waiting = Arc::new(Mutex::new(String::from("nothing named (no `until` yet)")));
    let run = WAITING.scope(Arc::clone(&waiting), test);
    if tokio::time::timeout(limit, run).await.is_err() {
        let waiting = waiting.lock().unwrap().clone();
        panic!("{name} ran past its limit of {limit:?}; it was last waiting for: {waiting}");
    }
}

/// Adds the admin bearer token to every call.
#[derive(Clone)]
pub struct Bearer(MetadataValue<tonic::metadata::Ascii>);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request.metadata_mut().insert("authorization", self.0.clone());
        Ok(request)
    }
}

pub type AdminClient = KeyAdminClient<InterceptedService<Channel, Bearer>>;

pub struct TestApp {
    pub addr: SocketAddr,
    /// KeyAdmin's own listener and the plaintext health one, when configured.
    pub admin_addr: Option<SocketAddr>,
    pub health_addr: Option<SocketAddr>,
    /// GitHub's leak reports, when configured.
    pub leak_addr: Option<SocketAddr>,
    /// How this app's clients connect: plaintext, or TLS with this client.
    pub tls: Option<crate::pki::TlsClient>,
    pub admin: AdminClient,
    pub verify: KeyVerifyClient<Channel>,
    pub probes: Probes,
    pub database_url: String,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
    dir: tempfile::TempDir,
    postgres: DatabaseGuard,
}

/// A fresh database for one test: its URL, and (for PostgreSQL) the admin
/// URL and name needed to drop it afterwards.
pub async fn fresh_database(backend: &Backend, dir: &std::path::Path) -> (String, DatabaseGuard) {
    match backend {
        Backend::Sqlite => {
            (format!("sqlite://{}?mode=rwc", dir.join("test.db").display()), DatabaseGuard(None))
        }
        Backend::Postgres(admin_url) => {
            use sea_orm::sqlx::{Connection, Executor, PgConnection};
            let name = format!("{}{}", database_prefix(), uuid::Uuid::now_v7().simple());
            let mut conn = PgConnection::connect(admin_url).await.unwrap_or_else(|e| {
                panic!(
                    "cannot reach PostgreSQL at {admin_url} ({e}); start it, point KEYWARDEN_TEST_POSTGRES_URL \
                     at another, or set KEYWARDEN_TEST_POSTGRES_URL= (empty) to skip the PostgreSQL runs"
                )
            });
            let create = format!("CREATE DATABASE {name}");
            conn.execute(sea_orm::sqlx::AssertSqlSafe(create)).await.unwrap();
            conn.close().await.ok();
            let base = admin_url.rsplit_once('/').map_or(admin_url.as_str(), |(b, _)| b);
            (format!("{base}/{name}"), DatabaseGuard(Some((admin_url.clone(), name))))
        }
    }
}

/// How this run's PostgreSQL databases are named: `kw_t_` and, under CI,
/// the run's own id (`KEYWARDEN_TEST_RUN_ID`, up to 24 letters and digits,
/// so a name stays within PostgreSQL's 63 bytes), so that cleaning up
/// after a killed run removes only that run's databases.
fn database_prefix() -> String {
    let run: String = std::env::var("KEYWARDEN_TEST_RUN_ID")
        .unwrap_or_default()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(24)
        .collect::<String>()
        .to_ascii_lowercase();
    if run.is_empty() { "kw_t_".to_owned() } else { format!("kw_t_{run}_") }
}

/// A test's own PostgreSQL database (admin URL and name), dropped when the
/// guard goes, also when the test fails: [`drop_database`] at the end of a
/// test, `Drop` when a panic unwinds past it.
#[derive(Debug, Default)]
pub struct DatabaseGuard(Option<(String, String)>);

impl Drop for DatabaseGuard {
    fn drop(&mut self) {
        // Drop cannot await: a thread of its own runs the statement.
        if let Some(database) = self.0.take() {
            let dropping = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
                if let Ok(runtime) = runtime {
                    runtime.block_on(drop_now(database));
                }
            });
            let _ = dropping.join();
        }
    }
}

pub async fn drop_database(mut guard: DatabaseGuard) {
    if let Some(database) = guard.0.take() {
        drop_now(database).await;
    }
}

async fn drop_now((admin_url, name): (String, String)) {
    use sea_orm::sqlx::{Connection, Executor, PgConnection};
    let dropped = async {
        if let Ok(mut conn) = PgConnection::connect(&admin_url).await {
            let drop = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
            let _ = conn.execute(sea_orm::sqlx::AssertSqlSafe(drop)).await;
            conn.close().await.ok();
        }
    };
    if tokio::time::timeout(Duration::from_secs(30), dropped).await.is_err() {
        eprintln!("could not drop test database {name} within 30 s; CI's clean-up removes it");
    }
}

/// Settings a test app starts from: fast flushes, a short drain, two named tokens.
pub fn test_settings(database_url: &str, data_dir: &std::path::Path) -> Settings {
    let mut settings = Settings {
        listen_addr: "127.0.0.1:0".parse().unwrap(),
        metrics_addr: "127.0.0.1:0".parse().unwrap(),
        data_dir: data_dir.to_owned(),
        database_url: Some(database_url.to_owned()),
        pepper: Some(SecretString::from(PEPPER)),
        usage_flush_interval_ms: 100,
        audit_rollup_interval_ms: 100,
        shutdown_grace_ms: 2_000,
        flush_timeout_ms: 5_000,
        db_max_connections: 5,
        ..Settings::default()
    };
    settings.admin_tokens.insert("admin".into(), SecretString::from(ADMIN_TOKEN));
    settings.admin_tokens.insert("portal".into(), SecretString::from(PORTAL_TOKEN));
    settings
}

pub async fn spawn_app(backend: Backend) -> TestApp {
    spawn_app_with(backend, |_| {}).await
}

pub async fn spawn_app_with(backend: Backend, customise: impl FnOnce(&mut Settings)) -> TestApp {
    spawn_app_prepared(backend, |_| async {}, customise).await
}

/// [`spawn_app_with`] on a database that `prepare` has had first (given its
/// URL), e.g. one migrated by another release.
pub async fn spawn_app_prepared<F: Future<Output = ()>>(
    backend: Backend,
    prepare: impl FnOnce(String) -> F,
    customise: impl FnOnce(&mut Settings),
) -> TestApp {
    spawn_app_over(backend, None, prepare, customise).await
}

/// [`spawn_app_prepared`] whose clients connect with `tls` (the settings
/// must make the server serve TLS).
pub async fn spawn_app_over<F: Future<Output = ()>>(
    backend: Backend,
    tls: Option<crate::pki::TlsClient>,
    prepare: impl FnOnce(String) -> F,
    customise: impl FnOnce(&mut Settings),
) -> TestApp {
    let dir = tempfile::tempdir().unwrap();
    let (database_url, postgres) = fresh_database(&backend, dir.path()).await;
    prepare(database_url.clone()).await;
    serve_on(database_url, postgres, dir, tls, customise).await
}

/// Another app on `first`'s database (e.g. a restart with new settings);
/// `first` keeps owning the database, so it must outlive this one.
pub async fn spawn_app_on(first: &TestApp, customise: impl FnOnce(&mut Settings)) -> TestApp {
    serve_on(
        first.database_url.clone(),
        DatabaseGuard(None),
        tempfile::tempdir().unwrap(),
        first.tls.clone(),
        customise,
    )
    .await
}

async fn serve_on(
    database_url: String,
    postgres: DatabaseGuard,
    dir: tempfile::TempDir,
    tls: Option<crate::pki::TlsClient>,
    customise: impl FnOnce(&mut Settings),
) -> TestApp {
    let mut settings = test_settings(&database_url, dir.path());
    customise(&mut settings);
    let app = Application::build(settings).await.expect("application builds");
    let addr = app.local_addr();
    let (admin_addr, health_addr, leak_addr) = (app.admin_addr(), app.health_addr(), app.leak_report_addr());
    let probes = app.probes();
    let (tx, rx) = oneshot::channel::<()>();
    let handle = tokio::spawn(app.run_until_stopped(async move {
        let _ = rx.await;
    }));
    let channel = match &tls {
        None => connect(addr).await,
        Some(client) => {
            let (channel, _) = client.channel(addr);
            let health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
            until("the server to answer over TLS", || {
                let mut health = health.clone();
                async move { health.check(tonic_health::pb::HealthCheckRequest::default()).await.ok() }
            })
            .await;
            channel
        }
    };
    let admin_channel = match (admin_addr, &tls) {
        (None, _) => channel.clone(),
        (Some(a), None) => Channel::from_shared(format!("http://{a}")).unwrap().connect_lazy(),
        (Some(a), Some(client)) => client.channel(a).0,
    };
    TestApp {
        addr,
        admin_addr,
        health_addr,
        leak_addr,
        tls,
        admin: admin_client(admin_channel, ADMIN_TOKEN),
        verify: KeyVerifyClient::new(channel),
        probes,
        database_url,
        shutdown: Some(tx),
        handle: Some(handle),
        dir,
        postgres,
    }
}

pub async fn connect(addr: SocketAddr) -> Channel {
    let endpoint = Channel::from_shared(format!("http://{addr}")).unwrap();
    until(&format!("the server at {addr} to accept connections"), || async { endpoint.connect().await.ok() })
        .await
}

/// How long a test waits for something that should happen promptly before
/// it fails (generous: CI's machine may be busy with other tests).
pub const PATIENCE: Duration = Duration::from_secs(20);

/// Verifies `request` on `client` until `accept` takes the answer (a
/// failed call is tried again), at most [`PATIENCE`]: how a test waits for
/// a change (a revocation, an expiry, the database's return) to reach a
/// replica.
pub async fn verify_until(
    what: &str,
    client: &KeyVerifyClient<Channel>,
    request: pb::VerifyRequest,
    accept: impl Fn(&pb::VerifyResponse) -> bool,
) -> pb::VerifyResponse {
    let accept = &accept;
    until(what, || {
        let (mut client, request) = (client.clone(), request.clone());
        async move { client.verify(request).await.ok().map(tonic::Response::into_inner).filter(|r| accept(r)) }
    })
    .await
}

/// Polls `check` until it answers `Some`, at most [`PATIENCE`]; then fails
/// the test, naming `what` it waited for.
pub async fn eventually<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    until(what, || std::future::ready(check())).await
}

/// [`eventually`] for a check that must await (a query, a connection).
pub async fn until<T, F: Future<Output = Option<T>>>(what: &str, mut check: impl FnMut() -> F) -> T {
    let _ = WAITING.try_with(|waiting| what.clone_into(&mut waiting.lock().unwrap()));
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(found) = check().await {
            return found;
        }
        assert!(tokio::time::Instant::now() < deadline, "waited {PATIENCE:?} for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A well-formed key with `key`'s lookup prefix but another secret: it
/// costs the server one scrypt, then answers NOT_FOUND.
pub fn wrong_secret(key: &str, variant: u32) -> String {
    let body = format!("{}{:0>32}", &key[..16], variant);
    keywarden::keys::format::checksummed(body)
}

pub fn admin_client(channel: Channel, token: &str) -> AdminClient {
    let value = format!("Bearer {token}").parse().unwrap();
    KeyAdminClient::with_interceptor(channel, Bearer(value))
}

/// Creates a `sales:read` key for the test merchant through `admin`;
/// returns its id and plaintext.
pub async fn create_sales_key(admin: &mut AdminClient, name: &str) -> (String, String) {
    let r = admin
        .create_key(pb::CreateKeyRequest {
            merchant_id: MERCHANT.into(),
            name: name.into(),
            scopes: vec!["sales:read".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    (r.api_key.unwrap().id, r.plaintext_key)
}

/// Issues an operator token through `admin`; returns its id and plaintext.
pub async fn issue_operator(
    admin: &mut AdminClient,
    name: &str,
    role: pb::OperatorRole,
    merchants: &[&str],
) -> (String, String) {
    let r = admin
        .create_operator_token(pb::CreateOperatorTokenRequest {
            name: name.into(),
            role: role as i32,
            merchant_ids: merchants.iter().map(|m| (*m).to_owned()).collect(),
            expires_at: None,
        })
        .await
        .expect("CreateOperatorToken")
        .into_inner();
    (r.operator_token.unwrap().id, r.plaintext_token)
}

impl TestApp {
    /// An admin client presenting another token.
    pub fn admin_as(&self, token: &str) -> AdminClient {
        admin_client(self.channel(), token)
    }

    /// A new channel to the listener serving KeyAdmin.
    pub fn channel(&self) -> Channel {
        let addr = self.admin_addr.unwrap_or(self.addr);
        match &self.tls {
            None => Channel::from_shared(format!("http://{addr}")).unwrap().connect_lazy(),
            Some(client) => client.channel(addr).0,
        }
    }

    /// Graceful stop: drain, flush usage and audit, then drop the database.
    pub async fn stop(mut self) {
        self.stop_serving().await;
        drop_database(std::mem::take(&mut self.postgres)).await;
    }

    /// Asks the app to stop and returns how its run ended (an error when it
    /// could not write everything), failing the test after `within`.
    pub async fn stop_within(&mut self, within: Duration) -> anyhow::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let handle = self.handle.take().expect("the app is running");
        tokio::time::timeout(within, handle).await.expect("the app stopped in time").unwrap()
    }

    /// How the app's run ended by itself (without being asked to stop),
    /// failing the test after `within`.
    pub async fn ended_within(&mut self, within: Duration) -> anyhow::Result<()> {
        let handle = self.handle.take().expect("the app is running");
        tokio::time::timeout(within, handle).await.expect("the app ended in time").unwrap()
    }

    /// The app's data directory (its spool and usage spill live there).
    pub fn data_dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Graceful stop that keeps the database for inspection.
    pub async fn stop_serving(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(handle) = self.handle.take() {
            handle.await.unwrap().unwrap();
        }
    }

    pub async fn create_key(&mut self, req: pb::CreateKeyRequest) -> (pb::ApiKey, String) {
        let resp = self.admin.create_key(req).await.expect("CreateKey").into_inner();
        (resp.api_key.unwrap(), resp.plaintext_key)
    }

    /// A key for MERCHANT with the given scopes and no other limits.
    pub async fn key_with_scopes(&mut self, scopes: &[&str]) -> (pb::ApiKey, String) {
        self.create_key(pb::CreateKeyRequest {
            merchant_id: MERCHANT.into(),
            name: "test key".into(),
            scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
            ..Default::default()
        })
        .await
    }

    pub async fn verify(&mut self, key: &str, ip: &str, scope: &str) -> pb::VerifyResponse {
        self.verify
            .verify(pb::VerifyRequest {
                key: key.into(),
                ip: ip.into(),
                required_scope: scope.into(),
                endpoint: "/public/api/v1/invoices".into(),
                method: "POST".into(),
                cost: 0,
            })
            .await
            .expect("Verify")
            .into_inner()
    }

    /// A key's audit trail (newest first, up to 500 rows), once everything
    /// queued is written.
    pub async fn audit_of(&mut self, key_id: &str) -> Vec<pb::AuditEvent> {
        self.settle().await;
        self.admin
            .list_audit_events(pb::ListAuditEventsRequest {
                merchant_id: MERCHANT.into(),
                api_key_id: key_id.into(),
                page_size: 500,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .events
    }

    /// Waits until every queued audit row and usage count is in the database.
    pub async fn settle(&self) {
        let drained = || {
            self.probes.audit.unwritten() == 0
                && self.probes.usage.pending_keys() == 0
                && self.probes.rollups.due().is_empty()
        };
        eventually("the audit queue, rollups and usage counts to drain", || drained().then_some(())).await;
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

pub fn deny(reason: pb::DenyReason) -> (i32, i32) {
    (pb::Decision::Deny as i32, reason as i32)
}

/// The decision and reason of a response, for one-line assertions.
pub fn outcome(r: &pb::VerifyResponse) -> (i32, i32) {
    (r.decision, r.deny_reason)
}

pub fn allowed() -> (i32, i32) {
    (pb::Decision::Allow as i32, pb::DenyReason::Unspecified as i32)
}

/// The fields named in an INVALID_ARGUMENT's BadRequest details.
pub fn violated_fields(status: &Status) -> Vec<String> {
    use tonic_types::StatusExt;
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    status
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

/// A transaction that keeps other writers off `audit_events` (readers still
/// read), to hold audit rows in flight.
pub enum TableLock {
    Sqlite(sea_orm::sqlx::SqliteConnection),
    Postgres(sea_orm::sqlx::PgConnection),
}

/// The first column of the first row of `sql`, on a connection of its own
/// (counts and other single values read straight from the database).
pub async fn value<T: sea_orm::TryGetable>(database_url: &str, sql: &str) -> T {
    use sea_orm::{ConnectionTrait, Database, Statement};
    let db = Database::connect(database_url).await.unwrap();
    let row = db
        .query_one_raw(Statement::from_string(db.get_database_backend(), sql.to_owned()))
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("no row: {sql}"));
    let value = row.try_get_by_index(0).unwrap();
    db.close().await.ok();
    value
}

/// [`value`] for a number (counts, mostly).
pub async fn scalar(database_url: &str, sql: &str) -> i64 {
    value(database_url, sql).await
}

/// Runs one statement on the test's database (a fault to inject).
pub async fn execute(database_url: &str, sql: &str) {
    use sea_orm::{ConnectionTrait, Database};
    let db = Database::connect(database_url).await.unwrap();
    db.execute_unprepared(sql).await.unwrap();
    db.close().await.ok();
}

pub async fn lock_audit_table(database_url: &str) -> TableLock {
    lock_table(database_url, "audit_events").await
}

/// Blocks writes to `table` (on SQLite, to the whole database) until
/// released; reads go on.
pub async fn lock_table(database_url: &str, table: &str) -> TableLock {
    use sea_orm::sqlx::{Connection, Executor};
    if database_url.starts_with("sqlite:") {
        let mut conn = sea_orm::sqlx::SqliteConnection::connect(database_url).await.unwrap();
        conn.execute("BEGIN IMMEDIATE").await.unwrap();
        TableLock::Sqlite(conn)
    } else {
        let mut conn = sea_orm::sqlx::PgConnection::connect(database_url).await.unwrap();
        conn.execute("BEGIN").await.unwrap();
        conn.execute(sea_orm::sqlx::AssertSqlSafe(format!("LOCK TABLE {table} IN EXCLUSIVE MODE")))
            .await
            .unwrap();
        TableLock::Postgres(conn)
    }
}

impl TableLock {
    pub async fn release(self) {
        use sea_orm::sqlx::{Connection, Executor};
        match self {
            Self::Sqlite(mut c) => {
                c.execute("ROLLBACK").await.unwrap();
                c.close().await.ok();
            }
            Self::Postgres(mut c) => {
                c.execute("ROLLBACK").await.unwrap();
                c.close().await.ok();
            }
        }
    }
}

/// `GET /metrics`: the response head and body.
pub async fn scrape(addr: SocketAddr) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: keywarden\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    (head.to_owned(), body.to_owned())
}

/// Parses the text exposition strictly enough to catch malformed output:
/// every line is a comment of a known kind or `name{labels} value`, and the
/// document ends with `# EOF`. Returns samples by `name{labels}`.
pub fn parse_metrics(body: &str) -> std::collections::HashMap<String, f64> {
    let body = body.trim_end();
    assert!(body.ends_with("# EOF"), "OpenMetrics ends with # EOF");
    let mut samples = std::collections::HashMap::new();
    let mut typed = std::collections::HashSet::new();
    for line in body.lines() {
        if let Some(comment) = line.strip_prefix("# ") {
            let kind = comment.split(' ').next().unwrap();
            assert!(["HELP", "TYPE", "UNIT", "EOF"].contains(&kind), "unexpected comment: {line}");
            if kind == "TYPE" {
                typed.insert(comment.split(' ').nth(1).unwrap().to_owned());
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line}"));
        let name = series.split('{').next().unwrap();
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name: {line}"
        );
        if let Some(labels) = series.strip_prefix(name) {
            assert!(
                labels.is_empty() || (labels.starts_with('{') && labels.ends_with('}')),
                "bad labels: {line}"
            );
        }
        assert!(typed.iter().any(|t| name.starts_with(t.as_str())), "sample before its TYPE: {line}");
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value: {line}"));
        samples.insert(series.to_owned(), value);
    }
    samples
}

/// The samples `/metrics` at `addr` serves now, by `name{labels}`.
pub async fn metrics_of(addr: SocketAddr) -> std::collections::HashMap<String, f64> {
    parse_metrics(&scrape(addr).await.1)
}

/// Calls in flight on a replica run with one scrypt thread: `n` Verifies of
/// distinct wrong secrets for `key`'s prefix (one scrypt each), returned
/// once the replica's scrypt queue is not empty, so that they are provably
/// mid-work. Each answers NOT_FOUND unless the replica drops it.
pub async fn hold_cold_calls(
    replica: &Replica,
    key: &str,
    n: u32,
) -> Vec<JoinHandle<Result<tonic::Response<pb::VerifyResponse>, Status>>> {
    let client = KeyVerifyClient::new(connect(replica.addr).await);
    let calls = (0..n)
        .map(|v| {
            let (mut client, key) = (client.clone(), wrong_secret(key, v));
            tokio::spawn(async move { client.verify(pb::VerifyRequest { key, ..Default::default() }).await })
        })
        .collect();
    let metrics = replica.metrics.expect("the replica serves metrics");
    until("cold calls to wait for the replica's scrypt thread", || async move {
        (metrics_of(metrics).await["keywarden_scrypt_queue_depth"] >= 1.0).then_some(())
    })
    .await;
    calls
}

/// A Verify of `key` that requires `sales:read`.
pub fn sales(key: &str) -> pb::VerifyRequest {
    pb::VerifyRequest { key: key.to_owned(), required_scope: "sales:read".into(), ..Default::default() }
}

/// Revokes `key_id` of the test merchant, with no reason given.
pub async fn revoke(admin: &mut AdminClient, key_id: &str) {
    admin
        .revoke_key(pb::RevokeKeyRequest {
            merchant_id: MERCHANT.into(),
            key_id: key_id.into(),
            reason: String::new(),
        })
        .await
        .unwrap();
}

const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";

/// The test Redis (`KEYWARDEN_TEST_REDIS_URL`, default the machine's).
pub fn redis_url() -> String {
    std::env::var("KEYWARDEN_TEST_REDIS_URL").unwrap_or_else(|_| DEFAULT_REDIS_URL.to_owned())
}

/// A fleet secret of this test's own.
pub fn fleet_secret() -> String {
    format!("test-fleet-secret-{}", uuid::Uuid::now_v7().simple())
}

/// A `keywarden serve` process, the address it bound and its log lines.
/// Killed when dropped, so that a failing test leaves no process behind.
pub struct Replica {
    child: Child,
    pub addr: SocketAddr,
    /// Where its `/metrics` listens.
    pub metrics: Option<SocketAddr>,
    /// Its plaintext health listener, if configured.
    pub health: Option<SocketAddr>,
    pub logs: Arc<Mutex<Vec<String>>>,
}

impl Replica {
    pub fn logged(&self, needle: &str) -> bool {
        self.logged_times(needle) > 0
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Asks it to stop (SIGTERM).
    pub fn sigterm(&self) {
        sigterm(&self.child);
    }

    /// Kills it (SIGKILL) and waits for it to be gone.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Waits for it to exit, at most [`EXIT_WITHIN`]; one that hangs in
    /// shutdown is killed and fails the test instead of hanging the suite.
    pub async fn exited(mut self) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + EXIT_WITHIN;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "keywarden (pid {}) did not exit within {EXIT_WITHIN:?} of SIGTERM",
                self.child.id()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM, then [`Replica::exited`].
    pub async fn stop(self) -> std::process::ExitStatus {
        self.sigterm();
        self.exited().await
    }

    /// How many of its log lines contain `needle`.
    pub fn logged_times(&self, needle: &str) -> usize {
        self.logs.lock().unwrap().iter().filter(|l| l.contains(needle)).count()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Starts the real binary (JSON logs) and waits until it serves.
pub fn spawn_binary(database_url: &str, data_dir: &std::path::Path, extra: &[(&str, &str)]) -> Replica {
    let configured = [
        ("KEYWARDEN_DATABASE_URL", database_url),
        ("KEYWARDEN_PEPPER", PEPPER),
        ("KEYWARDEN_ADMIN_TOKEN", ADMIN_TOKEN),
    ];
    spawn_embedded(data_dir, &[&configured[..], extra].concat())
}

/// Starts the binary as the README's first command does: the embedded
/// database and generated secrets in `data_dir`, unless `env` says otherwise.
pub fn spawn_embedded(data_dir: &std::path::Path, env: &[(&str, &str)]) -> Replica {
    let mut child = Command::new(env!("CARGO_BIN_EXE_keywarden"))
        .arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("KEYWARDEN_LISTEN_ADDR", "127.0.0.1:0")
        .env("KEYWARDEN_METRICS_ADDR", "127.0.0.1:0")
        .env("KEYWARDEN_DATA_DIR", data_dir)
        .env("KEYWARDEN_LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn keywarden");
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let logs = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let kept = Arc::clone(&logs);
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            if line.contains("keywarden serving")
                && let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                && let Some(addr) = v["listen"].as_str().and_then(|a| a.parse::<SocketAddr>().ok())
            {
                // Absent when the metrics endpoint is off.
                let metrics = v["metrics"].as_str().and_then(|m| m.parse::<SocketAddr>().ok());
                let health = v["health_listen"].as_str().and_then(|m| m.parse::<SocketAddr>().ok());
                let _ = tx.send((addr, metrics, health));
            }
            eprintln!("[keywarden] {line}");
            kept.lock().unwrap().push(line);
        }
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok((addr, metrics, health)) => Replica { child, addr, metrics, health, logs },
        Err(_) => {
            let _ = child.kill();
            let status = child.wait().ok();
            let logs = logs.lock().unwrap();
            let last = &logs[logs.len().saturating_sub(5)..];
            panic!(
                "waited 30s for keywarden to announce its address; it ended with {status:?}, last lines: {last:#?}"
            );
        }
    }
}

pub fn sigterm(child: &Child) {
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
}

/// How long a replica may take to exit after SIGTERM: its drain grace
/// (10 s) plus its final flush (30 s), with room to spare.
pub const EXIT_WITHIN: Duration = Duration::from_secs(60);

/// Runs `command` to completion like `Command::output`, but for at most
/// `within`: one still running then (a server that accepted a setting it
/// should have refused) is killed and fails the test, naming `what`.
pub fn output_within(command: &mut Command, within: Duration, what: &str) -> std::process::Output {
    let mut child = command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn keywarden");
    let read = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            bytes
        })
    };
    let stdout = read(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = read(child.stderr.take().map(|p| Box::new(p) as _));
    let deadline = std::time::Instant::now() + within;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = String::from_utf8_lossy(&stderr.join().unwrap_or_default()).into_owned();
            panic!("waited {within:?} for {what}; killed it. Its stderr:\n{stderr}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    std::process::Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}

/// A TCP proxy that a test can cut (drop every connection and refuse new
/// ones) and restore, to simulate the database going away; or arm to cut
/// itself right after the database acknowledges a chosen transaction's
/// COMMIT ([`Proxy::cut_after_commit_of`]).
pub struct Proxy {
    pub addr: SocketAddr,
    cut: Arc<tokio::sync::watch::Sender<bool>>,
    trigger: Arc<Mutex<Option<Vec<u8>>>>,
    tripped: Arc<AtomicBool>,
    /// Connections whose startup carries this are held: bytes are read
    /// but not forwarded, and nothing is closed (half-open).
    stall: Arc<tokio::sync::watch::Sender<Option<Vec<u8>>>>,
    /// The armed cut also swallows the COMMIT's acknowledgement.
    lose_ack: Arc<AtomicBool>,
    /// Clients whose startup carries this are watched: when bytes last
    /// reached one is noted in `delivered`.
    watching: Arc<Mutex<Option<Vec<u8>>>>,
    delivered: Arc<Mutex<Option<std::time::Instant>>>,
    /// Every statement clients sent through the proxy, in order (the
    /// client must not use TLS).
    statements: Arc<Mutex<Vec<String>>>,
}

/// Waits while `stall` names a marker that `startup` carries.
async fn while_stalled(stall: &mut tokio::sync::watch::Receiver<Option<Vec<u8>>>, startup: &Mutex<Vec<u8>>) {
    loop {
        let held = stall.borrow_and_update().as_ref().is_some_and(|marker| {
            startup.lock().unwrap().windows(marker.len()).any(|w| w == marker.as_slice())
        });
        if !held || stall.changed().await.is_err() {
            return;
        }
    }
}

/// PostgreSQL's CommandComplete message for a COMMIT: 'C', length 11, "COMMIT\0".
const COMMIT_COMPLETE: &[u8] = b"C\0\0\0\x0bCOMMIT\0";

/// Whether `pattern` occurs in what a stream has carried so far, across
/// read boundaries (it keeps the last bytes of the previous chunk).
#[derive(Default)]
struct Scan {
    tail: Vec<u8>,
}

impl Scan {
    fn seen(&mut self, chunk: &[u8], pattern: &[u8]) -> bool {
        self.tail.extend_from_slice(chunk);
        let found = self.tail.windows(pattern.len()).any(|w| w == pattern);
        let keep = self.tail.len().saturating_sub(pattern.len().saturating_sub(1));
        self.tail.drain(..keep);
        found
    }
}

/// Reads PostgreSQL's frontend messages off one client's byte stream and
/// logs each statement it has executed: a simple query ('Q'), or an
/// Execute ('E') of a portal bound ('B') to a statement parsed ('P').
#[derive(Default)]
struct StatementLog {
    buf: Vec<u8>,
    started: bool,
    parsed: std::collections::HashMap<Vec<u8>, String>,
    bound: std::collections::HashMap<Vec<u8>, String>,
}

impl StatementLog {
    fn feed(&mut self, bytes: &[u8], log: &Mutex<Vec<String>>) {
        /// A NUL-terminated string at `at`, and where the next field starts.
        fn field(body: &[u8], at: usize) -> (&[u8], usize) {
            let rest = body.get(at..).unwrap_or_default();
            let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
            (&rest[..end], at + end + 1)
        }
        self.buf.extend_from_slice(bytes);
        loop {
            if !self.started {
                // A startup message has no type byte; an SSL or GSS request
                // (codes 80877103, 80877104) is followed by another one.
                let Some(len) = self.buf.get(..4).map(|b| u32::from_be_bytes(b.try_into().unwrap()) as usize)
                else {
                    return;
                };
                if self.buf.len() < len.max(8) {
                    return;
                }
                let code = u32::from_be_bytes(self.buf[4..8].try_into().unwrap());
                self.buf.drain(..len);
                self.started = !matches!(code, 80_877_103 | 80_877_104);
                continue;
            }
            let Some(len) = self.buf.get(1..5).map(|b| u32::from_be_bytes(b.try_into().unwrap()) as usize)
            else {
                return;
            };
            if self.buf.len() < 1 + len {
                return;
            }
            let message: Vec<u8> = self.buf.drain(..1 + len).collect();
            let (kind, body) = (message[0], &message[5..]);
            match kind {
                b'Q' => log.lock().unwrap().push(String::from_utf8_lossy(field(body, 0).0).into_owned()),
                b'P' => {
                    let (name, at) = field(body, 0);
                    let sql = String::from_utf8_lossy(field(body, at).0).into_owned();
                    self.parsed.insert(name.to_vec(), sql);
                }
                b'B' => {
                    let (portal, at) = field(body, 0);
                    let sql = self.parsed.get(field(body, at).0).cloned().unwrap_or_default();
                    self.bound.insert(portal.to_vec(), sql);
                }
                b'E' => {
                    let sql = self.bound.get(field(body, 0).0).cloned().unwrap_or_default();
                    log.lock().unwrap().push(sql);
                }
                _ => {}
            }
        }
    }
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (cut, watch) = tokio::sync::watch::channel(false);
        let cut = Arc::new(cut);
        let trigger: Arc<Mutex<Option<Vec<u8>>>> = Arc::default();
        let tripped = Arc::new(AtomicBool::new(false));
        let stall = Arc::new(tokio::sync::watch::Sender::new(None::<Vec<u8>>));
        let (cutter, armed, trip) = (Arc::clone(&cut), Arc::clone(&trigger), Arc::clone(&tripped));
        let lose_ack = Arc::new(AtomicBool::new(false));
        let losing = Arc::clone(&lose_ack);
        let staller = Arc::clone(&stall);
        let delivered: Arc<Mutex<Option<std::time::Instant>>> = Arc::default();
        let watching: Arc<Mutex<Option<Vec<u8>>>> = Arc::default();
        let (noted, watched) = (Arc::clone(&delivered), Arc::clone(&watching));
        let statements: Arc<Mutex<Vec<String>>> = Arc::default();
        let logged = Arc::clone(&statements);
        tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else { return };
                if *watch.borrow() {
                    drop(inbound);
                    continue;
                }
                let mut watch = watch.clone();
                let (cutter, armed, trip) = (Arc::clone(&cutter), Arc::clone(&armed), Arc::clone(&trip));
                let lose = Arc::clone(&losing);
                let (mut stall_up, mut stall_down) = (staller.subscribe(), staller.subscribe());
                let (watched, noted, logged) =
                    (Arc::clone(&watched), Arc::clone(&noted), Arc::clone(&logged));
                tokio::spawn(async move {
                    let Ok(outbound) = tokio::net::TcpStream::connect(upstream).await else { return };
                    let (mut from_client, mut to_client) = inbound.into_split();
                    let (mut from_server, mut to_server) = outbound.into_split();
                    // Whether this connection's transaction carried the marker.
                    let marked = Arc::new(AtomicBool::new(false));
                    // The first bytes the client sent (its startup message).
                    let startup: Arc<Mutex<Vec<u8>>> = Arc::default();
                    let up = {
                        let (armed, marked, startup) =
                            (Arc::clone(&armed), Arc::clone(&marked), Arc::clone(&startup));
                        async move {
                            let (mut buf, mut scan) = (vec![0u8; 16 * 1024], Scan::default());
                            let mut statements = StatementLog::default();
                            loop {
                                let n = from_client.read(&mut buf).await?;
                                if n == 0 {
                                    return Ok::<(), std::io::Error>(());
                                }
                                statements.feed(&buf[..n], &logged);
                                {
                                    let mut startup = startup.lock().unwrap();
                                    let room = 1024usize.saturating_sub(startup.len()).min(n);
                                    startup.extend_from_slice(&buf[..room]);
                                }
                                while_stalled(&mut stall_up, &startup).await;
                                let marker = armed.lock().unwrap().clone();
                                if marker.is_some_and(|m| scan.seen(&buf[..n], &m)) {
                                    marked.store(true, Ordering::SeqCst);
                                }
                                to_server.write_all(&buf[..n]).await?;
                            }
                        }
                    };
                    let down = async move {
                        let (mut buf, mut scan) = (vec![0u8; 16 * 1024], Scan::default());
                        loop {
                            let n = from_server.read(&mut buf).await?;
                            if n == 0 {
                                return Ok::<(), std::io::Error>(());
                            }
                            while_stalled(&mut stall_down, &startup).await;
                            let committed =
                                marked.load(Ordering::SeqCst) && scan.seen(&buf[..n], COMMIT_COMPLETE);
                            // Only the COMMIT that trips the cut is the one
                            // whose acknowledgement may be lost.
                            let tripping = committed && armed.lock().unwrap().take().is_some();
                            // Losing the acknowledgement: the COMMIT landed
                            // but its answer never reaches the client.
                            if !(tripping && lose.load(Ordering::SeqCst)) {
                                to_client.write_all(&buf[..n]).await?;
                                if watched.lock().unwrap().as_ref().is_some_and(|marker| {
                                    startup
                                        .lock()
                                        .unwrap()
                                        .windows(marker.len())
                                        .any(|w| w == marker.as_slice())
                                }) {
                                    *noted.lock().unwrap() = Some(std::time::Instant::now());
                                }
                            }
                            if tripping {
                                trip.store(true, Ordering::SeqCst);
                                cutter.send_replace(true);
                                // This connection closes now, whether or not
                                // its task sees the cut before a restore.
                                return Ok(());
                            }
                        }
                    };
                    tokio::select! {
                        _ = up => {}
                        _ = down => {}
                        _ = watch.wait_for(|cut| *cut) => {}
                    }
                });
            }
        });
        Self { addr, cut, trigger, tripped, stall, lose_ack, watching, delivered, statements }
    }

    /// Starts noting when bytes reach clients whose startup carries
    /// `marker`, without holding anything yet (see
    /// [`Proxy::last_delivered`]).
    pub fn watch_connections_carrying(&self, marker: &[u8]) {
        *self.watching.lock().unwrap() = Some(marker.to_vec());
        *self.delivered.lock().unwrap() = None;
    }

    /// Every statement sent through the proxy so far.
    pub fn statements(&self) -> Vec<String> {
        self.statements.lock().unwrap().clone()
    }

    /// When bytes last reached a watched client.
    pub fn last_delivered(&self) -> Option<std::time::Instant> {
        *self.delivered.lock().unwrap()
    }

    /// Holds every connection, open or future, whose startup message
    /// carries `marker` (e.g. an application name): its bytes stop flowing
    /// both ways, and nothing is closed. The client must not use TLS.
    pub fn stall_connections_carrying(&self, marker: &[u8]) {
        self.stall.send_replace(Some(marker.to_vec()));
    }

    /// Lets stalled connections flow again.
    pub fn unstall(&self) {
        self.stall.send_replace(None);
    }

    /// Arms a cut for right after the database acknowledges the COMMIT of
    /// the first transaction whose statements carry `marker` (e.g. a bind
    /// parameter's text): that commit lands, nothing after it does. The
    /// proxy reads the protocol, so the client must not use TLS
    /// (`sslmode=disable`).
    pub fn cut_after_commit_of(&self, marker: &[u8]) {
        self.lose_ack.store(false, Ordering::SeqCst);
        self.tripped.store(false, Ordering::SeqCst);
        *self.trigger.lock().unwrap() = Some(marker.to_vec());
    }

    /// As [`Proxy::cut_after_commit_of`], but the client never receives
    /// the acknowledgement: the commit landed, and the client cannot know.
    pub fn cut_before_acknowledging_commit_of(&self, marker: &[u8]) {
        self.cut_after_commit_of(marker);
        self.lose_ack.store(true, Ordering::SeqCst);
    }

    /// Whether an armed cut went off.
    pub fn tripped(&self) -> bool {
        self.tripped.load(Ordering::SeqCst)
    }

    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    pub fn restore(&self) {
        self.cut.send_replace(false);
    }

    /// The server a PostgreSQL URL names (default port 5432), to proxy.
    pub fn upstream_of(url: &str) -> SocketAddr {
        let options: sea_orm::sqlx::postgres::PgConnectOptions = url.parse().expect("a PostgreSQL URL");
        let upstream = (options.get_host(), options.get_port());
        std::net::ToSocketAddrs::to_socket_addrs(&upstream).unwrap().next().unwrap()
    }

    /// The server a `redis://` URL names (default port 6379), to proxy.
    pub fn upstream_of_redis(url: &str) -> SocketAddr {
        let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
        let authority = rest.split('/').next().unwrap_or(rest);
        let host = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
        let host = if host.contains(':') { host.to_owned() } else { format!("{host}:6379") };
        std::net::ToSocketAddrs::to_socket_addrs(&host).unwrap().next().unwrap()
    }

    /// `url` with its host and port replaced by the proxy's.
    pub fn url_for(&self, url: &str) -> String {
        let (scheme, rest) = url.split_once("://").unwrap();
        let (authority, path) = rest.split_once('/').unwrap();
        let userinfo = authority.rsplit_once('@').map(|(u, _)| format!("{u}@")).unwrap_or_default();
        format!("{scheme}://{userinfo}{}/{path}", self.addr)
    }
}

/// Runs the `keywarden` command line against `app` as the bootstrap admin;
/// fails the test unless it succeeds. Returns stdout and stderr.
pub fn cli(app: &TestApp, args: &[&str]) -> (String, String) {
    let output = output_within(
        std::process::Command::new(env!("CARGO_BIN_EXE_keywarden"))
            .args(args)
            .env("KEYWARDEN_SERVER", format!("http://{}", app.addr))
            .env("KEYWARDEN_ADMIN_TOKEN", ADMIN_TOKEN),
        CLI_WITHIN,
        &format!("keywarden {args:?} to finish"),
    );
    let (stdout, stderr) =
        (String::from_utf8(output.stdout).unwrap(), String::from_utf8(output.stderr).unwrap());
    assert!(output.status.success(), "keywarden {args:?} failed:\n{stderr}");
    (stdout, stderr)
}

/// How long one command-line call may take.
pub const CLI_WITHIN: Duration = Duration::from_secs(60);

/// `stdout` as one JSON document.
pub fn json(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}
