//! The gateway's route table: which scope an HTTP request needs, read from
//! `KEYWARDEN_ROUTES_FILE`. Free of I/O but for [`RouteTable::load`].
//!
//! ```toml
//! unmatched = "deny"            # or "authenticate": any valid key, no scope
//! [[route]]
//! method = "GET"                # an HTTP method, or "*"
//! path = "/public/api/v1/invoices/{id}"   # {name}: one segment
//! scope = "invoice:read"
//! [[route]]
//! method = "*"
//! path = "/public/api/v1/sales/**"        # ** last: any suffix
//! scope = "sales:read"
//! ```
//!
//! The first matching route wins; the query string is ignored. A file with
//! an unknown scope, a bad pattern or a duplicate route is refused with
//! the line at fault.

use std::{collections::HashSet, fmt, path::Path, sync::Arc};

use serde::Deserialize;
use thiserror::Error;

use crate::keys::{ScopeCatalogue, ScopeSet};

/// Longest path pattern, and most segments in one.
const MAX_PATTERN: usize = 1024;
const MAX_SEGMENTS: usize = 64;
/// Most routes in one table.
pub const MAX_ROUTES: usize = 10_000;
/// Longest HTTP method token.
const MAX_METHOD: usize = 32;

/// What a request that matches no route gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unmatched {
    /// 403: no route, no access.
    Deny,
    /// Any valid key, no scope required.
    Authenticate,
}

/// One segment of a path pattern.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Segment {
    Literal(Box<str>),
    /// `{name}`: exactly one non-empty segment.
    Param,
    /// `**` as the last segment: any suffix, including none.
    Rest,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Method {
    Any,
    Exactly(Box<str>),
}

/// A route: method, path pattern and the scope it requires.
#[derive(Debug, Clone)]
pub struct Route {
    method: Method,
    segments: Vec<Segment>,
    /// As written, for logs and audit rows.
    pattern: Box<str>,
    scope_name: Box<str>,
    scope: ScopeSet,
}

impl Route {
    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    pub fn scope_name(&self) -> &str {
        &self.scope_name
    }

    fn matches(&self, method: &str, path: &[&str]) -> bool {
        let method_ok = match &self.method {
            Method::Any => true,
            Method::Exactly(m) => **m == *method,
        };
        method_ok && segments_match(&self.segments, path)
    }
}

fn segments_match(pattern: &[Segment], path: &[&str]) -> bool {
    match (pattern.split_first(), path.split_first()) {
        (Some((Segment::Rest, _)), _) => true,
        (None, None) => true,
        (Some((Segment::Literal(l), p)), Some((s, rest))) if **l == **s => segments_match(p, rest),
        (Some((Segment::Param, p)), Some((s, rest))) if !s.is_empty() => segments_match(p, rest),
        _ => false,
    }
}

/// What a request needs, by the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement<'a> {
    /// A matching route: its scope (and the route, for the audit row).
    Scope { scope: ScopeSet, scope_name: &'a str, pattern: &'a str },
    /// No route matched and `unmatched = "authenticate"`.
    AnyValidKey,
    /// No route matched and `unmatched = "deny"`.
    Denied,
}

/// A validated route table. Cheap to share; replaced whole on reload.
#[derive(Debug, Clone)]
pub struct RouteTable {
    routes: Arc<[Route]>,
    unmatched: Unmatched,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum RoutesError {
    #[error("line {line}: {what}")]
    At { line: usize, what: String },
    #[error("{0}")]
    File(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTable {
    unmatched: toml::Spanned<Unmatched>,
    #[serde(default, rename = "route")]
    routes: Vec<RawRoute>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    method: toml::Spanned<String>,
    path: toml::Spanned<String>,
    scope: toml::Spanned<String>,
}

/// The 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())].iter().filter(|b| **b == b'\n').count() + 1
}

impl RouteTable {
    /// Reads and validates `path`.
    pub fn load(path: &Path, catalogue: &ScopeCatalogue) -> Result<Self, RoutesError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| RoutesError::File(format!("cannot read {}: {e}", path.display())))?;
        Self::parse(&text, catalogue)
    }

    /// Validates a table's TOML text against the scope catalogue.
    pub fn parse(text: &str, catalogue: &ScopeCatalogue) -> Result<Self, RoutesError> {
        let raw: RawTable = toml::from_str(text).map_err(|e| match e.span() {
            Some(span) => RoutesError::At { line: line_of(text, span.start), what: e.message().to_owned() },
            None => RoutesError::File(e.message().to_owned()),
        })?;
        if raw.routes.len() > MAX_ROUTES {
            return Err(RoutesError::File(format!("at most {MAX_ROUTES} routes")));
        }
        let at = |span: std::ops::Range<usize>, what: String| RoutesError::At {
            line: line_of(text, span.start),
            what,
        };
        let mut seen: HashSet<(Method, Vec<Segment>)> = HashSet::new();
        let mut routes = Vec::with_capacity(raw.routes.len());
        for raw in raw.routes {
            let method = parse_method(raw.method.get_ref()).map_err(|what| at(raw.method.span(), what))?;
            let segments = parse_pattern(raw.path.get_ref()).map_err(|what| at(raw.path.span(), what))?;
            let scope = catalogue.required(raw.scope.get_ref()).ok_or_else(|| {
                at(
                    raw.scope.span(),
                    format!("unknown scope {:?}", raw.scope.get_ref().chars().take(64).collect::<String>()),
                )
            })?;
            if !seen.insert((method.clone(), segments.clone())) {
                return Err(at(
                    raw.method.span(),
                    format!("duplicate route {} {}", raw.method.get_ref(), raw.path.get_ref()),
                ));
            }
            routes.push(Route {
                method,
                segments,
                pattern: raw.path.into_inner().into(),
                scope_name: raw.scope.into_inner().into(),
                scope,
            });
        }
        Ok(Self { routes: routes.into(), unmatched: raw.unmatched.into_inner() })
    }

    /// What `method` on `path` needs: the first matching route's scope, or
    /// the unmatched mode. The query string and fragment are ignored.
    pub fn requirement(&self, method: &str, path: &str) -> Requirement<'_> {
        let path = strip_query(path);
        let segments: Vec<&str> =
            path.strip_prefix('/').unwrap_or(path).split('/').take(MAX_SEGMENTS + 1).collect();
        match self.routes.iter().find(|r| r.matches(method, &segments)) {
            Some(r) => Requirement::Scope { scope: r.scope, scope_name: &r.scope_name, pattern: &r.pattern },
            None => match self.unmatched {
                Unmatched::Deny => Requirement::Denied,
                Unmatched::Authenticate => Requirement::AnyValidKey,
            },
        }
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

/// A request path without its query string or fragment.
pub fn strip_query(path: &str) -> &str {
    path.split(['?', '#']).next().unwrap_or(path)
}

fn parse_method(m: &str) -> Result<Method, String> {
    if m == "*" {
        return Ok(Method::Any);
    }
    if m.is_empty() || m.len() > MAX_METHOD || !m.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(format!(
            "method {:?} is not an HTTP method in capitals (GET, POST, ...) or \"*\"",
            m.chars().take(MAX_METHOD).collect::<String>()
        ));
    }
    Ok(Method::Exactly(m.into()))
}

fn parse_pattern(p: &str) -> Result<Vec<Segment>, String> {
    let shown = || p.chars().take(64).collect::<String>();
    if p.len() > MAX_PATTERN {
        return Err(format!("path is longer than {MAX_PATTERN} bytes"));
    }
    let Some(rest) = p.strip_prefix('/') else {
        return Err(format!("path {:?} must start with '/'", shown()));
    };
    if p.contains(['?', '#']) {
        return Err(format!("path {:?} must not hold a query or fragment (they are ignored)", shown()));
    }
    let parts: Vec<&str> = rest.split('/').collect();
    if parts.len() > MAX_SEGMENTS {
        return Err(format!("path has more than {MAX_SEGMENTS} segments"));
    }
    let last = parts.len() - 1;
    parts
        .iter()
        .enumerate()
        .map(|(i, part)| match *part {
            "**" if i == last => Ok(Segment::Rest),
            "**" => Err(format!("path {:?}: '**' may only be the last segment", shown())),
            s if s.starts_with('{') && s.ends_with('}') && s.len() > 2 => {
                let name = &s[1..s.len() - 1];
                let ok = name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
                if ok { Ok(Segment::Param) } else { Err(format!("path {:?}: bad parameter {s:?}", shown())) }
            }
            s if s.contains(['{', '}', '*']) => {
                Err(format!("path {:?}: segment {s:?} mixes text with '{{', '}}' or '*'", shown()))
            }
            "" if i != last => Err(format!("path {:?} has an empty segment", shown())),
            s => Ok(Segment::Literal(s.into())),
        })
        .collect()
}

impl fmt::Display for Unmatched {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Deny => "deny",
            Self::Authenticate => "authenticate",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const EXAMPLE: &str = r#"
unmatched = "deny"
[[route]]
method = "POST"
path = "/public/api/v1/invoices"
scope = "invoice:write"
[[route]]
method = "GET"
path = "/public/api/v1/invoices/{id}"
scope = "invoice:read"
[[route]]
method = "*"
path = "/public/api/v1/sales/**"
scope = "sales:read"
[[route]]
method = "*"
path = "/public/api/v1/invoices/{id}"
scope = "invoice:write"
"#;

    fn table(text: &str) -> RouteTable {
        RouteTable::parse(text, &ScopeCatalogue::default()).unwrap()
    }

    fn scope_of(t: &RouteTable, method: &str, path: &str) -> Option<String> {
        match t.requirement(method, path) {
            Requirement::Scope { scope_name, .. } => Some(scope_name.to_owned()),
            Requirement::AnyValidKey => Some("<any>".into()),
            Requirement::Denied => None,
        }
    }

    #[test]
    fn literal_param_rest_and_any_method_routes_match_first_wins() {
        let t = table(EXAMPLE);
        assert_eq!(scope_of(&t, "POST", "/public/api/v1/invoices").as_deref(), Some("invoice:write"));
        assert_eq!(scope_of(&t, "GET", "/public/api/v1/invoices").as_deref(), None);
        assert_eq!(scope_of(&t, "GET", "/public/api/v1/invoices/42?x=1").as_deref(), Some("invoice:read"));
        // First match wins: GET hits the earlier {id} route, PUT the later "*".
        assert_eq!(scope_of(&t, "PUT", "/public/api/v1/invoices/42").as_deref(), Some("invoice:write"));
        assert_eq!(
            scope_of(&t, "GET", "/public/api/v1/invoices/").as_deref(),
            None,
            "{{id}} needs a segment"
        );
        assert_eq!(scope_of(&t, "GET", "/public/api/v1/invoices/42/lines").as_deref(), None);
        for path in ["/public/api/v1/sales", "/public/api/v1/sales/", "/public/api/v1/sales/2026/q4"] {
            assert_eq!(scope_of(&t, "DELETE", path).as_deref(), Some("sales:read"), "{path}");
        }
        assert_eq!(scope_of(&t, "GET", "/public/api/v1/salesx").as_deref(), None);
        let open = table(&EXAMPLE.replace("\"deny\"", "\"authenticate\""));
        assert_eq!(scope_of(&open, "GET", "/elsewhere").as_deref(), Some("<any>"));
    }

    #[test]
    fn bad_files_are_refused_naming_the_line() {
        let refused = |text: &str| RouteTable::parse(text, &ScopeCatalogue::default()).unwrap_err();
        let unknown = refused(&EXAMPLE.replace("sales:read", "sales:reed"));
        assert_eq!(unknown, RoutesError::At { line: 14, what: "unknown scope \"sales:reed\"".into() });
        let pattern = refused(&EXAMPLE.replace("/public/api/v1/sales/**", "/public/**/sales"));
        assert!(
            matches!(&pattern, RoutesError::At { line: 13, what } if what.contains("last segment")),
            "{pattern}"
        );
        let duplicate = refused(&format!(
            "{EXAMPLE}[[route]]\nmethod = \"GET\"\npath = \"/public/api/v1/invoices/{{other}}\"\nscope = \"sales:read\"\n"
        ));
        assert!(
            matches!(&duplicate, RoutesError::At { line: 20, what } if what.starts_with("duplicate route")),
            "{duplicate}"
        );
        let method = refused(&EXAMPLE.replace("\"POST\"", "\"post\""));
        assert!(matches!(&method, RoutesError::At { line: 4, .. }), "{method}");
        let mode = refused(&EXAMPLE.replace("\"deny\"", "\"allow\""));
        assert!(matches!(&mode, RoutesError::At { line: 2, .. }), "{mode}");
        for bad in ["relative/path", "/a//b", "/a/{}/b", "/a/x{id}", "/a?b=1", "/a/{i-d}"] {
            assert!(parse_pattern(bad).is_err(), "{bad}");
        }
        assert!(matches!(
            refused("[[route]]\nmethod=\"GET\"\npath=\"/\"\nscope=\"sales:read\"\n"),
            RoutesError::File(_) | RoutesError::At { .. }
        ));
    }

    proptest! {
        #[test]
        fn any_file_parses_or_is_refused_without_panic(text in ".{0,400}") {
            let _ = RouteTable::parse(&text, &ScopeCatalogue::default());
        }

        #[test]
        fn a_literal_route_matches_exactly_its_path(segs in proptest::collection::vec("[a-z0-9]{1,8}", 1..6), extra in "[a-z0-9]{1,8}") {
            let path = format!("/{}", segs.join("/"));
            let t = table(&format!("unmatched = \"deny\"\n[[route]]\nmethod = \"GET\"\npath = \"{path}\"\nscope = \"sales:read\"\n"));
            prop_assert_eq!(scope_of(&t, "GET", &path), Some("sales:read".to_owned()));
            prop_assert_eq!(scope_of(&t, "GET", &format!("{path}?q={extra}")), Some("sales:read".to_owned()));
            prop_assert_eq!(scope_of(&t, "POST", &path), None);
            prop_assert_eq!(scope_of(&t, "GET", &format!("{path}/{extra}")), None);
        }

        #[test]
        fn a_rest_route_matches_every_suffix_and_nothing_else(prefix in "[a-z]{1,8}", suffix in "(/[a-z0-9]{0,8}){0,5}", other in "[a-z]{1,8}") {
            let t = table(&format!("unmatched = \"deny\"\n[[route]]\nmethod = \"*\"\npath = \"/{prefix}/**\"\nscope = \"sales:read\"\n"));
            prop_assert_eq!(scope_of(&t, "GET", &format!("/{prefix}{suffix}")), Some("sales:read".to_owned()));
            prop_assume!(other != prefix);
            prop_assert_eq!(scope_of(&t, "GET", &format!("/{other}{suffix}")), None);
        }
    }
}
