//! The fleet tier: how far Redis-mode rate limits overshoot an exact bucket.

use super::*;

/// What a burst against one fleet-wide limit admitted.
pub(super) struct Overshoot {
    pub(super) limit: u32,
    pub(super) window_s: u64,
    pub(super) admitted: u64,
    /// What one exact bucket, full at the start, admits over the burst.
    pub(super) exact: u64,
    /// The documented bound on the difference: N × lease size.
    pub(super) bound: u64,
    pub(super) seconds: f64,
}

/// The worst case of leasing, measured: each replica takes a lease of a
/// key's tokens with one call, the shared bucket refills behind them, then
/// a burst spread over the replicas spends both the bucket and the leases.
pub(super) async fn overshoot(servers: &[Server], token: &str) -> Overshoot {
    let (limit, window_s) = (1_600u32, 16u64);
    let per = pb::RateLimit {
        name: "burst".into(),
        limit,
        window: Some(prost_types::Duration { seconds: window_s as i64, nanos: 0 }),
    };
    let key = create_keys(servers[0].addr, token, 1, &[], &[per], None).await.remove(0);
    let mut clients = Vec::new();
    for server in servers {
        clients.push(connect(server.addr, 1).await.remove(0).verify);
    }
    let request =
        || pb::VerifyRequest { key: key.clone(), required_scope: "sales:read".into(), ..Default::default() };
    for client in &mut clients {
        client.verify(request()).await.unwrap();
    }
    // Long enough for the shared bucket to refill what was leased, well
    // within the leases' own window.
    let leased = u64::from(lease_size(limit)) * servers.len() as u64;
    tokio::time::sleep(Duration::from_millis(leased * window_s * 1_000 / u64::from(limit) + 1_000)).await;

    let (next, admitted) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let calls = 3 * limit as usize;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..48 {
        let mut client = clients[worker % clients.len()].clone();
        let (next, admitted, request) = (Arc::clone(&next), Arc::clone(&admitted), request());
        tasks.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < calls {
                let r = client.verify(request.clone()).await.unwrap().into_inner();
                if r.decision == pb::Decision::Allow as i32 {
                    admitted.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let seconds = started.elapsed().as_secs_f64();
    Overshoot {
        limit,
        window_s,
        admitted: admitted.load(Ordering::Relaxed) as u64,
        exact: u64::from(limit) + (seconds * f64::from(limit) / window_s as f64).floor() as u64,
        bound: leased,
        seconds,
    }
}

/// What checking a rate limit and paying from a balance cost: per replica
/// on the main server, and fleet-wide on a Redis-mode replica (connection
/// set `redis_set`) when Redis answers.
pub(super) fn fleet_scenarios(
    limited: &Arc<Vec<String>>,
    metered: &Arc<Vec<String>>,
    redis_set: Option<usize>,
) -> Vec<Scenario> {
    let allow = |keys| verify(keys, "sales:read", "10.1.2.3");
    let mut scenarios = vec![
        Scenario::new("warm Verify ALLOW, rate-limited keys (local)", "allow-limited", allow(limited), 0),
        Scenario::new("warm Verify ALLOW, keys with credits (local)", "allow-metered", allow(metered), 0),
    ];
    if let Some(set) = redis_set {
        scenarios.push(Scenario::new(
            "warm Verify ALLOW, rate-limited keys (Redis)",
            "allow-limited-redis",
            allow(limited),
            set,
        ));
        scenarios.push(Scenario::new(
            "warm Verify ALLOW, keys with credits (Redis)",
            "allow-metered-redis",
            allow(metered),
            set,
        ));
    }
    scenarios
}

/// A fleet run's servers: where fresh replicas start and what they share.
pub(super) struct FleetRun<'a> {
    pub(super) runtime: &'a tokio::runtime::Handle,
    pub(super) url: &'a str,
    pub(super) dir: &'a std::path::Path,
    pub(super) hash_workers: usize,
    pub(super) redis: &'a str,
    pub(super) secret: &'a str,
}

/// Warm start: a fresh replica's first Verify of every key the main server
/// verified and published (`known` of them), against a fresh replica
/// without Redis, whose first calls wait for scrypt; prints its targets.
pub(super) async fn warm_start(fleet: &FleetRun<'_>, probes: Option<&Probes>, keys: &[String], known: u64) {
    let FleetRun { runtime, url, dir, hash_workers, redis, secret } = *fleet;
    let published = || probes.map_or(0, |p| p.metrics.warm_start_published.get());
    let t = Instant::now();
    while published() < known && t.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let fresh_settings = |with_redis: bool| {
        let mut s = bench_settings(url, dir, true, hash_workers);
        if with_redis {
            s.redis_url = Some(redis.to_owned().into());
            s.fleet_secret = Some(secret.to_owned().into());
        }
        s
    };
    let in_flight = 16;
    let fresh = start_server_from(runtime, fresh_settings(true)).await;
    let first = first_verifies(fresh.addr, keys, in_flight).await;
    let fresh_probes = fresh.probes.as_ref().expect("own server");
    let (runs, hits) = (fresh_probes.pool.runs(), fresh_probes.metrics.warm_start_hits.get());
    // The floor under that: the same calls again on the same replica,
    // now answered from its cache, at the same concurrency.
    let cached = first_verifies(fresh.addr, keys, in_flight).await;
    // The path's own latency: another fresh replica, one call at a
    // time, so that no call waits behind another.
    let alone = start_server_from(runtime, fresh_settings(true)).await;
    let one_by_one = first_verifies(alone.addr, keys, 1).await;
    let plain = start_server_from(runtime, fresh_settings(false)).await;
    let control = first_verifies(plain.addr, &keys[..keys.len().min(100)], in_flight).await;
    println!(
        "| warm start: a fresh replica's first Verify of {} known keys, p99 ≤ 5 ms | p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({in_flight} in flight, {:.0} calls/s; {published} published; errors {:?}) | {} |",
        keys.len(),
        first.percentile(0.5),
        first.percentile(0.99),
        first.max(),
        first.throughput(),
        first.errors,
        verdict(first.percentile(0.99) <= 5.0 && first.errors.is_empty()),
        published = published(),
    );
    println!(
        "| warm start: the same, one call at a time, p99 ≤ 5 ms | p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({:.0} calls/s; errors {:?}) | {} |",
        one_by_one.percentile(0.5),
        one_by_one.percentile(0.99),
        one_by_one.max(),
        one_by_one.throughput(),
        one_by_one.errors,
        verdict(one_by_one.percentile(0.99) <= 5.0 && one_by_one.errors.is_empty()),
    );
    println!(
        "| (control) the same replica's second Verify of each key, from its cache, {in_flight} in flight | p50 {:.2} ms, p99 {:.2} ms ({:.0} calls/s) | - |",
        cached.percentile(0.5),
        cached.percentile(0.99),
        cached.throughput(),
    );
    println!(
        "| warm start: scrypt runs on the fresh replica = 0 | {runs} ({hits} warm-start hits) | {} |",
        verdict(runs == 0)
    );
    println!(
        "| (control) without Redis: first Verify of {} keys through the scrypt queue | p50 {:.1} ms, p99 {:.1} ms ({in_flight} in flight) | - |",
        control.calls,
        control.percentile(0.5),
        control.percentile(0.99),
    );
}
