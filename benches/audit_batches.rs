//! The audit writer's cost per row, by batch size, through keywarden's own
//! store: what a Verify's audit row costs the database on the embedded
//! backend, where the writer shares the service's cores.
//!
//! For each batch size, a fresh SQLite database (or PostgreSQL, with
//! `--postgres`) receives the same number of rows, shaped like warm Verify
//! ALLOW rows spread over `--keys` keys, through `Store::insert_audit_batch`
//! one batch at a time. It prints rows per second and the process's CPU
//! time per row (user + system, from /proc: less disturbed by a noisy
//! neighbour than wall time). Under `valgrind --tool=callgrind` the
//! instructions divided by the rows give a repeatable figure.
//!
//! ```text
//! cargo bench --bench audit_batches -- [--sizes 100,300,1000,4000] [--rows 200000]
//!     [--keys 1000] [--prefill 0] [--postgres postgres://postgres@127.0.0.1:5432/test]
//! ```
//!
//! `--prefill N` writes N rows (same keys, untimed) before the clock
//! starts: a table that already holds a few days of audit trail, whose
//! per-key index no longer fits a batch's rows into a few pages, costs
//! more per row than a fresh one.
//!
//! The batch sizes a running server writes depend on load: at most
//! `audit_batch_size` (16000) when saturated, what arrives within
//! `audit_linger_ms` (50 ms) otherwise.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout, clippy::print_stderr)]
// A load generator stamps its rows with the real clock.
#![allow(clippy::disallowed_methods)]

mod support;

use std::time::Instant;

use chrono::Utc;
use keywarden::{
    audit::{AuditKind, AuditRecord},
    keys::Decision,
    store::{Store, StoreOptions},
};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Args {
    sizes: Vec<usize>,
    rows: usize,
    keys: usize,
    prefill: usize,
    postgres: Option<String>,
}

fn parse_args() -> Args {
    let mut args =
        Args { sizes: vec![100, 300, 1000, 4000], rows: 200_000, keys: 1000, prefill: 0, postgres: None };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--sizes" => args.sizes = value().split(',').map(|s| s.parse().unwrap()).collect(),
            "--rows" => args.rows = value().parse().unwrap(),
            "--keys" => args.keys = value().parse().unwrap(),
            "--prefill" => args.prefill = value().parse().unwrap(),
            "--postgres" => args.postgres = Some(value()),
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    args
}

/// User + system CPU seconds of this process so far.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // Fields after the parenthesised command name; utime and stime are the
    // 12th and 13th of them, in clock ticks (100 per second on Linux).
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}

fn row(i: usize, keys: usize) -> AuditRecord {
    let k = i % keys;
    AuditRecord {
        merchant_id: Some("cmm3zkkx000006ogg8arp52qb".into()),
        api_key_id: Some(format!("01a2211c-0675-74b0-be02-{k:012x}")),
        api_key_name: Some(format!("bench key {k}")),
        key_prefix: Some(format!("sntr_{k:011}")),
        endpoint: Some("/v1/sales".into()),
        method: Some("GET".into()),
        ip: Some(std::net::IpAddr::from([10, 1, 2, 3])),
        decision: Some(Decision::Allow),
        ..AuditRecord::new(AuditKind::Verify, Utc::now(), None)
    }
}

async fn fresh_store(args: &Args, dir: &std::path::Path, n: usize) -> (Store, Option<String>) {
    let (url, pg_name) = match &args.postgres {
        Some(admin_url) => {
            let name = format!("kw_audit_bench_{}_{n}", std::process::id());
            (support::create_postgres(admin_url, &name).await, Some(name))
        }
        None => (format!("sqlite://{}?mode=rwc", dir.join(format!("audit-{n}.db")).display()), None),
    };
    let store = Store::connect(&url, &StoreOptions::default()).await.unwrap();
    store.migrate().await.unwrap();
    (store, pg_name)
}

fn main() {
    let args = parse_args();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    println!(
        "backend: {}; {} rows per batch size over {} keys, into a table of {} rows",
        if args.postgres.is_some() { "postgresql" } else { "sqlite" },
        args.rows,
        args.keys,
        args.prefill
    );
    println!();
    println!("| rows per batch | statements | rows/s | CPU µs per row |");
    println!("|---:|---:|---:|---:|");
    runtime.block_on(async {
        for &size in &args.sizes {
            let (store, pg_name) = fresh_store(&args, dir.path(), size).await;
            for start in (0..args.prefill).step_by(20_000) {
                let batch: Vec<AuditRecord> =
                    (start..args.prefill.min(start + 20_000)).map(|i| row(i, args.keys)).collect();
                store.insert_audit_batch(&batch).await.unwrap();
            }
            // Rows are built before the clock starts: only the store's work counts.
            let batches: Vec<Vec<AuditRecord>> = (0..args.rows)
                .collect::<Vec<_>>()
                .chunks(size.max(1))
                .map(|c| c.iter().map(|i| row(*i, args.keys)).collect())
                .collect();
            let statements = store.statements();
            let (cpu, wall) = (cpu_seconds(), Instant::now());
            for batch in &batches {
                store.insert_audit_batch(batch).await.unwrap();
            }
            let (cpu, wall) = (cpu_seconds() - cpu, wall.elapsed().as_secs_f64());
            println!(
                "| {size} | {} | {:.0} | {:.2} |",
                store.statements() - statements,
                args.rows as f64 / wall,
                cpu * 1e6 / args.rows as f64
            );
            drop(store);
            if let (Some(admin_url), Some(name)) = (&args.postgres, pg_name) {
                support::drop_postgres(admin_url, &name).await;
            }
        }
    });
}
