//! The servers under test, started in-process on their own runtime, and
//! the keys they verify.

use super::*;

pub(super) const PEPPER: &str = "KioqKioqKioqKioqKioqKioqKioqKioqKioqKioqKio=";

pub(super) const TOKEN: &str = "bench-admin-token-0123456789abcdef";

pub(super) const MERCHANT: &str = "cmm3zkkx000006ogg8arp52qb";

/// `--db-acquire-timeout-ms`: the servers' wait for a pooled connection.
/// Under an instrumenting profiler everything runs tens of times slower,
/// and the default wait (a wall-clock bound) turns slowness into refusals.
pub(super) static DB_ACQUIRE_TIMEOUT_MS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();

pub(super) struct Server {
    pub(super) addr: SocketAddr,
    pub(super) probes: Option<Probes>,
    /// GitHub's leak reports, when the settings ask for the listener.
    pub(super) leak_addr: Option<SocketAddr>,
}

pub(super) fn start_server(
    runtime: &tokio::runtime::Runtime,
    database_url: &str,
    dir: &std::path::Path,
    cache: bool,
    hash_workers: usize,
    customise: impl FnOnce(&mut Settings),
) -> Server {
    let mut settings = bench_settings(database_url, dir, cache, hash_workers);
    customise(&mut settings);
    runtime.block_on(start_server_from(runtime.handle(), settings))
}

/// Builds and runs a server on the server's runtime; callable from the
/// client's.
pub(super) async fn start_server_from(runtime: &tokio::runtime::Handle, settings: Settings) -> Server {
    runtime
        .spawn(async move {
            let app = Application::build(settings).await.expect("server builds");
            let (addr, probes, leak_addr) = (app.local_addr(), app.probes(), app.leak_report_addr());
            tokio::spawn(app.run_until_stopped(std::future::pending()));
            Server { addr, probes: Some(probes), leak_addr }
        })
        .await
        .expect("server starts")
}

/// A server's settings. Each server gets a data directory of its own under
/// `dir` (the spool's lock refuses a shared one); a SQLite database stays
/// where `database_url` points.
pub(super) fn bench_settings(
    database_url: &str,
    dir: &std::path::Path,
    cache: bool,
    hash_workers: usize,
) -> Settings {
    static SERVERS: AtomicUsize = AtomicUsize::new(0);
    let own = dir.join(format!("server-{}", SERVERS.fetch_add(1, Ordering::Relaxed)));
    std::fs::create_dir_all(&own).unwrap();
    let mut settings = Settings {
        listen_addr: "127.0.0.1:0".parse().unwrap(),
        metrics_enabled: false,
        data_dir: own,
        database_url: Some(database_url.to_owned()),
        pepper: Some(SecretString::from(PEPPER)),
        cache_enabled: cache,
        hash_workers,
        ..Settings::default()
    };
    if let Some(ms) = DB_ACQUIRE_TIMEOUT_MS.get() {
        settings.db_acquire_timeout_ms = *ms;
    }
    settings.admin_tokens.insert("admin".into(), SecretString::from(TOKEN));
    settings
}

pub(super) fn bench_database_name() -> String {
    format!("kw_bench_{}", std::process::id())
}

pub(super) async fn drop_postgres(admin_url: &str) {
    support::drop_postgres(admin_url, &bench_database_name()).await;
}

pub(super) async fn fresh_postgres(admin_url: &str) -> String {
    support::create_postgres(admin_url, &bench_database_name()).await
}

// ------------------------------------------------------------ load generation

pub(super) async fn create_keys(
    addr: SocketAddr,
    token: &str,
    n: usize,
    cidrs: &[&str],
    rate_limits: &[pb::RateLimit],
    credits: Option<pb::Credits>,
) -> Vec<String> {
    let channel = Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let bearer: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
    let sem = Arc::new(tokio::sync::Semaphore::new(8));
    let mut tasks = Vec::new();
    for i in 0..n {
        let mut admin = KeyAdminClient::new(channel.clone());
        let bearer = bearer.clone();
        let sem = Arc::clone(&sem);
        let cidrs: Vec<String> = cidrs.iter().map(|c| (*c).to_owned()).collect();
        let rate_limits = rate_limits.to_vec();
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire().await.unwrap();
            let mut request = Request::new(pb::CreateKeyRequest {
                merchant_id: MERCHANT.into(),
                name: format!("bench key {i}"),
                scopes: vec!["sales:read".into(), "invoice:read".into()],
                allowed_cidrs: cidrs,
                rate_limits,
                credits,
                ..Default::default()
            });
            request.metadata_mut().insert("authorization", bearer);
            admin.create_key(request).await.unwrap().into_inner().plaintext_key
        }));
    }
    let mut keys = Vec::new();
    for t in tasks {
        keys.push(t.await.unwrap());
    }
    keys
}

/// Whether a Redis answers at `url` (the warm-start figures need one).
pub(super) fn redis_answers(url: &str) -> bool {
    redis::Client::open(url)
        .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(1)))
        .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
        .is_ok()
}
