//! The command line (see the program's own documentation).

use super::*;

#[derive(Debug, Clone)]
pub(super) struct Args {
    pub(super) duration: Duration,
    pub(super) connections: usize,
    pub(super) concurrency: usize,
    pub(super) keys: usize,
    pub(super) postgres: Option<String>,
    pub(super) rounds: usize,
    /// scrypt threads of the servers (default: one per core).
    pub(super) hash_workers: usize,
    /// Only drive this one scenario, sustained, for the duration (for a
    /// profiler: the same scenario under the same client as the full run).
    pub(super) profile: Option<String>,
    pub(super) target: Option<SocketAddr>,
    pub(super) token: String,
    /// Internal: be the fresh process whose RSS the memory figure reads.
    pub(super) rss_probe: bool,
    /// Skip the TLS and mTLS replicas (they share the database, and their
    /// audit writes with it).
    pub(super) no_tls: bool,
    /// The fleet tier's Redis for the warm-start figures; `None` skips them.
    pub(super) redis: Option<String>,
    /// NATS JetStream for the lifecycle-event figures; `None` skips NATS.
    pub(super) nats: Option<String>,
    /// Lifecycle events delivered in the events area; 0 skips it.
    pub(super) events: usize,
    /// Live keys in one leak report; 0 skips the leak-report area.
    pub(super) leaks: usize,
    /// Only time this many CreateKey calls on `--target`.
    pub(super) create_keys: Option<usize>,
}

pub(super) fn parse_args() -> Args {
    let mut args = Args {
        duration: Duration::from_secs(10),
        connections: 4,
        concurrency: 64,
        keys: 1000,
        postgres: None,
        rounds: 5,
        hash_workers: 0,
        profile: None,
        target: None,
        token: TOKEN.into(),
        rss_probe: false,
        no_tls: false,
        redis: Some("redis://127.0.0.1:6379".into()),
        nats: Some("nats://127.0.0.1:4222".into()),
        events: 10_000,
        leaks: 100,
        create_keys: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--duration" => args.duration = Duration::from_secs_f64(value().parse().unwrap()),
            "--connections" => args.connections = value().parse().unwrap(),
            "--concurrency" => args.concurrency = value().parse().unwrap(),
            "--keys" => args.keys = value().parse().unwrap(),
            "--postgres" => args.postgres = Some(value()),
            "--target" => args.target = Some(value().parse().unwrap()),
            "--token" => args.token = value(),
            "--rounds" => args.rounds = value().parse().unwrap(),
            "--hash-workers" => args.hash_workers = value().parse().unwrap(),
            "--profile" => args.profile = Some(value()),
            "--rss-probe" => args.rss_probe = true,
            "--no-tls" => args.no_tls = true,
            "--redis" => args.redis = Some(value()),
            "--no-redis" => args.redis = None,
            "--nats" => args.nats = Some(value()),
            "--no-nats" => args.nats = None,
            "--events" => args.events = value().parse().unwrap(),
            "--leaks" => args.leaks = value().parse().unwrap(),
            "--create-keys" => args.create_keys = Some(value().parse().unwrap()),
            "--db-acquire-timeout-ms" => {
                let _ = DB_ACQUIRE_TIMEOUT_MS.set(value().parse().unwrap());
            }
            // The older spelling of `--profile allow`.
            "--profile-warm" => args.profile = Some("allow".into()),
            // cargo bench passes --bench to harness-less benchmarks.
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    args
}

// ---------------------------------------------------------------- the server
