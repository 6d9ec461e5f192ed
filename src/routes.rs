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
//!
//! Requests are matched in one form only ([`canonical`]): a path another
//! server could read as a different path (`..`, `%2e`, `%2F`, `//`,
//! `%69`) is refused as [`Requirement::Malformed`], never matched raw, so
//! a route's scope cannot be sidestepped by spelling. One trailing slash
//! is dropped; matching is case-sensitive.

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
    /// The request is not in canonical form: refused whatever the table.
    Malformed(NotCanonical),
}

/// Why a request is not in the one form routes are matched in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum NotCanonical {
    #[error("the method is not an HTTP method token in capitals")]
    Method,
    #[error("the path does not start with '/'")]
    Relative,
    #[error("the path has a '.' or '..' segment")]
    DotSegment,
    #[error("the path has an empty segment")]
    EmptySegment,
    #[error("the path has an encoded '/' or '\\', or a '\\'")]
    Separator,
    #[error("the path percent-encodes an unreserved character")]
    EncodedUnreserved,
    #[error("the path has a malformed percent-escape or a character not allowed in a path")]
    BadCharacter,
}

/// The path a request is matched by: its target without query or fragment,
/// with one trailing slash dropped; or why the request is refused. A path
/// is canonical when no normalising server or proxy would read it as
/// another path: no `.` or `..` segment (plain or percent-encoded), no
/// empty segment, no `\` or encoded `/` or `\`, no percent-escape of an
/// unreserved character, and nothing outside RFC 3986's path characters.
/// The method must be an HTTP token in capitals.
pub fn canonical<'a>(method: &str, target: &'a str) -> Result<&'a str, NotCanonical> {
    let tchar = |b: u8| b.is_ascii_uppercase() || b.is_ascii_digit() || b"!#$%&'*+-.^_`|~".contains(&b);
    if method.is_empty() || method.len() > MAX_METHOD || !method.bytes().all(tchar) {
        return Err(NotCanonical::Method);
    }
    let path = strip_query(target);
    let Some(rest) = path.strip_prefix('/') else { return Err(NotCanonical::Relative) };
    let segments: Vec<&str> = rest.split('/').collect();
    let last = segments.len() - 1;
    for (i, segment) in segments.iter().enumerate() {
        if segment.is_empty() {
            // Only the last may be empty: "/" itself, or one trailing slash.
            if i == last { continue } else { return Err(NotCanonical::EmptySegment) }
        }
        check_segment(segment)?;
    }
    Ok(if path.len() > 1 { path.strip_suffix('/').unwrap_or(path) } else { path })
}

/// One non-empty path segment: RFC 3986 `pchar`s, no dot segment however
/// spelled, no encoded separator, no needless escape.
fn check_segment(segment: &str) -> Result<(), NotCanonical> {
    let bytes = segment.as_bytes();
    let (mut decoded_dots, mut decoded_len, mut needless_escape) = (0, 0, false);
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        decoded_len += 1;
        if b == b'%' {
            let hex = |b: u8| char::from(b).to_digit(16);
            let (Some(hi), Some(lo)) =
                (bytes.get(i + 1).and_then(|&b| hex(b)), bytes.get(i + 2).and_then(|&b| hex(b)))
            else {
                return Err(NotCanonical::BadCharacter);
            };
            let value = u8::try_from(hi * 16 + lo).unwrap_or(0);
            if value == b'/' || value == b'\\' {
                return Err(NotCanonical::Separator);
            }
            if value == b'.' {
                decoded_dots += 1;
            }
            needless_escape |= value.is_ascii_alphanumeric() || b"-._~".contains(&value);
            i += 3;
            continue;
        }
        if b == b'\\' {
            return Err(NotCanonical::Separator);
        }
        let pchar = b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@".contains(&b);
        if !pchar {
            return Err(NotCanonical::BadCharacter);
        }
        if b == b'.' {
            decoded_dots += 1;
        }
        i += 1;
    }
    if decoded_dots == decoded_len && decoded_len <= 2 {
        return Err(NotCanonical::DotSegment);
    }
    if needless_escape {
        return Err(NotCanonical::EncodedUnreserved);
    }
    Ok(())
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
    /// the unmatched mode; [`Requirement::Malformed`] for a request not in
    /// [`canonical`] form. The query string and fragment are ignored.
    pub fn requirement(&self, method: &str, path: &str) -> Requirement<'_> {
        let path = match canonical(method, path) {
            Ok(path) => path,
            Err(why) => return Requirement::Malformed(why),
        };
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
    let mut parts: Vec<&str> = rest.split('/').collect();
    // One trailing slash is dropped, as it is from requests.
    if parts.len() > 1 && parts.last() == Some(&"") {
        parts.pop();
    }
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
            "" if last > 0 => Err(format!("path {:?} has an empty segment", shown())),
            // The root, "/".
            "" => Ok(Segment::Literal("".into())),
            // Requests are matched in canonical form only: a literal that is
            // not could never match.
            s => match check_segment(s) {
                Ok(()) => Ok(Segment::Literal(s.into())),
                Err(why) => Err(format!("path {:?}: segment {s:?}: {why}", shown())),
            },
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
            Requirement::Malformed(why) => Some(format!("<malformed: {why}>")),
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

    #[test]
    fn only_canonical_requests_are_matched_and_the_rest_are_refused() {
        let t = table(EXAMPLE);
        let open = table(&EXAMPLE.replace("\"deny\"", "\"authenticate\""));
        let refused = |t: &RouteTable, method: &str, path: &str| match t.requirement(method, path) {
            Requirement::Malformed(why) => why,
            other => panic!("{method} {path} was matched: {other:?}"),
        };
        // Each of these would reach the invoices route behind a server that
        // normalises paths, with only a sales:read key.
        for (path, why) in [
            ("/public/api/v1/sales/../invoices", NotCanonical::DotSegment),
            ("/public/api/v1/sales/%2e%2e/invoices", NotCanonical::DotSegment),
            ("/public/api/v1/sales/%2E./invoices", NotCanonical::DotSegment),
            ("/public/api/v1/sales/..%2Finvoices", NotCanonical::Separator),
            ("/public/api/v1/sales/./../invoices", NotCanonical::DotSegment),
            ("/public/api/v1/sales/.", NotCanonical::DotSegment),
            ("/public/api/v1/sales/..%5cinvoices", NotCanonical::Separator),
            ("/public/api/v1/sales\\..\\invoices", NotCanonical::Separator),
            ("/public//api/v1/invoices", NotCanonical::EmptySegment),
            ("//public/api/v1/invoices", NotCanonical::EmptySegment),
            ("/public/api/v1/%69nvoices", NotCanonical::EncodedUnreserved),
            ("/public/api/v1/sales/%7e", NotCanonical::EncodedUnreserved),
            ("/public/api/v1/sales/%zz", NotCanonical::BadCharacter),
            ("/public/api/v1/sales/%2", NotCanonical::BadCharacter),
            ("/public/api/v1/sales/a b", NotCanonical::BadCharacter),
            ("/public/api/v1/sales/é", NotCanonical::BadCharacter),
            ("public/api/v1/sales", NotCanonical::Relative),
            ("", NotCanonical::Relative),
        ] {
            assert_eq!(refused(&t, "POST", path), why, "{path}");
            assert_eq!(refused(&open, "POST", path), why, "{path}");
        }
        for method in ["post", "Post", "", "GET ", "G\u{0}T", &"A".repeat(MAX_METHOD + 1)] {
            assert_eq!(refused(&open, method, "/public/api/v1/invoices"), NotCanonical::Method, "{method:?}");
        }
        // Case-sensitive, so /PUBLIC is simply another path.
        assert_eq!(t.requirement("POST", "/PUBLIC/api/v1/invoices"), Requirement::Denied);
        // Reserved characters stay escaped and match nothing they spell.
        assert_eq!(scope_of(&t, "GET", "/public/api/v1/invoices/a%20b").as_deref(), Some("invoice:read"));
        assert_eq!(scope_of(&t, "GET", "/public/api/v1/invoices/...").as_deref(), Some("invoice:read"));
        // One trailing slash matches the route without it; two do not.
        assert_eq!(scope_of(&t, "POST", "/public/api/v1/invoices/").as_deref(), Some("invoice:write"));
        assert!(matches!(t.requirement("POST", "/public/api/v1/invoices//"), Requirement::Malformed(_)));
        assert_eq!(canonical("GET", "/").unwrap(), "/");
        assert_eq!(canonical("GET", "/a/?x=../..").unwrap(), "/a");
        // A pattern's trailing slash is dropped too; a pattern that could
        // never match a canonical path is refused.
        let slash = table(
            "unmatched = \"deny\"\n[[route]]\nmethod = \"GET\"\npath = \"/a/\"\nscope = \"sales:read\"\n",
        );
        assert_eq!(scope_of(&slash, "GET", "/a").as_deref(), Some("sales:read"));
        for bad in ["/a/../b", "/a/%41", "/a//", "/a/./b"] {
            assert!(parse_pattern(bad).is_err(), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn a_path_holding_a_dot_segment_however_spelled_is_never_matched(
            before in proptest::collection::vec("[a-z0-9]{1,6}", 0..4),
            dots in prop_oneof![Just("."), Just(".."), Just("%2e"), Just("%2E"), Just(".%2e"), Just("%2e%2E"), Just("%2E.")],
            after in proptest::collection::vec("[a-z0-9]{1,6}", 0..4),
        ) {
            let open = table(&EXAMPLE.replace("\"deny\"", "\"authenticate\""));
            let path = format!("/{}", before.into_iter().chain([dots.to_owned()]).chain(after).collect::<Vec<_>>().join("/"));
            prop_assert!(matches!(open.requirement("GET", &path), Requirement::Malformed(_)), "{}", path);
        }

        #[test]
        fn canonical_never_panics_and_its_answer_is_a_prefix_of_the_target(method in "\\PC{0,8}", target in "\\PC{0,60}") {
            if let Ok(path) = canonical(&method, &target) {
                prop_assert!(target.starts_with(path));
                prop_assert!(path.starts_with('/'));
                prop_assert!(path == "/" || !path.ends_with('/'));
            }
        }

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
        fn a_rest_route_matches_every_suffix_and_nothing_else(prefix in "[a-z]{1,8}", suffix in "(/[a-z0-9]{1,8}){0,5}/?", other in "[a-z]{1,8}") {
            let t = table(&format!("unmatched = \"deny\"\n[[route]]\nmethod = \"*\"\npath = \"/{prefix}/**\"\nscope = \"sales:read\"\n"));
            prop_assert_eq!(scope_of(&t, "GET", &format!("/{prefix}{suffix}")), Some("sales:read".to_owned()));
            prop_assume!(other != prefix);
            prop_assert_eq!(scope_of(&t, "GET", &format!("/{other}{suffix}")), None);
        }
    }
}
