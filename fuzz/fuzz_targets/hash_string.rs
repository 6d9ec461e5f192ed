//! The stored hash parser (`v1$salt$hash`, `v2$<pepper id>$salt$hash`):
//! anything it accepts is in its one canonical spelling and prints back
//! byte for byte; anything else is an error, never a panic.
#![no_main]

use keywarden::keys::KeyHash;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(stored) = std::str::from_utf8(data) else { return };
    if let Ok(hash) = stored.parse::<KeyHash>() {
        let printed = hash.to_string();
        assert_eq!(printed, stored, "only canonical spellings are accepted");
        let again: KeyHash = printed.parse().expect("a printed hash parses");
        assert_eq!(again.pepper(), hash.pepper());
    }
});
