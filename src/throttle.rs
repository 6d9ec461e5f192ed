//! Guess throttling: wrong secrets counted per lookup prefix and per client
//! IP over a sliding window. Past a limit, Verify refuses further uncached
//! checks on that prefix or from that IP without running scrypt. A lookup of
//! a prefix no key has is a wrong guess too, counted against the client IP
//! before the store is read ([`GuessThrottle::admit_lookup`]), so that
//! random prefixes from one address cost a bounded number of reads.
//!
//! A check is counted when it is admitted (before scrypt), and uncounted
//! if the secret turns out right, so no more than the limit of scrypts run
//! on one prefix per window, however many guessers race. State is per
//! replica; entries exist only for prefixes and IPs with wrong secrets in
//! the last window and hold at most the limit's number of failure times,
//! so memory is bounded by what scrypt can check in that time, and the
//! window is exact: no window-long span holds more than the limit.

use std::{
    borrow::Borrow,
    collections::{HashMap, VecDeque},
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

/// When one prefix or IP had its recent failures (nanoseconds since the
/// throttle's epoch), oldest first. Only the last `limit` are kept: that is
/// all a refusal needs, so memory per entry is bounded and the window is
/// exact: no more than `limit` failures in any window-long span.
#[derive(Debug, Default)]
struct Failures(VecDeque<u64>);

impl Failures {
    /// Failures within the window ending at `now`.
    fn recent(&self, now: u64, window: u64) -> u32 {
        let since = now.saturating_sub(window);
        u32::try_from(self.0.iter().rev().take_while(|at| **at > since).count()).unwrap_or(u32::MAX)
    }
}

#[derive(Debug)]
struct Counts<K> {
    map: HashMap<K, Failures>,
    /// Failures kept per entry: the limit.
    keep: usize,
    pruned: u64,
}

impl<K: Hash + Eq> Counts<K> {
    fn new(limit: u32) -> Self {
        Self { map: HashMap::new(), keep: usize::try_from(limit.max(1)).unwrap_or(usize::MAX), pruned: 0 }
    }

    fn recent<Q: Hash + Eq + ?Sized>(&self, key: &Q, now: u64, window: u64) -> u32
    where
        K: Borrow<Q>,
    {
        self.map.get(key).map_or(0, |f| f.recent(now, window))
    }

    fn add(&mut self, key: K, now: u64, window: u64) {
        self.prune(now, window);
        let keep = self.keep;
        let failures = self.map.entry(key).or_default();
        failures.0.push_back(now);
        while failures.0.len() > keep {
            failures.0.pop_front();
        }
    }

    /// Takes back the failure counted at `at` (the secret was right).
    fn sub<Q: Hash + Eq + ?Sized>(&mut self, key: &Q, at: u64)
    where
        K: Borrow<Q>,
    {
        if let Some(failures) = self.map.get_mut(key)
            && let Some(i) = failures.0.iter().rposition(|t| *t == at)
        {
            failures.0.remove(i);
        }
    }

    /// Once per window, forgets entries with nothing in the last one.
    fn prune(&mut self, now: u64, window: u64) {
        if now >= self.pruned.saturating_add(window) {
            self.map.retain(|_, f| f.recent(now, window) > 0);
            self.pruned = now;
        }
    }

    fn over(&self, limit: u32, now: u64, window: u64) -> usize {
        self.map.values().filter(|f| f.recent(now, window) >= limit).count()
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

/// An admitted lookup, counted against its IP until
/// [`GuessThrottle::uncount_lookup`].
#[derive(Debug)]
pub struct Lookup {
    ip: IpAddr,
    at: u64,
}

/// An admitted check, counted as a failure until [`GuessThrottle::uncount`].
#[derive(Debug)]
pub struct Admission {
    /// The prefix had wrong secrets lately: its check waits behind others
    /// for a hashing thread.
    pub suspect: bool,
    prefix: String,
    ip: Option<IpAddr>,
    /// When it was counted.
    at: u64,
}

impl GuessThrottle {
    pub fn new(settings: ThrottleSettings) -> Self {
        let state = State { prefixes: Counts::new(settings.per_prefix), ips: Counts::new(settings.per_ip) };
        Self {
            settings,
            epoch: Instant::now(),
            state: Mutex::new(state),
            throttled_prefix: AtomicU64::new(0),
            throttled_ip: AtomicU64::new(0),
        }
    }

    /// Now and the window's length, in nanoseconds since the epoch.
    fn now(&self) -> (u64, u64) {
        let now = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        (now, u64::try_from(self.settings.window.as_nanos()).unwrap_or(u64::MAX).max(1))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn refusal(&self, state: &State, prefix: &str, ip: Option<IpAddr>) -> Option<Throttled> {
        let (now, window) = self.now();
        let s = &self.settings;
        if s.per_prefix > 0 && state.prefixes.recent(prefix, now, window) >= s.per_prefix {
            return Some(Throttled::Prefix);
        }
        if let Some(ip) = ip
            && s.per_ip > 0
            && state.ips.recent(&ip, now, window) >= s.per_ip
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
        let (now, window) = self.now();
        let suspect = state.prefixes.recent(prefix, now, window) > 0;
        state.prefixes.add(prefix.to_owned(), now, window);
        if let Some(ip) = ip {
            state.ips.add(ip, now, window);
        }
        Ok(Admission { suspect, prefix: prefix.to_owned(), ip, at: now })
    }

    /// Admits a store lookup of an uncached key from `ip`, counting it
    /// against the IP until [`Self::uncount_lookup`] says its prefix was
    /// found; refuses it once the IP is over its limit. Without an IP (or
    /// with IP throttling off) nothing is counted.
    pub fn admit_lookup(&self, ip: Option<IpAddr>) -> Result<Option<Lookup>, Throttled> {
        let Some(ip) = ip.filter(|_| self.settings.per_ip > 0) else { return Ok(None) };
        let mut state = self.lock();
        let (now, window) = self.now();
        if state.ips.recent(&ip, now, window) >= self.settings.per_ip {
            return Err(self.count(Some(Throttled::Ip)).unwrap_or(Throttled::Ip));
        }
        state.ips.add(ip, now, window);
        Ok(Some(Lookup { ip, at: now }))
    }

    /// The prefix was found (or could not be looked up): not a wrong guess.
    pub fn uncount_lookup(&self, lookup: Option<Lookup>) {
        if let Some(lookup) = lookup {
            self.lock().ips.sub(&lookup.ip, lookup.at);
        }
    }

    /// The secret was right, or could not be checked: not a failure.
    pub fn uncount(&self, admission: Admission) {
        let mut state = self.lock();
        state.prefixes.sub(admission.prefix.as_str(), admission.at);
        if let Some(ip) = admission.ip {
            state.ips.sub(&ip, admission.at);
        }
    }

    /// Checks refused so far, by prefix and by IP.
    pub fn refused(&self) -> (u64, u64) {
        (self.throttled_prefix.load(Ordering::Relaxed), self.throttled_ip.load(Ordering::Relaxed))
    }

    /// Prefixes and IPs over their limit now.
    pub fn over_limit(&self) -> (usize, usize) {
        let (now, window) = self.now();
        let state = self.lock();
        (
            state.prefixes.over(self.settings.per_prefix.max(1), now, window),
            state.ips.over(self.settings.per_ip.max(1), now, window),
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
    fn no_more_than_the_limit_in_any_window_long_span() {
        let t = throttle(3, 0, Duration::from_millis(300));
        let start = Instant::now();
        t.admit("sntr_aaaaaaaaaaa", None).unwrap();
        std::thread::sleep(Duration::from_millis(150));
        t.admit("sntr_aaaaaaaaaaa", None).unwrap();
        t.admit("sntr_aaaaaaaaaaa", None).unwrap();
        // However the span falls on the clock, a fourth waits until the
        // first failure is a full window old.
        while start.elapsed() < Duration::from_millis(280) {
            assert!(t.admit("sntr_aaaaaaaaaaa", None).is_err());
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(50));
        assert!(t.admit("sntr_aaaaaaaaaaa", None).is_ok(), "the first failure aged out");
        assert!(t.admit("sntr_aaaaaaaaaaa", None).is_err(), "the other two have not");
    }

    #[test]
    fn an_entry_keeps_at_most_its_limit_of_failures() {
        let mut counts = Counts::<&str>::new(3);
        for at in 1..=10 {
            counts.add("k", at, 1_000);
        }
        assert_eq!(counts.map["k"].0, [8, 9, 10]);
        counts.sub("k", 9);
        assert_eq!(counts.recent("k", 10, 1_000), 2);
    }
}
