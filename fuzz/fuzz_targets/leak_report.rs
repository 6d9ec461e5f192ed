//! GitHub's leak reports and signing keys, as bytes off the wire: a report
//! body is counted by a hand-written scanner before serde parses it, and
//! the count must agree with serde on every array of objects (or a huge
//! report could slip past the 1,000-entry bound, or a fair one be refused);
//! nothing panics on any body or keys document.
#![no_main]

use keywarden::{
    api::leak_reports::{BodyError, count_entries, parse_report},
    service::leaks::{MAX_TOKENS, github::usable_keys},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let counted = count_entries(data);
    if let Ok(objects) = serde_json::from_slice::<Vec<serde_json::Map<String, serde_json::Value>>>(data) {
        assert_eq!(counted, objects.len(), "the scanner and serde disagree on the entries");
    }
    match parse_report(data) {
        Ok(found) => assert!(found.len() <= MAX_TOKENS && found.len() == counted),
        Err(BodyError::TooMany) => assert!(counted > MAX_TOKENS),
        Err(BodyError::NotAReport) => {}
    }
    let _ = usable_keys(data);
});
