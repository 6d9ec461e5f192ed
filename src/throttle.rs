//! Guess throttling: wrong secrets counted per lookup prefix and per client
//! IP over a sliding window. Past a limit, Verify refuses further uncached
//! checks on that prefix or from that IP without running scrypt.
//!
//! A check is counted when it is admitted (before scrypt), and uncounted
//! if the secret turns out right, so no more than the limit of scrypts run
//! on one prefix per window, however many guessers race. State is per
//! replica; entries exist only for prefixes and IPs with wrong secrets in
//! the last two windows, so memory is bounded by what scrypt can check in
//! that time.

use std::{
    borrow::Borrow,
    collections::HashMap,
    hash::Hash,
    net::IpAddr,
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use crate::config::ThrottleSettings;

/// Why a check was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Throttled {
    Prefix,
    Ip,
}

/// Failures of one prefix or IP in the current and the previous window.
#[derive(Debug, Clone, Copy)]
struct Count {
    window: u64,
    current: u32,
    previous: u32,
}

impl Count {
    /// Rolls the counts forward to `window`.
    fn at(mut self, window: u64) -> Self {
        if window > self.window {
            self.previous = if window == self.window + 1 { self.current } else { 0 };
            self.current = 0;
            self.window = window;
        }
        self
    }

    /// The sliding-window estimate: the previous window weighted by how
    /// much of it still overlaps the last `window` length, plus the current.
    fn estimate(&self, elapsed_fraction: f64) -> f64 {
        f64::from(self.previous) * (1.0 - elapsed_fraction) + f64::from(self.current)
    }
}

#[derive(Debug)]
struct Counts<K> {
    map: HashMap<K, Count>,
    pruned: u64,
}

impl<K: Hash + Eq> Counts<K> {
    fn new() -> Self {
        Self { map: HashMap::new(), pruned: 0 }
    }

    fn estimate<Q: Hash + Eq + ?Sized>(&self, key: &Q, window: u64, fraction: f64) -> f64
    where
        K: Borrow<Q>,
    {
        self.map.get(key).map_or(0.0, |c| c.at(window).estimate(fraction))
    }

    fn add(&mut self, key: K, window: u64) {
        self.prune(window);
        let count = self.map.entry(key).or_insert(Count { window, current: 0, previous: 0 });
        *count = count.at(window);
        count.current = count.current.saturating_add(1);
    }

    /// Takes back one failure (the secret was right after all).
    fn sub<Q: Hash + Eq + ?Sized>(&mut self, key: &Q, window: u64)
    where
        K: Borrow<Q>,
    {
        if let Some(count) = self.map.get_mut(key) {
            *count = count.at(window);
            if count.current > 0 {
                count.current -= 1;
            } else {
                count.previous = count.previous.saturating_sub(1);
            }
        }
    }

    /// Once per window, forgets entries with nothing in the last two.
    fn prune(&mut self, window: u64) {
        if window > self.pruned {
            self.map.retain(|_, c| c.window + 1 >= window);
            self.pruned = window;
        }
    }

    fn over(&self, limit: u32, window: u64, fraction: f64) -> usize {
        self.map.values().filter(|c| c.at(window).estimate(fraction) >= f64::from(limit)).count()
    }
}

#[derive(Debug)]
struct State {
    prefixes: Counts<String>,
    ips: Counts<IpAddr>,
}

/// The per-replica failure counters.
#[derive(Debug)]
pub struct GuessThrottle {
    settings: ThrottleSettings,
    epoch: Instant,
    state: Mutex<State>,
    throttled_prefix: AtomicU64,
    throttled_ip: AtomicU64,
}

/// An admitted check, counted as a failure until [`GuessThrottle::uncount`].
#[derive(Debug)]
pub struct Admission {
    /// The prefix had wrong secrets lately: its check waits behind others
    /// for a hashing thread.
    pub suspect: bool,
    prefix: String,
    ip: Option<IpAddr>,
    window: u64,
}

impl GuessThrottle {
    pub fn new(settings: ThrottleSettings) -> Self {
        Self {
            settings,
            epoch: Instant::now(),
            state: Mutex::new(State { prefixes: Counts::new(), ips: Counts::new() }),
            throttled_prefix: AtomicU64::new(0),
            throttled_ip: AtomicU64::new(0),
        }
    }

    fn now(&self) -> (u64, f64) {
        let window = self.settings.window.as_nanos().max(1);
        let elapsed = self.epoch.elapsed().as_nanos();
        let index = u64::try_from(elapsed / window).unwrap_or(u64::MAX);
        (index, (elapsed % window) as f64 / window as f64)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn refusal(&self, state: &State, prefix: &str, ip: Option<IpAddr>) -> Option<Throttled> {
        let (window, fraction) = self.now();
        let s = &self.settings;
        if s.per_prefix > 0 && state.prefixes.estimate(prefix, window, fraction) >= f64::from(s.per_prefix) {
            return Some(Throttled::Prefix);
        }
        if let Some(ip) = ip
            && s.per_ip > 0
            && state.ips.estimate(&ip, window, fraction) >= f64::from(s.per_ip)
        {
            return Some(Throttled::Ip);
        }
        None
    }

    fn count(&self, refused: Option<Throttled>) -> Option<Throttled> {
        match refused {
            Some(Throttled::Prefix) => self.throttled_prefix.fetch_add(1, Ordering::Relaxed),
            Some(Throttled::Ip) => self.throttled_ip.fetch_add(1, Ordering::Relaxed),
            None => return None,
        };
        refused
    }

    /// Whether a check on `prefix` from `ip` is refused now (no change).
    pub fn check(&self, prefix: &str, ip: Option<IpAddr>) -> Option<Throttled> {
        let state = self.lock();
        self.count(self.refusal(&state, prefix, ip))
    }

    /// Admits a secret check, counting it as a failure until it succeeds;
    /// refuses it if the prefix or IP is over its limit.
    pub fn admit(&self, prefix: &str, ip: Option<IpAddr>) -> Result<Admission, Throttled> {
        let mut state = self.lock();
        if let Some(refused) = self.count(self.refusal(&state, prefix, ip)) {
            return Err(refused);
        }
        let (window, fraction) = self.now();
        let suspect = state.prefixes.estimate(prefix, window, fraction) > 0.0;
        state.prefixes.add(prefix.to_owned(), window);
        if let Some(ip) = ip {
            state.ips.add(ip, window);
        }
        Ok(Admission { suspect, prefix: prefix.to_owned(), ip, window })
    }

    /// The secret was right, or could not be checked: not a failure.
    pub fn uncount(&self, admission: Admission) {
        let mut state = self.lock();
        state.prefixes.sub(admission.prefix.as_str(), admission.window);
        if let Some(ip) = admission.ip {
            state.ips.sub(&ip, admission.window);
        }
    }

    /// Checks refused so far, by prefix and by IP.
    pub fn refused(&self) -> (u64, u64) {
        (self.throttled_prefix.load(Ordering::Relaxed), self.throttled_ip.load(Ordering::Relaxed))
    }

    /// Prefixes and IPs over their limit now.
    pub fn over_limit(&self) -> (usize, usize) {
        let (window, fraction) = self.now();
        let state = self.lock();
        (
            state.prefixes.over(self.settings.per_prefix.max(1), window, fraction),
            state.ips.over(self.settings.per_ip.max(1), window, fraction),
        )
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn throttle(per_prefix: u32, per_ip: u32, window: Duration) -> GuessThrottle {
        GuessThrottle::new(ThrottleSettings { per_prefix, per_ip, window })
    }

    #[test]
    fn a_prefix_is_refused_after_its_limit_of_failures_only() {
        let t = throttle(3, 0, Duration::from_secs(60));
        let suspects: Vec<bool> =
            (0..3).map(|_| t.admit("sntr_aaaaaaaaaaa", None).unwrap().suspect).collect();
        assert_eq!(suspects, [false, true, true], "suspect once it has had a failure");
        assert_eq!(t.admit("sntr_aaaaaaaaaaa", None).unwrap_err(), Throttled::Prefix);
        assert_eq!(t.check("sntr_aaaaaaaaaaa", None), Some(Throttled::Prefix));
        let other = t.admit("sntr_bbbbbbbbbbb", None).expect("another prefix is not affected");
        assert!(!other.suspect);
        assert_eq!(t.refused(), (2, 0));
        assert_eq!(t.over_limit(), (1, 0));
    }

    #[test]
    fn right_secrets_are_not_counted() {
        let t = throttle(2, 0, Duration::from_secs(60));
        for _ in 0..10 {
            let a = t.admit("sntr_aaaaaaaaaaa", None).unwrap();
            assert!(!a.suspect, "no failure counted before it");
            t.uncount(a);
        }
        assert_eq!(t.check("sntr_aaaaaaaaaaa", None), None);
    }

    #[test]
    fn an_ip_is_refused_across_prefixes() {
        let t = throttle(100, 2, Duration::from_secs(60));
        let ip = Some("203.0.113.9".parse().unwrap());
        assert!(t.admit("sntr_aaaaaaaaaaa", ip).is_ok());
        assert!(t.admit("sntr_bbbbbbbbbbb", ip).is_ok());
        assert_eq!(t.admit("sntr_ccccccccccc", ip).unwrap_err(), Throttled::Ip);
        assert!(t.admit("sntr_ccccccccccc", Some("203.0.113.10".parse().unwrap())).is_ok());
    }

    #[test]
    fn the_window_slides() {
        let t = throttle(2, 0, Duration::from_millis(100));
        t.admit("sntr_aaaaaaaaaaa", None).unwrap();
        t.admit("sntr_aaaaaaaaaaa", None).unwrap();
        assert!(t.check("sntr_aaaaaaaaaaa", None).is_some());
        // Two windows on, nothing of the failures is left.
        std::thread::sleep(Duration::from_millis(210));
        assert_eq!(t.check("sntr_aaaaaaaaaaa", None), None);
        t.admit("sntr_bbbbbbbbbbb", None).unwrap();
        assert_eq!(t.lock().prefixes.map.len(), 1, "the stale prefix was pruned");
    }

    #[test]
    fn the_previous_window_counts_in_proportion() {
        let c = Count { window: 4, current: 10, previous: 0 }.at(5);
        assert_eq!((c.previous, c.current), (10, 0));
        assert!((c.estimate(0.25) - 7.5).abs() < 1e-9);
        let gone = Count { window: 4, current: 10, previous: 3 }.at(6);
        assert_eq!((gone.previous, gone.current), (0, 0));
    }
}
