//! The presented-key parser: any string either parses into a key that is
//! exactly the input, with a valid checksum, or is refused; never a panic.
#![no_main]

use keywarden::keys::{
    KeyPrefix, PlainKey,
    format::{checksum, checksummed},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(presented) = std::str::from_utf8(data) else { return };
    let prefix = KeyPrefix::default();
    if let Ok(key) = PlainKey::parse(&prefix, presented) {
        assert_eq!(key.expose(), presented);
        let body = &presented[..presented.len() - 6];
        assert_eq!(checksummed(body.to_owned()), presented);
        assert_eq!(key.lookup_prefix().as_str(), &presented[..16]);
        let _ = checksum(body);
    }
});
