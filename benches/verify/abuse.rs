//! Abuse: wrong secrets and malformed keys, and the guessing storm on one
//! known prefix with a no-op flood as its control.

use super::*;

/// What a guessing storm measured.
pub(super) struct Storm {
    /// Warm traffic at the fixed rate: alone, during the storm, and during
    /// a flood of no-op calls from as many callers (the control: what any
    /// flood of that size costs on these two cores).
    pub(super) warm_alone: Outcome,
    pub(super) warm_during: Outcome,
    pub(super) warm_noop_flood: Outcome,
    /// Fresh keys verified one by one during the storm: ALLOW answers (with
    /// latencies) and every other answer by name.
    pub(super) fresh: Outcome,
    pub(super) fresh_total: usize,
    /// The guessers' answers, by deny reason or error code; the no-op
    /// flood's call count.
    pub(super) guesses: BTreeMap<String, usize>,
    pub(super) noop_calls: usize,
    /// scrypt runs during the storm (fresh keys' included).
    pub(super) scrypts: u64,
    pub(super) seconds: f64,
}

/// A guessing storm's shape.
pub(super) struct StormPlan {
    /// Warm traffic's fixed rate, and how long each phase lasts.
    pub(super) rate: f64,
    pub(super) duration: Duration,
    /// The warm key whose (known) prefix is attacked.
    pub(super) attacked: String,
    /// Keys never verified before, verified one by one during the storm.
    pub(super) fresh: Vec<String>,
}

pub(super) const STORM_CALLERS: usize = 80;

/// `STORM_CALLERS` closed-loop callers until `stop`: distinct wrong secrets
/// on `attacked`'s prefix, or (without one) no-op Health/Check calls.
pub(super) fn flood(
    conns: &[Connection],
    attacked: Option<&str>,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<BTreeMap<String, usize>>> {
    (0..STORM_CALLERS)
        .map(|g| {
            let conn = conns[g % conns.len()].clone();
            let (stop, attacked) = (Arc::clone(stop), attacked.map(str::to_owned));
            tokio::spawn(async move {
                let mut answers: BTreeMap<String, usize> = BTreeMap::new();
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    let answer = match &attacked {
                        Some(attacked) => {
                            let key = wrong_secret(attacked, 10_000_000 + g * 1_000_000 + n);
                            match conn
                                .verify
                                .clone()
                                .verify(pb::VerifyRequest { key, ..Default::default() })
                                .await
                            {
                                Ok(r) => pb::DenyReason::try_from(r.into_inner().deny_reason)
                                    .map_or("?".to_owned(), |d| d.as_str_name().to_owned()),
                                Err(s) => format!("{:?}", s.code()),
                            }
                        }
                        None => match conn.health.clone().check(HealthCheckRequest::default()).await {
                            Ok(_) => "SERVING".to_owned(),
                            Err(s) => format!("{:?}", s.code()),
                        },
                    };
                    n += 1;
                    *answers.entry(answer).or_default() += 1;
                }
                answers
            })
        })
        .collect()
}

pub(super) async fn stop_flood(
    stop: &AtomicBool,
    tasks: Vec<tokio::task::JoinHandle<BTreeMap<String, usize>>>,
) -> BTreeMap<String, usize> {
    stop.store(true, Ordering::Relaxed);
    let mut all = BTreeMap::new();
    for t in tasks {
        for (k, v) in t.await.unwrap() {
            *all.entry(k).or_default() += v;
        }
    }
    all
}

/// The guessing storm: callers sending distinct wrong secrets on a known
/// prefix as fast as they are answered, while warm traffic runs at a fixed
/// rate and fresh keys verify one by one; then the same warm traffic under
/// as many callers sending no-op calls, as the control.
pub(super) async fn guessing_storm(
    addr: SocketAddr,
    conns: &[Connection],
    warm: &Arc<Load>,
    plan: StormPlan,
    scrypts: impl Fn() -> u64,
) -> Storm {
    let StormPlan { rate, duration, attacked, fresh } = plan;
    let warm_alone = fixed_rate(conns, warm, rate, Duration::ZERO, duration).await.swap_remove(0).finish();
    let flood_conns = connect(addr, 8).await;
    let stop = Arc::new(AtomicBool::new(false));
    let before = scrypts();
    let started = Instant::now();
    let guessers = flood(&flood_conns, Some(&attacked), &stop);
    let fresh_total = fresh.len();
    let trickle = {
        let mut client = conns[0].verify.clone();
        let gap = duration / u32::try_from(fresh_total.max(1)).unwrap_or(1);
        tokio::spawn(async move {
            let mut out = Outcome { seconds: duration.as_secs_f64(), ..Outcome::default() };
            for key in fresh {
                tokio::time::sleep(gap).await;
                let t = Instant::now();
                let r = client
                    .verify(pb::VerifyRequest { key, ip: "10.9.9.9".into(), ..Default::default() })
                    .await;
                match r {
                    Ok(r) if r.get_ref().decision == pb::Decision::Allow as i32 => {
                        record(&mut out, Ok(()), t.elapsed());
                    }
                    Ok(r) => {
                        *out.errors.entry(format!("DENY {:?}", r.into_inner().deny_reason)).or_default() += 1
                    }
                    Err(s) => *out.errors.entry(format!("{:?}", s.code())).or_default() += 1,
                }
            }
            out
        })
    };
    let warm_during = fixed_rate(conns, warm, rate, Duration::ZERO, duration).await.swap_remove(0).finish();
    let fresh = trickle.await.unwrap().finish();
    let guesses = stop_flood(&stop, guessers).await;
    let seconds = started.elapsed().as_secs_f64();
    let scrypts = scrypts() - before;

    let stop = Arc::new(AtomicBool::new(false));
    let noop = flood(&flood_conns, None, &stop);
    let warm_noop_flood =
        fixed_rate(conns, warm, rate, Duration::ZERO, duration).await.swap_remove(0).finish();
    let noop_calls = stop_flood(&stop, noop).await.values().sum();
    Storm {
        warm_alone,
        warm_during,
        warm_noop_flood,
        fresh,
        fresh_total,
        guesses,
        noop_calls,
        scrypts,
        seconds,
    }
}

pub(super) fn wrong_secret(key: &str, variant: usize) -> String {
    let body = format!("{}{:0>32}", &key[..16], variant);
    checksummed(body)
}

pub(super) fn bad_checksum(key: &str) -> String {
    let mut k = key.to_owned();
    let last = if k.ends_with('0') { '1' } else { '0' };
    k.pop();
    k.push(last);
    k
}

impl Storm {
    /// The storm's rows against the fixed-load `baseline`, at `rate`.
    pub(super) fn print_rows(&self, rate: f64, baseline: &Outcome) {
        let fresh_ok = self.fresh.calls;
        println!();
        println!(
            "## Guessing storm: 80 guessers on one known prefix for {:.1} s, warm load {rate:.0} calls/s, {} fresh keys",
            self.seconds, self.fresh_total
        );
        println!();
        print_rows(
            &[
                Row { name: "warm Verify ALLOW alone".into(), outcome: self.warm_alone.clone() },
                Row { name: "warm Verify ALLOW during the storm".into(), outcome: self.warm_during.clone() },
                Row {
                    name: "warm Verify ALLOW during a no-op flood (control)".into(),
                    outcome: self.warm_noop_flood.clone(),
                },
                Row { name: "fresh keys' first Verify during the storm".into(), outcome: self.fresh.clone() },
            ],
            baseline,
        );
        println!(
            "guess answers: {:?}; scrypt runs: {} ({fresh_ok} for fresh keys); the control flood answered {} no-op calls",
            self.guesses, self.scrypts, self.noop_calls
        );
    }

    /// The storm's lines of the targets table.
    pub(super) fn print_targets(&self) {
        let limit = Settings::default().throttle_failures_per_prefix;
        let fresh_ok = self.fresh.calls;
        let attacked_scrypts = self.scrypts.saturating_sub(fresh_ok as u64);
        let r = self.warm_during.percentile(0.99) / self.warm_alone.percentile(0.99);
        println!(
            "| guessing storm: warm p99 ≤ 1.5 × warm-only p99 | {:.3} ms vs {:.3} ms = {r:.2} × | {} |",
            self.warm_during.percentile(0.99),
            self.warm_alone.percentile(0.99),
            verdict(r <= 1.5)
        );
        let r = self.warm_noop_flood.percentile(0.99) / self.warm_alone.percentile(0.99);
        println!(
            "| (control) warm p99 under {STORM_CALLERS} callers of a no-op call | {:.3} ms = {r:.2} × warm-only | - |",
            self.warm_noop_flood.percentile(0.99),
        );
        println!(
            "| guessing storm: fresh legitimate keys 100 % ALLOW | {fresh_ok} of {} (p99 {:.1} ms; others: {:?}) | {} |",
            self.fresh_total,
            self.fresh.percentile(0.99),
            self.fresh.errors,
            verdict(fresh_ok == self.fresh_total)
        );
        let per_minute = attacked_scrypts as f64 * 60.0 / self.seconds.max(60.0);
        println!(
            "| guessing storm: scrypt runs on the attacked prefix ≤ {limit} per minute | {attacked_scrypts} in {:.1} s (the window is 60 s) | {} |",
            self.seconds,
            verdict(per_minute <= f64::from(limit))
        );
    }
}
