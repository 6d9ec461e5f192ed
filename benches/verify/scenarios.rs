//! The closed-loop scenarios by name. Each area offers its own (the hot
//! path here; the gateway, the fleet tier and TLS in their files); each
//! has an id, which is its `--profile` name and how the report finds its
//! outcome, so a new target is a row in its area's list and a line in the
//! targets table, found by id and never by position.

use super::*;

/// One closed-loop scenario.
pub(super) struct Scenario {
    /// How the report names it.
    pub(super) name: &'static str,
    /// Its `--profile` name, and how the targets find its outcome.
    pub(super) id: &'static str,
    pub(super) load: Arc<Load>,
    /// Which connection set it runs on (0: plaintext to the main server).
    pub(super) set: usize,
}

impl Scenario {
    pub(super) fn new(name: &'static str, id: &'static str, load: Arc<Load>, set: usize) -> Self {
        Self { name, id, load, set }
    }
}

/// The verify load of `keys` asking for `scope` from `ip`.
pub(super) fn verify(keys: &Arc<Vec<String>>, scope: &'static str, ip: &'static str) -> Arc<Load> {
    Load::verify(vec![(1, Arc::clone(keys), scope, ip)])
}

/// The hot path: the no-op baseline every ratio is taken against, warm
/// Verify allowed and denied, and the two inputs that must stay cheap
/// (malformed keys, one wrong secret repeated).
pub(super) fn hot_path(
    keys: &Arc<Vec<String>>,
    restricted: &Arc<Vec<String>>,
    malformed: Arc<Vec<String>>,
    wrong: Arc<Vec<String>>,
) -> Vec<Scenario> {
    vec![
        Scenario::new("baseline: Health/Check", "baseline", Arc::new(Load::Health), 0),
        Scenario::new("warm Verify ALLOW", "allow", verify(keys, "sales:read", "10.1.2.3"), 0),
        Scenario::new("warm Verify DENY (scope)", "deny-scope", verify(keys, "invoice:write", "10.1.2.3"), 0),
        Scenario::new("warm Verify DENY (ip)", "deny-ip", verify(restricted, "sales:read", "10.1.2.3"), 0),
        Scenario::new("malformed key (bad checksum)", "malformed", verify(&malformed, "", "10.1.2.3"), 0),
        Scenario::new("wrong secret, one key repeated", "wrong-secret", verify(&wrong, "", "10.1.2.3"), 0),
    ]
}

/// What each scenario measured, by id.
pub(super) struct Measured {
    by_id: Vec<(&'static str, Outcome)>,
}

impl Measured {
    /// `closed[i]` is what `scenarios[i]` measured.
    pub(super) fn new(scenarios: &[Scenario], closed: &[Vec<Outcome>]) -> Self {
        Self { by_id: scenarios.iter().zip(closed).map(|(s, o)| (s.id, o[0].clone())).collect() }
    }

    /// The outcome of a scenario that may not have run (Redis, TLS).
    pub(super) fn get(&self, id: &str) -> Option<Outcome> {
        self.by_id.iter().find(|(i, _)| *i == id).map(|(_, o)| o.clone())
    }

    /// The outcome of a scenario every run has.
    pub(super) fn of(&self, id: &str) -> Outcome {
        self.get(id).unwrap_or_else(|| panic!("no scenario {id:?} ran"))
    }
}
