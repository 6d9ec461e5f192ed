//! The load: connections, what a call is ([`Load`]), closed- and fixed-rate
//! loops, what they measured ([`Outcome`]), and the report's rows.

use super::*;

#[derive(Clone)]
pub(super) struct Connection {
    pub(super) health: HealthClient<Channel>,
    pub(super) verify: KeyVerifyClient<Channel>,
    pub(super) check: AuthorizationClient<Channel>,
}

/// What a scenario sends.
pub(super) enum Load {
    /// grpc.health.v1.Health/Check: the no-op floor.
    Health,
    /// Envoy's ext_authz Check for the sales route, one of `keys` per call.
    Check(Arc<Vec<String>>),
    /// Verify requests drawn from a weighted mix of (weight, keys, scope, ip).
    Verify { mix: Vec<(u32, Arc<Vec<String>>, &'static str, &'static str)>, total_weight: u32 },
}

impl Load {
    pub(super) fn verify(mix: Vec<(u32, Arc<Vec<String>>, &'static str, &'static str)>) -> Arc<Self> {
        let total_weight = mix.iter().map(|m| m.0).sum();
        Arc::new(Self::Verify { mix, total_weight })
    }

    /// Call `i` of a fixed, well-spread sequence: the same for every run.
    pub(super) fn pick(&self, i: usize) -> Option<(usize, &str, &'static str, &'static str)> {
        let Self::Verify { mix, total_weight } = self else { return None };
        let spread = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut w = (spread >> 33) as u32 % total_weight;
        for (class, (weight, keys, scope, ip)) in mix.iter().enumerate() {
            if w < *weight {
                // Independent of the class choice, so every class walks its keys.
                let k = ((i as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93) >> 16) as usize % keys.len();
                return Some((class, &keys[k], scope, ip));
            }
            w -= weight;
        }
        None
    }

    pub(super) fn class(&self, i: usize) -> usize {
        self.pick(i).map_or(0, |p| p.0)
    }

    pub(super) fn classes(&self) -> usize {
        match self {
            Self::Health | Self::Check(_) => 1,
            Self::Verify { mix, .. } => mix.len(),
        }
    }

    pub(super) async fn call(&self, conn: &Connection, i: usize) -> Result<(), tonic::Code> {
        if let Self::Check(keys) = self {
            let mut client = conn.check.clone();
            return client
                .check(check_request(&keys[i % keys.len()]))
                .await
                .map(|_| ())
                .map_err(|s| s.code());
        }
        match self.pick(i) {
            None => {
                let mut client = conn.health.clone();
                client
                    .check(HealthCheckRequest { service: String::new() })
                    .await
                    .map(|_| ())
                    .map_err(|s| s.code())
            }
            Some((_, key, scope, ip)) => {
                let mut client = conn.verify.clone();
                client
                    .verify(pb::VerifyRequest {
                        key: key.to_owned(),
                        ip: ip.into(),
                        required_scope: scope.into(),
                        endpoint: "/public/api/v1/invoices".into(),
                        method: "POST".into(),
                        cost: 0,
                    })
                    .await
                    .map(|_| ())
                    .map_err(|s| s.code())
            }
        }
    }
}

#[derive(Debug, Default, Clone)]
pub(super) struct Outcome {
    pub(super) calls: usize,
    pub(super) errors: BTreeMap<String, usize>,
    /// Microseconds, sorted once merged.
    pub(super) latencies: Vec<u32>,
    pub(super) seconds: f64,
}

impl Outcome {
    pub(super) fn throughput(&self) -> f64 {
        self.calls as f64 / self.seconds
    }

    pub(super) fn percentile(&self, p: f64) -> f64 {
        if self.latencies.is_empty() {
            return f64::NAN;
        }
        let i = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
        f64::from(self.latencies[i]) / 1000.0
    }

    pub(super) fn max(&self) -> f64 {
        self.latencies.last().map_or(f64::NAN, |&m| f64::from(m) / 1000.0)
    }

    pub(super) fn absorb(&mut self, other: Outcome) {
        self.calls += other.calls;
        self.seconds += other.seconds;
        self.latencies.extend(other.latencies);
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
    }

    pub(super) fn finish(mut self) -> Self {
        self.latencies.sort_unstable();
        self
    }
}

pub(super) fn record(out: &mut Outcome, result: Result<(), tonic::Code>, latency: Duration) {
    match result {
        Ok(()) => {
            out.calls += 1;
            out.latencies.push(u32::try_from(latency.as_micros()).unwrap_or(u32::MAX));
        }
        Err(code) => *out.errors.entry(format!("{code:?}")).or_default() += 1,
    }
}

/// One closed-loop slice: `concurrency` workers spread over the connections,
/// each sending its next request as soon as the previous one is answered.
pub(super) async fn closed_loop(
    conns: &[Connection],
    load: &Arc<Load>,
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
) -> Outcome {
    let measure_from = Instant::now() + warmup;
    let stop_at = measure_from + duration;
    let counter = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for w in 0..concurrency {
        let conn = conns[w % conns.len()].clone();
        let (load, counter) = (Arc::clone(load), Arc::clone(&counter));
        workers.push(tokio::spawn(async move {
            let mut out = Outcome::default();
            loop {
                let i = counter.fetch_add(1, Ordering::Relaxed);
                let sent = Instant::now();
                if sent >= stop_at {
                    return out;
                }
                let result = load.call(&conn, i).await;
                if sent >= measure_from {
                    record(&mut out, result, sent.elapsed());
                }
            }
        }));
    }
    let mut all = Outcome::default();
    for w in workers {
        all.absorb(w.await.unwrap());
    }
    all.seconds = duration.as_secs_f64();
    all
}

/// One open-loop slice at a fixed rate, latency measured from each request's
/// scheduled time (so a stall is not hidden by sending less). One outcome per
/// class of the load's mix.
pub(super) async fn fixed_rate(
    conns: &[Connection],
    load: &Arc<Load>,
    rate: f64,
    warmup: Duration,
    duration: Duration,
) -> Vec<Outcome> {
    let start = tokio::time::Instant::now();
    let total = (rate * (warmup + duration).as_secs_f64()) as usize;
    let warm = (rate * warmup.as_secs_f64()) as usize;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for i in 0..total {
        let due = start + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(due).await;
        let conn = conns[i % conns.len()].clone();
        let (load, tx) = (Arc::clone(load), tx.clone());
        tokio::spawn(async move {
            let result = load.call(&conn, i).await;
            let _ = tx.send((i >= warm, load.class(i), result, due.elapsed()));
        });
    }
    drop(tx);
    let mut out = vec![Outcome { seconds: duration.as_secs_f64(), ..Outcome::default() }; load.classes()];
    while let Some((measured, class, result, latency)) = rx.recv().await {
        if measured {
            record(&mut out[class], result, latency);
        }
    }
    out
}

/// Runs every scenario `rounds` times in turn, so that machine noise falls
/// on all of them alike, and sums each scenario's slices. Each round starts
/// one scenario later, so none always follows the same neighbour (an audit
/// backlog left by one slice slows the next).
pub(super) async fn interleaved<F, Fut>(rounds: usize, scenarios: usize, mut slice: F) -> Vec<Vec<Outcome>>
where
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = Vec<Outcome>>,
{
    let mut totals: Vec<Vec<Outcome>> = vec![Vec::new(); scenarios];
    for round in 0..rounds {
        for step in 0..scenarios {
            let s = (round + step) % scenarios;
            let total = &mut totals[s];
            let parts = slice(s).await;
            if total.is_empty() {
                *total = vec![Outcome::default(); parts.len()];
            }
            for (t, p) in total.iter_mut().zip(parts) {
                t.absorb(p);
            }
        }
    }
    totals.into_iter().map(|parts| parts.into_iter().map(Outcome::finish).collect()).collect()
}

/// Waits (up to five minutes) for the audit rows a saturating run left
/// behind, queued or spooled, to be written, and reports how fast the
/// writer took them: that rate is what Verify sustains once the queue is
/// full, and the next scenario starts with the audit trail caught up.
pub(super) async fn drain_audit(probes: Option<&Probes>) {
    let Some(p) = probes else { return };
    let behind = || p.audit.depth() as u64 + p.audit.spooled_rows();
    let (start, queued, spooled, written) =
        (Instant::now(), p.audit.depth(), p.audit.spooled_rows(), p.audit.written());
    while behind() > 0 && start.elapsed() < Duration::from_secs(300) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seconds = start.elapsed().as_secs_f64();
    if queued > 0 || spooled > 0 {
        println!(
            "audit backlog of {queued} queued and {spooled} spooled rows: {} written in {seconds:.1}s \
             ({:.0} rows/s with no load running){}",
            p.audit.written() - written,
            (p.audit.written() - written) as f64 / seconds,
            match behind() {
                0 => String::new(),
                left => format!("; {left} still behind"),
            }
        );
    }
}

pub(super) async fn connect(addr: SocketAddr, n: usize) -> Vec<Connection> {
    let mut conns = Vec::new();
    for _ in 0..n {
        // One Channel per connection: each is its own HTTP/2 connection.
        let channel = Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
        conns.push(Connection {
            health: HealthClient::new(channel.clone()),
            verify: KeyVerifyClient::new(channel.clone()),
            check: AuthorizationClient::new(channel),
        });
    }
    conns
}

/// A fresh replica's first Verify of each key, `in_flight` at a time, each
/// call timed; ALLOW is the only success.
pub(super) async fn first_verifies(addr: SocketAddr, keys: &[String], in_flight: usize) -> Outcome {
    let conns = connect(addr, 4).await;
    let sem = Arc::new(tokio::sync::Semaphore::new(in_flight));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        let mut client = conns[i % conns.len()].verify.clone();
        let (key, sem) = (key.clone(), Arc::clone(&sem));
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire().await.unwrap();
            let t = Instant::now();
            let request =
                pb::VerifyRequest { key, required_scope: "sales:read".into(), ..Default::default() };
            let result = match client.verify(request).await {
                Ok(r) if r.get_ref().decision == pb::Decision::Allow as i32 => Ok(()),
                Ok(_) => Err(tonic::Code::PermissionDenied),
                Err(status) => Err(status.code()),
            };
            (result, t.elapsed())
        }));
    }
    let mut out = Outcome::default();
    for t in tasks {
        let (result, latency) = t.await.unwrap();
        record(&mut out, result, latency);
    }
    out.seconds = started.elapsed().as_secs_f64();
    out.finish()
}

/// Verifies every key once, so the cache holds them all.
pub(super) async fn warm(conns: &[Connection], keys: &[String], ip: &str) {
    let sem = Arc::new(tokio::sync::Semaphore::new(16));
    let mut tasks = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        let mut client = conns[i % conns.len()].verify.clone();
        let (key, ip, sem) = (key.clone(), ip.to_owned(), Arc::clone(&sem));
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire().await.unwrap();
            client.verify(pb::VerifyRequest { key, ip, ..Default::default() }).await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

pub(super) struct Row {
    pub(super) name: String,
    pub(super) outcome: Outcome,
}

pub(super) fn print_rows(rows: &[Row], baseline: &Outcome) {
    println!("| scenario | calls/s | × baseline | p50 ms | p90 ms | p99 ms | max ms | errors |");
    println!("|---|---:|---:|---:|---:|---:|---:|---|");
    for Row { name, outcome: o } in rows {
        println!(
            "| {name} | {:.0} | {:.2} | {:.3} | {:.3} | {:.3} | {:.2} | {} |",
            o.throughput(),
            o.throughput() / baseline.throughput(),
            o.percentile(0.50),
            o.percentile(0.90),
            o.percentile(0.99),
            o.max(),
            if o.errors.is_empty() { "-".to_owned() } else { format!("{:?}", o.errors) }
        );
    }
}

pub(super) fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}
