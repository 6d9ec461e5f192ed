//! A key's metadata: a few labels an integrator attaches to a key (a plan,
//! an environment, an owning team) and reads back on every Verify. It is
//! carried, stored and shown, and never used in a decision.

use std::{collections::BTreeMap, sync::Arc};

use super::excerpt;

/// Most entries one key may carry.
pub const MAX_ENTRIES: usize = 16;
/// Longest entry name.
pub const MAX_NAME: usize = 64;
/// Longest value, in bytes.
pub const MAX_VALUE_BYTES: usize = 512;
/// Most bytes of names and values together.
pub const MAX_TOTAL_BYTES: usize = 4096;

/// What is wrong with one entry, or with the map as a whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct MetadataError {
    /// `metadata` or `metadata["name"]`.
    pub field: String,
    pub problem: String,
}

/// Validated entries, ordered by name, shared cheaply by cached copies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metadata(Arc<BTreeMap<String, String>>);

impl Metadata {
    /// Validates entries as a request gave them, naming each bad one.
    pub fn new(entries: impl IntoIterator<Item = (String, String)>) -> Result<Self, Vec<MetadataError>> {
        let mut errors = Vec::new();
        let mut map = BTreeMap::new();
        let mut total = 0usize;
        for (count, (name, value)) in entries.into_iter().enumerate() {
            if count == MAX_ENTRIES {
                // Nothing past the limit is looked at: the work stays bounded.
                errors.push(MetadataError {
                    field: "metadata".into(),
                    problem: format!("at most {MAX_ENTRIES} entries per key"),
                });
                break;
            }
            let field = format!("metadata[{}]", excerpt(&name, MAX_NAME));
            if let Err(problem) = check_name(&name) {
                errors.push(MetadataError { field: field.clone(), problem });
            }
            if let Err(problem) = check_value(&value) {
                errors.push(MetadataError { field, problem });
            }
            total += name.len() + value.len();
            map.insert(name, value);
        }
        if errors.is_empty() && total > MAX_TOTAL_BYTES {
            errors.push(MetadataError {
                field: "metadata".into(),
                problem: format!("at most {MAX_TOTAL_BYTES} bytes of names and values in all (got {total})"),
            });
        }
        if errors.is_empty() { Ok(Self(Arc::new(map))) } else { Err(errors) }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The entries whose values can travel as HTTP header values unchanged:
    /// printable ASCII only.
    pub fn header_safe(&self) -> impl Iterator<Item = (&str, &str)> {
        self.iter().filter(|(_, v)| v.bytes().all(|b| (0x20..0x7f).contains(&b)))
    }

    /// The stored form: a JSON object, names in order.
    pub fn to_stored(&self) -> String {
        serde_json::to_string(&*self.0).unwrap_or_else(|_| "{}".to_owned())
    }

    /// Reads the stored form back, checking it as a request's would be:
    /// a row that breaks the rules is corrupt, not trusted.
    pub fn from_stored(s: &str) -> Result<Self, String> {
        let map: BTreeMap<String, String> = serde_json::from_str(s).map_err(|e| e.to_string())?;
        Self::new(map)
            .map_err(|errors| errors.into_iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))
    }

    /// The entries as a JSON object, for events.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::Value::Object(
            self.iter().map(|(k, v)| (k.to_owned(), serde_json::Value::from(v))).collect(),
        )
    }
}

/// `[a-z0-9][a-z0-9_-]{0,63}`: a name that is also a valid header name.
fn check_name(name: &str) -> Result<(), String> {
    let b = name.as_bytes();
    let lead = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    let ok = !b.is_empty()
        && b.len() <= MAX_NAME
        && lead(b[0])
        && b[1..].iter().all(|&c| lead(c) || c == b'_' || c == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!("names are 1 to {MAX_NAME} of a-z, 0-9, '_' and '-', starting with a letter or digit"))
    }
}

/// At most [`MAX_VALUE_BYTES`] of printable UTF-8: no control characters.
fn check_value(value: &str) -> Result<(), String> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(format!("values are at most {MAX_VALUE_BYTES} bytes (got {})", value.len()));
    }
    if value.chars().any(char::is_control) {
        return Err("values are printable text: no control characters".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use proptest::prelude::*;

    fn entries(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    fn fields(pairs: &[(&str, &str)]) -> Vec<String> {
        Metadata::new(entries(pairs)).unwrap_err().into_iter().map(|e| e.field).collect()
    }

    #[test]
    fn accepts_the_documented_shapes_and_keeps_names_in_order() {
        let m =
            Metadata::new(entries(&[("tier", "gold"), ("0env", "prod"), ("team_a-b", "Zahlungsverkehr ü")]))
                .unwrap();
        let names: Vec<&str> = m.iter().map(|(k, _)| k).collect();
        assert_eq!(names, ["0env", "team_a-b", "tier"]);
        assert_eq!(Metadata::from_stored(&m.to_stored()).unwrap(), m);
        let safe: Vec<&str> = m.header_safe().map(|(k, _)| k).collect();
        assert_eq!(safe, ["0env", "tier"], "a non-ASCII value is not sent as a header");
    }

    #[test]
    fn each_limit_is_refused_naming_the_entry() {
        assert_eq!(fields(&[("Tier", "x")]), ["metadata[\"Tier\"]"]);
        assert_eq!(fields(&[("_x", "x")]), ["metadata[\"_x\"]"]);
        assert_eq!(fields(&[("", "x")]), ["metadata[\"\"]"]);
        assert_eq!(fields(&[(&"a".repeat(65), "x")]).len(), 1);
        assert!(Metadata::new(entries(&[(&"a".repeat(64), "x")])).is_ok());
        assert_eq!(fields(&[("ok", "line\nbreak")]), ["metadata[\"ok\"]"]);
        assert_eq!(fields(&[("ok", &"v".repeat(513))]), ["metadata[\"ok\"]"]);
        assert!(Metadata::new(entries(&[("ok", &"v".repeat(512))])).is_ok());
        let seventeen: Vec<(String, String)> = (0..17).map(|i| (format!("k{i}"), "v".into())).collect();
        assert_eq!(
            Metadata::new(seventeen).unwrap_err().last().unwrap().field,
            "metadata",
            "the seventeenth entry is refused as the map's"
        );
        let big: Vec<(String, String)> = (0..9).map(|i| (format!("k{i}"), "v".repeat(500))).collect();
        let errors = Metadata::new(big).unwrap_err();
        assert_eq!(errors.len(), 1);
        assert!(errors[0].problem.contains("4096"), "{}", errors[0].problem);
    }

    #[test]
    fn a_stored_value_that_breaks_the_rules_is_corrupt() {
        assert!(Metadata::from_stored(r#"{"BAD":"x"}"#).is_err());
        assert!(Metadata::from_stored("[1]").is_err());
        assert!(Metadata::from_stored("{}").unwrap().is_empty());
    }

    proptest! {
        #[test]
        fn any_input_is_accepted_only_within_the_limits(
            pairs in proptest::collection::vec((".{0,70}", ".{0,600}"), 0..20)
        ) {
            if let Ok(m) = Metadata::new(pairs) {
                prop_assert!(m.iter().count() <= MAX_ENTRIES);
                let mut total = 0;
                for (k, v) in m.iter() {
                    prop_assert!(check_name(k).is_ok());
                    prop_assert!(v.len() <= MAX_VALUE_BYTES && !v.chars().any(char::is_control));
                    total += k.len() + v.len();
                }
                prop_assert!(total <= MAX_TOTAL_BYTES);
                prop_assert_eq!(Metadata::from_stored(&m.to_stored()).unwrap(), m);
            }
        }
    }
}
