//! The gateway's route table: the input is a route file, then (after a NUL)
//! a method and (after another) a request path. Any file is accepted or
//! refused with a line number, never a panic; an accepted table answers any
//! request, the query string never changes the answer, and no path another
//! server could read differently (a dot or empty segment, an encoded
//! separator) is ever matched.
#![no_main]

use keywarden::{
    keys::ScopeCatalogue,
    routes::{Requirement, RouteTable, RoutesError},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut parts = text.splitn(3, '\0');
    let (file, method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or("GET"), parts.next().unwrap_or("/"));
    match RouteTable::parse(file, &ScopeCatalogue::default()) {
        Ok(table) => {
            let bare = table.requirement(method, path);
            let with_query = format!("{}?q=1", keywarden::routes::strip_query(path));
            assert_eq!(bare, table.requirement(method, &with_query), "the query string changed the answer");
            if !matches!(bare, Requirement::Malformed(_)) {
                let target = keywarden::routes::strip_query(path);
                let lower = target.to_ascii_lowercase();
                assert!(!target.split('/').skip(1).any(|s| s == "." || s == ".."), "a dot segment was matched");
                assert!(!target.contains("//"), "an empty segment was matched");
                assert!(!lower.contains("%2f") && !lower.contains("%5c") && !lower.contains("%2e"), "an escape was matched");
            }
        }
        Err(RoutesError::At { line, .. }) => assert!(line >= 1 && line <= file.lines().count().max(1) + 1),
        Err(RoutesError::File(_)) => {}
    }
});
