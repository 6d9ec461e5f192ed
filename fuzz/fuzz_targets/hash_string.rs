//! The stored hash parser (`v1$salt$hash`): anything it accepts prints back
//! to the same value; anything else is an error, never a panic.
#![no_main]

use keywarden::keys::KeyHash;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(stored) = std::str::from_utf8(data) else { return };
    if let Ok(hash) = stored.parse::<KeyHash>() {
        let printed = hash.to_string();
        let again: KeyHash = printed.parse().expect("a printed hash parses");
        assert_eq!(again.to_string(), printed);
    }
});
