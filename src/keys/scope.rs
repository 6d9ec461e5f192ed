//! Scopes (`resource:action`), their implications, and the integration presets.
//!
//! The catalogue is small and fixed at start-up, so a set of scopes is a
//! bitmask over catalogue positions: the Verify hot path checks a scope with
//! one AND, and implications are expanded once when a key's state is loaded.

use std::collections::BTreeSet;

use serde::Deserialize;
use thiserror::Error;

/// Most scopes a catalogue may hold (the width of [`ScopeSet`]).
pub const MAX_CATALOGUE: usize = 64;
/// Most scopes one key may list.
pub const MAX_SCOPES_PER_KEY: usize = 32;

/// A catalogue entry as configured.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct ScopeDef {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Scopes implied beyond the automatic `X:write` ⇒ `X:read`.
    #[serde(default)]
    pub implies: Vec<String>,
}

/// A named scope bundle for a common integration, as configured.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct PresetDef {
    pub name: String,
    #[serde(default)]
    pub display_name: String,
    #[serde(default)]
    pub use_case: String,
    pub scopes: Vec<String>,
}

/// Scopes as a bitmask over catalogue positions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct ScopeSet(u64);

impl ScopeSet {
    pub fn contains(self, other: ScopeSet) -> bool {
        self.0 & other.0 == other.0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    fn with(self, index: usize) -> Self {
        Self(self.0 | (1 << index))
    }

    fn has(self, index: usize) -> bool {
        self.0 & (1 << index) != 0
    }
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ScopeError {
    #[error("unknown scope(s): {unknown}{hint}; valid scopes are: {valid}")]
    Unknown { unknown: String, hint: &'static str, valid: String },
    #[error("duplicate scope(s): {0}")]
    Duplicate(String),
    #[error("at most {MAX_SCOPES_PER_KEY} scopes may be given")]
    TooMany,
    #[error("at least one scope (or a preset) is required")]
    Empty,
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CatalogueError {
    #[error("scope name {0:?} is not lowercase resource:action")]
    BadName(String),
    #[error("scope {0:?} is defined twice")]
    Duplicate(String),
    #[error("the catalogue holds more than {MAX_CATALOGUE} scopes")]
    TooLarge,
    #[error("scope {scope:?} implies {implied:?}, which is not in the catalogue")]
    UnknownImplied { scope: String, implied: String },
    #[error("preset {preset:?} is invalid: {reason}")]
    BadPreset { preset: String, reason: String },
}

#[derive(Debug, Clone)]
struct Entry {
    def: ScopeDef,
    /// Everything this scope grants, itself included (transitive closure).
    grants: ScopeSet,
    /// Names of directly and automatically implied scopes, for ListScopes.
    implies: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Preset {
    pub def: PresetDef,
    pub scopes: ScopeSet,
}

/// The validated catalogue of scopes and presets.
#[derive(Debug, Clone)]
pub struct ScopeCatalogue {
    entries: Vec<Entry>,
    presets: Vec<Preset>,
}

/// A scope name that is lowercase `resource:action`.
pub fn is_scope_name(name: &str) -> bool {
    let part = |s: &str| {
        s.bytes().next().is_some_and(|b| b.is_ascii_lowercase())
            && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    };
    match name.split_once(':') {
        Some((resource, action)) => part(resource) && part(action),
        None => false,
    }
}

impl ScopeCatalogue {
    pub fn new(defs: Vec<ScopeDef>, presets: Vec<PresetDef>) -> Result<Self, CatalogueError> {
        if defs.len() > MAX_CATALOGUE {
            return Err(CatalogueError::TooLarge);
        }
        let mut seen = BTreeSet::new();
        for def in &defs {
            if !is_scope_name(&def.name) {
                return Err(CatalogueError::BadName(def.name.clone()));
            }
            if !seen.insert(def.name.as_str()) {
                return Err(CatalogueError::Duplicate(def.name.clone()));
            }
        }
        let index_of = |name: &str| defs.iter().position(|d| d.name == name);
        // Direct implications: configured ones plus X:write ⇒ X:read.
        let mut direct: Vec<Vec<usize>> = Vec::with_capacity(defs.len());
        for def in &defs {
            let mut targets = Vec::new();
            for implied in &def.implies {
                let target = index_of(implied).ok_or_else(|| CatalogueError::UnknownImplied {
                    scope: def.name.clone(),
                    implied: implied.clone(),
                })?;
                targets.push(target);
            }
            if let Some(resource) = def.name.strip_suffix(":write")
                && let Some(read) = index_of(&format!("{resource}:read"))
                && !targets.contains(&read)
            {
                targets.push(read);
            }
            direct.push(targets);
        }
        let mut entries = Vec::with_capacity(defs.len());
        for (i, def) in defs.iter().enumerate() {
            let mut grants = ScopeSet::default().with(i);
            let mut stack = vec![i];
            while let Some(j) = stack.pop() {
                for &k in &direct[j] {
                    if !grants.has(k) {
                        grants = grants.with(k);
                        stack.push(k);
                    }
                }
            }
            let implies = direct[i].iter().map(|&k| defs[k].name.clone()).collect();
            entries.push(Entry { def: def.clone(), grants, implies });
        }
        let mut catalogue = Self { entries, presets: Vec::new() };
        let mut preset_names = BTreeSet::new();
        for def in presets {
            if !preset_names.insert(def.name.clone()) {
                return Err(CatalogueError::BadPreset { preset: def.name, reason: "defined twice".into() });
            }
            let scopes = catalogue
                .parse_grant(&def.scopes)
                .map_err(|e| CatalogueError::BadPreset { preset: def.name.clone(), reason: e.to_string() })?;
            catalogue.presets.push(Preset { def, scopes });
        }
        Ok(catalogue)
    }

    /// The platform's catalogue and the integration table of its documentation.
    pub fn default_defs() -> (Vec<ScopeDef>, Vec<PresetDef>) {
        let scope = |name: &str, description: &str| ScopeDef {
            name: name.into(),
            description: description.into(),
            implies: Vec::new(),
        };
        let preset = |name: &str, display: &str, use_case: &str, scopes: &[&str]| PresetDef {
            name: name.into(),
            display_name: display.into(),
            use_case: use_case.into(),
            scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
        };
        (
            vec![
                scope("customer:read", "Read customer records"),
                scope("customer:write", "Create and update customer records"),
                scope("invoice:read", "Read invoices"),
                scope("invoice:write", "Create, send and update invoices"),
                scope("sales:read", "Read sales history and revenue"),
            ],
            vec![
                preset(
                    "openclaw_skill",
                    "OpenClaw Skill",
                    "AI agent sending invoices",
                    &["customer:write", "invoice:write", "sales:read"],
                ),
                preset(
                    "website_checkout",
                    "Website Checkout",
                    "E-commerce payment processing",
                    &["customer:write", "invoice:write"],
                ),
                preset(
                    "analytics_dashboard",
                    "Analytics Dashboard",
                    "Revenue reporting and analytics",
                    &["sales:read", "invoice:read"],
                ),
                preset(
                    "crm_integration",
                    "CRM Integration",
                    "Customer data synchronization",
                    &["customer:read", "customer:write", "invoice:read"],
                ),
            ],
        )
    }

    fn index(&self, name: &str) -> Option<usize> {
        self.entries.iter().position(|e| e.def.name == name)
    }

    fn valid_names(&self) -> String {
        self.entries.iter().map(|e| e.def.name.as_str()).collect::<Vec<_>>().join(", ")
    }

    /// Validates a key's requested scopes: known, exact case, no duplicates.
    pub fn parse_grant<S: AsRef<str>>(&self, requested: &[S]) -> Result<ScopeSet, ScopeError> {
        if requested.is_empty() {
            return Err(ScopeError::Empty);
        }
        if requested.len() > MAX_SCOPES_PER_KEY {
            return Err(ScopeError::TooMany);
        }
        let mut set = ScopeSet::default();
        let mut unknown = Vec::new();
        let mut duplicates = Vec::new();
        let mut case_hint = false;
        for name in requested {
            let name = name.as_ref();
            match self.index(name) {
                Some(i) if set.has(i) => duplicates.push(name),
                Some(i) => set = set.with(i),
                None => {
                    case_hint |= self.index(&name.to_lowercase()).is_some();
                    unknown.push(name);
                }
            }
        }
        if !unknown.is_empty() {
            return Err(ScopeError::Unknown {
                unknown: super::excerpts(&unknown, 5),
                hint: if case_hint { " (scopes are lowercase and case-sensitive)" } else { "" },
                valid: self.valid_names(),
            });
        }
        if !duplicates.is_empty() {
            return Err(ScopeError::Duplicate(super::excerpts(&duplicates, 5)));
        }
        Ok(set)
    }

    /// The scope Verify was asked to require, if it is in the catalogue.
    pub fn required(&self, name: &str) -> Option<ScopeSet> {
        self.index(name).map(|i| ScopeSet::default().with(i))
    }

    /// A stored grant, leniently: names no longer in the catalogue grant
    /// nothing, so shrinking the catalogue fails closed.
    pub fn from_stored<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> ScopeSet {
        names.into_iter().filter_map(|n| self.index(n)).fold(ScopeSet::default(), ScopeSet::with)
    }

    /// `granted` plus everything it implies.
    pub fn expand(&self, granted: ScopeSet) -> ScopeSet {
        self.entries
            .iter()
            .enumerate()
            .filter(|(i, _)| granted.has(*i))
            .fold(ScopeSet::default(), |acc, (_, e)| ScopeSet(acc.0 | e.grants.0))
    }

    /// Names of the scopes in `set`, in catalogue order.
    pub fn names(&self, set: ScopeSet) -> Vec<String> {
        self.entries
            .iter()
            .enumerate()
            .filter(|(i, _)| set.has(*i))
            .map(|(_, e)| e.def.name.clone())
            .collect()
    }

    pub fn preset(&self, name: &str) -> Option<&Preset> {
        self.presets.iter().find(|p| p.def.name == name)
    }

    pub fn presets(&self) -> &[Preset] {
        &self.presets
    }

    pub fn preset_names(&self) -> String {
        self.presets.iter().map(|p| p.def.name.as_str()).collect::<Vec<_>>().join(", ")
    }

    /// Catalogue entries with their direct implications, for ListScopes.
    pub fn scopes(&self) -> impl Iterator<Item = (&ScopeDef, &[String])> {
        self.entries.iter().map(|e| (&e.def, e.implies.as_slice()))
    }
}

impl Default for ScopeCatalogue {
    fn default() -> Self {
        let (defs, presets) = Self::default_defs();
        Self::new(defs, presets).unwrap_or_else(|e| unreachable!("default catalogue is valid: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(c: &ScopeCatalogue, set: ScopeSet) -> Vec<String> {
        c.names(set)
    }

    #[test]
    fn write_implies_read_and_listscopes_shows_it() {
        let c = ScopeCatalogue::default();
        let granted = c.parse_grant(&["invoice:write"]).unwrap();
        assert_eq!(names(&c, c.expand(granted)), ["invoice:read", "invoice:write"]);
        let implied: Vec<_> =
            c.scopes().filter(|(d, _)| d.name == "customer:write").map(|(_, i)| i.to_vec()).collect();
        assert_eq!(implied, [vec!["customer:read".to_owned()]]);
        assert!(c.scopes().filter(|(d, _)| d.name == "sales:read").all(|(_, i)| i.is_empty()));
    }

    #[test]
    fn read_does_not_imply_write() {
        let c = ScopeCatalogue::default();
        let granted = c.expand(c.parse_grant(&["invoice:read"]).unwrap());
        assert!(!granted.contains(c.required("invoice:write").unwrap()));
        assert!(granted.contains(c.required("invoice:read").unwrap()));
    }

    #[test]
    fn presets_match_the_integration_table_exactly() {
        let c = ScopeCatalogue::default();
        let scopes = |p: &str| names(&c, c.preset(p).unwrap().scopes);
        assert_eq!(scopes("openclaw_skill"), ["customer:write", "invoice:write", "sales:read"]);
        assert_eq!(scopes("website_checkout"), ["customer:write", "invoice:write"]);
        assert_eq!(scopes("analytics_dashboard"), ["invoice:read", "sales:read"]);
        assert_eq!(scopes("crm_integration"), ["customer:read", "customer:write", "invoice:read"]);
        assert_eq!(c.presets().len(), 4);
    }

    #[test]
    fn unknown_wrong_case_and_duplicate_scopes_are_named() {
        let c = ScopeCatalogue::default();
        let err = c.parse_grant(&["invoice:read", "Invoice:Write"]).unwrap_err().to_string();
        assert!(err.contains("\"Invoice:Write\""), "{err}");
        assert!(err.contains("case-sensitive"), "{err}");
        assert!(err.contains("customer:read, customer:write"), "{err}");
        let err = c.parse_grant(&["payments:refund"]).unwrap_err().to_string();
        assert!(err.contains("payments:refund") && !err.contains("case-sensitive"), "{err}");
        let err = c.parse_grant(&["sales:read", "sales:read"]).unwrap_err();
        assert_eq!(err, ScopeError::Duplicate("\"sales:read\"".into()));
        // Many long unknown names: five excerpts and a count.
        let many: Vec<String> = (0..1000).map(|i| format!("{i}{}", "y".repeat(10_000))).collect();
        let err = c.parse_grant(&many[..MAX_SCOPES_PER_KEY.min(many.len())]).unwrap_err().to_string();
        assert!(
            err.len() < 2048 && err.contains("more"),
            "{} bytes: {}",
            err.len(),
            &err[..err.len().min(300)]
        );
        assert_eq!(c.parse_grant::<&str>(&[]).unwrap_err(), ScopeError::Empty);
    }

    #[test]
    fn configured_implications_are_transitive() {
        let def = |n: &str, i: &[&str]| ScopeDef {
            name: n.into(),
            description: String::new(),
            implies: i.iter().map(|s| (*s).to_owned()).collect(),
        };
        let c = ScopeCatalogue::new(
            vec![def("a:admin", &["a:write"]), def("a:write", &[]), def("a:read", &[])],
            vec![],
        )
        .unwrap();
        let all = c.expand(c.parse_grant(&["a:admin"]).unwrap());
        assert_eq!(names(&c, all), ["a:admin", "a:write", "a:read"]);
    }

    #[test]
    fn bad_catalogues_are_refused() {
        let def = |n: &str| ScopeDef { name: n.into(), description: String::new(), implies: vec![] };
        assert!(matches!(
            ScopeCatalogue::new(vec![def("Bad:Name")], vec![]),
            Err(CatalogueError::BadName(_))
        ));
        assert!(matches!(
            ScopeCatalogue::new(vec![def("a:b"), def("a:b")], vec![]),
            Err(CatalogueError::Duplicate(_))
        ));
        let preset = PresetDef {
            name: "p".into(),
            display_name: String::new(),
            use_case: String::new(),
            scopes: vec!["x:y".into()],
        };
        assert!(matches!(
            ScopeCatalogue::new(vec![def("a:b")], vec![preset]),
            Err(CatalogueError::BadPreset { .. })
        ));
    }

    #[test]
    fn stored_names_outside_the_catalogue_grant_nothing() {
        let c = ScopeCatalogue::default();
        assert!(c.from_stored(["gone:read"]).is_empty());
        assert_eq!(names(&c, c.from_stored(["sales:read", "gone:read"])), ["sales:read"]);
    }

    #[test]
    fn scope_name_shape() {
        for ok in ["a:b", "invoice:write", "sales_v2:read"] {
            assert!(is_scope_name(ok), "{ok}");
        }
        for bad in ["", "a", ":b", "a:", "A:b", "a:b:c", "a b:c", "1a:b"] {
            assert!(!is_scope_name(bad), "{bad}");
        }
    }
}
