//! The key format: `<prefix><43 random base62><6 base62 CRC32 checksum>`.
//!
//! Parsing rejects typos and garbage on shape and checksum alone, so a bad key
//! never costs a store lookup or an scrypt run. The first [`LOOKUP_LEN`]
//! characters index the key in the store and are safe to display; the rest is
//! the secret.

use std::fmt;

use secrecy::{ExposeSecret, SecretString};
use thiserror::Error;

/// Random base62 characters after the prefix.
pub const RANDOM_LEN: usize = 43;
/// Base62 characters of the CRC32 checksum (62^6 > 2^32).
pub const CHECKSUM_LEN: usize = 6;
/// Characters of the key used as its lookup index.
pub const LOOKUP_LEN: usize = 16;
/// Longest prefix we accept: it must leave at least six random characters in
/// the lookup prefix so that lookups stay well spread.
pub const MAX_PREFIX_LEN: usize = 10;

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// The configured, validated key prefix (`sntr_` by default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPrefix(String);

#[derive(Debug, Error, PartialEq, Eq)]
#[error(
    "key prefix {0:?} is invalid: use 2 to {MAX_PREFIX_LEN} characters of a-z, 0-9 and '_', starting with a letter and ending in '_'"
)]
pub struct InvalidPrefix(String);

impl KeyPrefix {
    pub fn new(prefix: &str) -> Result<Self, InvalidPrefix> {
        let valid_len = (2..=MAX_PREFIX_LEN).contains(&prefix.len());
        let body = prefix.strip_suffix('_').unwrap_or("");
        let valid_chars = body.bytes().next().is_some_and(|b| b.is_ascii_lowercase())
            && body.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if valid_len && valid_chars {
            Ok(Self(prefix.to_owned()))
        } else {
            Err(InvalidPrefix(prefix.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Total length of a key with this prefix.
    pub fn key_len(&self) -> usize {
        self.0.len() + RANDOM_LEN + CHECKSUM_LEN
    }
}

impl Default for KeyPrefix {
    fn default() -> Self {
        Self("sntr_".to_owned())
    }
}

/// Why a presented key is not a key of ours. Callers only ever see MALFORMED;
/// the detail is for tests and debug logs.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    #[error("wrong length")]
    Length,
    #[error("wrong prefix")]
    Prefix,
    #[error("character outside base62")]
    Alphabet,
    #[error("checksum mismatch")]
    Checksum,
}

/// The OS random source failed; no key can be issued safely.
#[derive(Debug, Error)]
#[error("the operating system's random source failed: {0}")]
pub struct RandomnessUnavailable(getrandom::Error);

/// A well-formed plaintext key. Holds a secret: Debug shows the lookup prefix only.
#[derive(Clone)]
pub struct PlainKey(SecretString);

impl PlainKey {
    /// Issues a new key from the OS CSPRNG.
    pub fn generate(prefix: &KeyPrefix) -> Result<Self, RandomnessUnavailable> {
        let mut key = String::with_capacity(prefix.key_len());
        key.push_str(prefix.as_str());
        let mut pool = [0u8; 64];
        let mut drawn = 0;
        while drawn < RANDOM_LEN {
            fill_random(&mut pool)?;
            // Rejection sampling: 248 = 4 * 62, so accepted bytes are uniform mod 62.
            for &byte in pool.iter().filter(|&&b| b < 248).take(RANDOM_LEN - drawn) {
                key.push(char::from(BASE62[usize::from(byte % 62)]));
                drawn += 1;
            }
        }
        Ok(Self(SecretString::from(checksummed(key))))
    }

    /// Accepts exactly the keys [`PlainKey::generate`] can produce.
    pub fn parse(prefix: &KeyPrefix, presented: &str) -> Result<Self, Malformed> {
        if presented.len() != prefix.key_len() {
            return Err(Malformed::Length);
        }
        let Some(rest) = presented.strip_prefix(prefix.as_str()) else {
            return Err(Malformed::Prefix);
        };
        if !rest.bytes().all(is_base62) {
            return Err(Malformed::Alphabet);
        }
        // All base62 from here on, so byte offsets are character offsets.
        let (body, sum) = presented.split_at(presented.len() - CHECKSUM_LEN);
        if checksum(body) != sum.as_bytes() {
            return Err(Malformed::Checksum);
        }
        Ok(Self(SecretString::from(presented.to_owned())))
    }

    /// The first [`LOOKUP_LEN`] characters: the store index, safe to display.
    pub fn lookup_prefix(&self) -> LookupPrefix {
        LookupPrefix(self.0.expose_secret()[..LOOKUP_LEN].to_owned())
    }

    /// The whole key; only for hashing and for showing it once to its owner.
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

impl fmt::Debug for PlainKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PlainKey({}…[redacted])", self.lookup_prefix().as_str())
    }
}

/// The displayable lookup index of a key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LookupPrefix(String);

impl LookupPrefix {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Fills `buf` from the OS CSPRNG.
pub fn fill_random(buf: &mut [u8]) -> Result<(), RandomnessUnavailable> {
    getrandom::fill(buf).map_err(RandomnessUnavailable)
}

fn is_base62(b: u8) -> bool {
    b.is_ascii_alphanumeric()
}

/// `body` with its checksum appended: a well-formed key when `body` is a
/// prefix and 43 base62 characters.
pub fn checksummed(mut body: String) -> String {
    let sum = checksum(&body);
    body.extend(sum.iter().map(|&b| char::from(b)));
    body
}

/// CRC32 (IEEE) of `body`, in base62, left-padded with '0' to six characters.
/// Bytes rather than a `String`: every Verify checks one, and the check
/// should not allocate.
pub fn checksum(body: &str) -> [u8; CHECKSUM_LEN] {
    let mut n = crc32fast::hash(body.as_bytes());
    let mut digits = [b'0'; CHECKSUM_LEN];
    for slot in digits.iter_mut().rev() {
        *slot = BASE62[(n % 62) as usize];
        n /= 62;
    }
    digits
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sntr() -> KeyPrefix {
        KeyPrefix::default()
    }

    #[test]
    fn generated_keys_have_the_documented_shape() {
        let key = PlainKey::generate(&sntr()).unwrap();
        let s = key.expose();
        assert_eq!(s.len(), 54);
        assert!(s.starts_with("sntr_"));
        assert!(s[5..].bytes().all(is_base62));
        assert_eq!(&s.as_bytes()[48..], checksum(&s[..48]));
        assert_eq!(key.lookup_prefix().as_str(), &s[..16]);
    }

    #[test]
    fn generated_keys_parse_back() {
        for _ in 0..100 {
            let key = PlainKey::generate(&sntr()).unwrap();
            assert!(PlainKey::parse(&sntr(), key.expose()).is_ok());
        }
    }

    #[test]
    fn checksum_is_crc32_in_padded_base62() {
        // crc32("") = 0, crc32("a") = 0xe8b7be43 = 3904355907.
        assert_eq!(&checksum(""), b"000000");
        let mut n: u64 = 3_904_355_907;
        let mut expected = Vec::new();
        for _ in 0..6 {
            expected.push(BASE62[(n % 62) as usize]);
            n /= 62;
        }
        expected.reverse();
        assert_eq!(checksum("a").as_slice(), expected.as_slice());
    }

    #[test]
    fn parse_rejects_each_kind_of_garbage() {
        let key = PlainKey::generate(&sntr()).unwrap();
        let s = key.expose().to_owned();
        assert_eq!(PlainKey::parse(&sntr(), "").unwrap_err(), Malformed::Length);
        assert_eq!(PlainKey::parse(&sntr(), &s[..53]).unwrap_err(), Malformed::Length);
        let wrong_prefix = format!("sntx_{}", &s[5..]);
        assert_eq!(PlainKey::parse(&sntr(), &wrong_prefix).unwrap_err(), Malformed::Prefix);
        let bad_char = format!("{}-{}", &s[..20], &s[21..]);
        assert_eq!(PlainKey::parse(&sntr(), &bad_char).unwrap_err(), Malformed::Alphabet);
        let multibyte = format!("{}é{}", &s[..20], &s[22..]);
        assert!(PlainKey::parse(&sntr(), &multibyte).is_err());
    }

    #[test]
    fn a_single_typo_fails_the_checksum() {
        let key = PlainKey::generate(&sntr()).unwrap();
        let s = key.expose();
        for pos in 5..54 {
            let original = s.as_bytes()[pos];
            let replacement = if original == b'0' { b'1' } else { b'0' };
            let mut typo = s.as_bytes().to_vec();
            typo[pos] = replacement;
            let typo = String::from_utf8(typo).unwrap();
            assert_eq!(PlainKey::parse(&sntr(), &typo).unwrap_err(), Malformed::Checksum, "position {pos}");
        }
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let key = PlainKey::generate(&sntr()).unwrap();
        let shown = format!("{key:?}");
        assert!(!shown.contains(&key.expose()[16..]));
        assert!(shown.contains(key.lookup_prefix().as_str()));
    }

    #[test]
    fn prefix_rules() {
        assert!(KeyPrefix::new("sntr_").is_ok());
        assert!(KeyPrefix::new("kw2_").is_ok());
        for bad in ["", "_", "sntr", "SNTR_", "sn-tr_", "abcdefghij_", "1x_"] {
            assert!(KeyPrefix::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn custom_prefixes_round_trip() {
        let prefix = KeyPrefix::new("acme_live_").unwrap();
        let key = PlainKey::generate(&prefix).unwrap();
        assert_eq!(key.expose().len(), 59);
        assert!(PlainKey::parse(&prefix, key.expose()).is_ok());
        assert_eq!(PlainKey::parse(&sntr(), key.expose()).unwrap_err(), Malformed::Length);
    }

    proptest! {
        #[test]
        fn parse_never_panics_and_accepts_only_checksummed_keys(s in "\\PC{0,80}") {
            if let Ok(key) = PlainKey::parse(&sntr(), &s) {
                prop_assert_eq!(key.expose().len(), 54);
                prop_assert_eq!(&checksum(&s[..48])[..], &s.as_bytes()[48..]);
            }
        }

        #[test]
        fn random_base62_bodies_are_rejected_unless_checksum_matches(body in "[0-9A-Za-z]{49}") {
            let candidate = format!("sntr_{body}");
            let ok = PlainKey::parse(&sntr(), &candidate).is_ok();
            prop_assert_eq!(ok, checksum(&candidate[..48]) == candidate.as_bytes()[48..]);
        }
    }
}
