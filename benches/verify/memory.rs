//! Memory and scrypt cost: the cache's footprint in a fresh process and
//! the raw hash time the cold target is priced against.

use super::*;

/// Single-thread scrypt time over `n` runs, in seconds per hash.
pub(super) fn scrypt_seconds(n: u32) -> f64 {
    let hasher = KeyHasher::from_base64(PEPPER).unwrap();
    let key = PlainKey::generate(&KeyPrefix::default()).unwrap();
    let hash = hasher.hash(&key).unwrap();
    let start = Instant::now();
    for _ in 0..n {
        assert_eq!(hasher.verify(&key, &hash), Ok(true));
    }
    start.elapsed().as_secs_f64() / f64::from(n)
}

pub(super) fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// Fills the cache with `n` keys shaped like real ones (UUID ids, a cuid
/// merchant, a short name, one CIDR, two scopes) via identify + state fill.
pub(super) async fn seed(cache: &keywarden::cache::VerifyCache, n: usize) {
    use keywarden::{
        keys::KeyState,
        keys::{AllowList, Policy, ScopeCatalogue},
    };
    let catalogue = ScopeCatalogue::default();
    let scopes = catalogue.expand(catalogue.parse_grant(&["sales:read", "invoice:read"]).unwrap());
    for i in 0..n {
        let key = PlainKey::generate(&KeyPrefix::default()).unwrap();
        let id: Arc<str> = Arc::from(uuid::Uuid::now_v7().to_string());
        let state = Arc::new(KeyState {
            key_id: Arc::clone(&id),
            merchant_id: MERCHANT.to_owned(),
            name: format!("bench key {i}"),
            policy: Policy {
                revoked_at: None,
                expires_at: None,
                disabled: false,
                allowed: AllowList::parse(&["192.168.0.0/16"]).unwrap(),
                scopes,
            },
            rate_limits: Default::default(),
            credits: None,
            metadata: Default::default(),
            version: 1,
        });
        cache
            .identify_once(cache.digest(&key), async { Ok::<_, Unreachable>(Arc::clone(&id)) })
            .await
            .unwrap();
        cache.fill_state(cache.epoch(), state);
    }
}

// -------------------------------------------------------------------- report

/// The memory figure, read in a process of its own: a server started idle
/// on SQLite, its RSS, then 100k keys through the cache's fill path, its
/// RSS again. Prints `rss-probe <idle KiB> <filled KiB>`.
pub(super) fn rss_probe() {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("rss.db").display());
    let server = start_server(&runtime, &url, dir.path(), true, 0, |_| {});
    std::thread::sleep(Duration::from_millis(500));
    let idle = rss_kib();
    let cache = server.probes.as_ref().and_then(|p| p.cache.clone()).expect("the cache is on");
    runtime.block_on(seed(&cache, 100_000));
    println!("rss-probe {idle} {}", rss_kib());
}

/// Runs [`rss_probe`] in a child process: RSS read at the end of the load
/// run moved with what the allocator kept from it (+41.6 to +64.3 MiB for
/// the same cache in runs on one day).
pub(super) fn probe_rss() -> Option<(f64, f64)> {
    let exe = std::env::current_exe().ok()?;
    let out = std::process::Command::new(exe).arg("--rss-probe").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.starts_with("rss-probe "))?;
    let mut kib = line.split_whitespace().skip(1).map(|v| v.parse::<f64>().ok());
    Some((kib.next()?? / 1024.0, kib.next()?? / 1024.0))
}

/// The error type of a pre-warming identification that always succeeds.
#[derive(Debug)]
pub(super) struct Unreachable;

impl keywarden::cache::IdentifyError for Unreachable {
    fn unknown_key(_: keywarden::cache::Owner) -> Self {
        Self
    }
    fn unknown_owner(&self) -> Option<keywarden::cache::Owner> {
        None
    }
}
