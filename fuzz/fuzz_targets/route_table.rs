//! The gateway's route table: the input is a route file, then (after a NUL)
//! a method and (after another) a request path. Any file is accepted or
//! refused with a line number, never a panic; an accepted table answers any
//! request, and the query string never changes the answer.
#![no_main]

use keywarden::{
    keys::ScopeCatalogue,
    routes::{RouteTable, RoutesError},
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
        }
        Err(RoutesError::At { line, .. }) => assert!(line >= 1 && line <= file.lines().count().max(1) + 1),
        Err(RoutesError::File(_)) => {}
    }
});
