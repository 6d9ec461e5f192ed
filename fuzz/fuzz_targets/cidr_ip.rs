//! IP allow-lists and client IPs: lines of input are allow-list entries,
//! the first line is also tried as the caller's IP. An accepted list's
//! canonical form parses to the same list, and matching never panics.
#![no_main]

use std::net::IpAddr;

use keywarden::keys::AllowList;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let entries: Vec<&str> = text.split('\n').collect();
    let ip = entries.first().and_then(|e| e.parse::<IpAddr>().ok());
    if let Ok(list) = AllowList::parse(&entries) {
        let canonical = list.canonical();
        let again = AllowList::parse(&canonical).expect("a canonical list parses");
        assert_eq!(again.canonical(), canonical);
        assert_eq!(list.permits(ip), again.permits(ip));
        let stored = AllowList::from_stored(canonical.iter().map(String::as_str)).expect("stored form reads");
        assert_eq!(stored.permits(ip), list.permits(ip));
    }
});
