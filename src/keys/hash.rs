//! Keys at rest: `v1$<salt>$<hash>`, scrypt over HMAC-SHA256(pepper, key).
//!
//! The pepper lives in configuration, never in the database, so a stolen
//! database alone cannot be brute-forced. v1 fixes scrypt at N=2^15, r=8,
//! p=1 with a 16-byte salt and a 32-byte output; salt and hash are standard
//! base64 without padding.

use std::{fmt, str::FromStr};

use base64::{Engine as _, engine::general_purpose::STANDARD_NO_PAD as B64};
use hmac::{Hmac, KeyInit, Mac};
use secrecy::{ExposeSecret, SecretSlice};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use thiserror::Error;

use super::format::{PlainKey, RandomnessUnavailable};

const V1_LOG_N: u8 = 15;
const V1_R: u32 = 8;
const V1_P: u32 = 1;
const SALT_LEN: usize = 16;
const HASH_LEN: usize = 32;
/// A pepper shorter than this is too easy to guess to be worth having.
pub const MIN_PEPPER_LEN: usize = 32;

/// A stored key hash in the v1 format.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyHash {
    salt: [u8; SALT_LEN],
    hash: [u8; HASH_LEN],
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum HashFormatError {
    #[error("expected three '$'-separated parts")]
    Shape,
    #[error("unknown hash version {0:?}")]
    Version(String),
    #[error("salt is not {SALT_LEN} bytes of base64")]
    Salt,
    #[error("hash is not {HASH_LEN} bytes of base64")]
    Hash,
}

impl FromStr for KeyHash {
    type Err = HashFormatError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.split('$');
        let (Some(version), Some(salt), Some(hash), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(HashFormatError::Shape);
        };
        if version != "v1" {
            return Err(HashFormatError::Version(version.chars().take(8).collect()));
        }
        Ok(Self {
            salt: decode_exact(salt).ok_or(HashFormatError::Salt)?,
            hash: decode_exact(hash).ok_or(HashFormatError::Hash)?,
        })
    }
}

fn decode_exact<const N: usize>(s: &str) -> Option<[u8; N]> {
    B64.decode(s).ok()?.try_into().ok()
}

impl fmt::Display for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v1${}${}", B64.encode(self.salt), B64.encode(self.hash))
    }
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyHash(v1, ..)")
    }
}

#[derive(Debug, Error)]
pub enum PepperError {
    #[error("the pepper is not valid base64")]
    Encoding,
    #[error("the pepper must be at least {MIN_PEPPER_LEN} bytes (it is {0})")]
    TooShort(usize),
}

/// Hashes and checks keys with the configured pepper. Cheap to clone.
#[derive(Clone)]
pub struct KeyHasher {
    pepper: std::sync::Arc<SecretSlice<u8>>,
    params: scrypt::Params,
}

impl fmt::Debug for KeyHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyHasher { pepper: [redacted], .. }")
    }
}

impl KeyHasher {
    /// `pepper_b64` is the base64 pepper from configuration.
    pub fn from_base64(pepper_b64: &str) -> Result<Self, PepperError> {
        let pepper = base64::engine::general_purpose::STANDARD
            .decode(pepper_b64.trim())
            .map_err(|_| PepperError::Encoding)?;
        if pepper.len() < MIN_PEPPER_LEN {
            return Err(PepperError::TooShort(pepper.len()));
        }
        // The parameters are constants that scrypt accepts; a failure here is a
        // programming error caught by the unit tests, so fall back loudly.
        #[allow(clippy::expect_used)]
        let params = scrypt::Params::new(V1_LOG_N, V1_R, V1_P).expect("v1 scrypt parameters are valid");
        Ok(Self { pepper: std::sync::Arc::new(pepper.into()), params })
    }

    /// Hashes `key` with a fresh random salt. Slow by design: run it off the
    /// async runtime.
    pub fn hash(&self, key: &PlainKey) -> Result<KeyHash, RandomnessUnavailable> {
        let mut salt = [0u8; SALT_LEN];
        crate::keys::format::fill_random(&mut salt)?;
        Ok(KeyHash { salt, hash: self.derive(key, &salt) })
    }

    /// Constant-time check of `key` against `stored`. Slow by design.
    pub fn verify(&self, key: &PlainKey, stored: &KeyHash) -> bool {
        self.derive(key, &stored.salt).ct_eq(&stored.hash).into()
    }

    fn derive(&self, key: &PlainKey, salt: &[u8; SALT_LEN]) -> [u8; HASH_LEN] {
        let password = self.password(key);
        let mut out = [0u8; HASH_LEN];
        // Only fails for an empty or absurdly long output, which HASH_LEN rules out.
        let _ = scrypt::scrypt(&password, salt, &self.params, &mut out);
        out
    }

    /// A MAC keyed by a subkey of the pepper, one per `purpose`, so that
    /// digests made for one use never match another's.
    pub fn subkey_mac(&self, purpose: &str) -> KeyedMac {
        KeyedMac::new(&hmac_sha256(self.pepper.expose_secret(), purpose.as_bytes()))
    }

    fn password(&self, key: &PlainKey) -> [u8; 32] {
        hmac_sha256(self.pepper.expose_secret(), key.expose().as_bytes())
    }
}

/// HMAC-SHA256; any key length is valid for HMAC.
pub fn hmac_sha256(secret: &[u8], message: &[u8]) -> [u8; 32] {
    KeyedMac::new(secret).digest(message)
}

/// HMAC-SHA256 under one secret, keyed once: every digest starts from the
/// keyed state instead of hashing the padded secret again, which halves the
/// SHA-256 blocks a short message costs (four to two). It holds
/// secret-derived state, so its `Debug` says nothing.
#[derive(Clone)]
pub struct KeyedMac(Hmac<Sha256>);

impl KeyedMac {
    pub fn new(secret: &[u8]) -> Self {
        Self(
            <Hmac<Sha256> as KeyInit>::new_from_slice(secret)
                .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length")),
        )
    }

    pub fn digest(&self, message: &[u8]) -> [u8; 32] {
        let mut mac = self.0.clone();
        mac.update(message);
        mac.finalize().into_bytes().into()
    }
}

impl fmt::Debug for KeyedMac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyedMac([redacted])")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::format::KeyPrefix;

    fn hasher() -> KeyHasher {
        KeyHasher::from_base64(&base64::engine::general_purpose::STANDARD.encode([7u8; 32])).unwrap()
    }

    #[test]
    fn a_keyed_mac_gives_the_rfc_4231_digest_and_hides_its_state() {
        // RFC 4231, test case 2.
        let mac = KeyedMac::new(b"Jefe");
        let expected = "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843";
        let hex = |d: [u8; 32]| d.iter().map(|b| format!("{b:02x}")).collect::<String>();
        assert_eq!(hex(mac.digest(b"what do ya want for nothing?")), expected);
        // Reusable: the keyed state is not consumed by a digest.
        assert_eq!(hex(mac.digest(b"what do ya want for nothing?")), expected);
        assert_eq!(
            hmac_sha256(b"Jefe", b"what do ya want for nothing?"),
            mac.digest(b"what do ya want for nothing?")
        );
        assert_eq!(format!("{mac:?}"), "KeyedMac([redacted])");
    }

    #[test]
    fn hash_then_verify_accepts_the_key_and_rejects_another() {
        let hasher = hasher();
        let key = PlainKey::generate(&KeyPrefix::default()).unwrap();
        let other = PlainKey::generate(&KeyPrefix::default()).unwrap();
        let stored = hasher.hash(&key).unwrap();
        assert!(hasher.verify(&key, &stored));
        assert!(!hasher.verify(&other, &stored));
    }

    #[test]
    fn the_pepper_is_part_of_the_hash() {
        let key = PlainKey::generate(&KeyPrefix::default()).unwrap();
        let stored = hasher().hash(&key).unwrap();
        let other_pepper =
            KeyHasher::from_base64(&base64::engine::general_purpose::STANDARD.encode([8u8; 32])).unwrap();
        assert!(!other_pepper.verify(&key, &stored));
    }

    #[test]
    fn v1_matches_scrypt_with_the_documented_parameters() {
        let hasher = hasher();
        let key = PlainKey::generate(&KeyPrefix::default()).unwrap();
        let stored = hasher.hash(&key).unwrap();
        let password = hmac_sha256(&[7u8; 32], key.expose().as_bytes());
        let mut expected = [0u8; 32];
        scrypt::scrypt(&password, &stored.salt, &scrypt::Params::new(15, 8, 1).unwrap(), &mut expected)
            .unwrap();
        assert_eq!(stored.hash, expected);
    }

    #[test]
    fn format_round_trips() {
        let stored = hasher().hash(&PlainKey::generate(&KeyPrefix::default()).unwrap()).unwrap();
        let text = stored.to_string();
        assert!(text.starts_with("v1$"));
        assert_eq!(text.split('$').count(), 3);
        assert_eq!(text.parse::<KeyHash>().unwrap(), stored);
    }

    #[test]
    fn parse_rejects_bad_strings_cleanly() {
        let salt = B64.encode([1u8; 16]);
        let hash = B64.encode([2u8; 32]);
        assert_eq!("".parse::<KeyHash>().unwrap_err(), HashFormatError::Shape);
        assert_eq!(format!("v1${salt}").parse::<KeyHash>().unwrap_err(), HashFormatError::Shape);
        assert_eq!(format!("v1${salt}${hash}$x").parse::<KeyHash>().unwrap_err(), HashFormatError::Shape);
        assert!(matches!(format!("v2${salt}${hash}").parse::<KeyHash>(), Err(HashFormatError::Version(_))));
        assert_eq!(format!("v1$!!!${hash}").parse::<KeyHash>().unwrap_err(), HashFormatError::Salt);
        assert_eq!(format!("v1${hash}${hash}").parse::<KeyHash>().unwrap_err(), HashFormatError::Salt);
        assert_eq!(format!("v1${salt}${salt}").parse::<KeyHash>().unwrap_err(), HashFormatError::Hash);
        assert!(format!("v1${salt}${hash}").parse::<KeyHash>().is_ok());
    }

    #[test]
    fn short_or_garbled_peppers_are_refused() {
        let short = base64::engine::general_purpose::STANDARD.encode([1u8; 31]);
        assert!(matches!(KeyHasher::from_base64(&short), Err(PepperError::TooShort(31))));
        assert!(matches!(KeyHasher::from_base64("not base64!"), Err(PepperError::Encoding)));
    }

    #[test]
    fn debug_output_hides_secrets() {
        assert!(!format!("{:?}", hasher()).contains("7"));
        let stored = hasher().hash(&PlainKey::generate(&KeyPrefix::default()).unwrap()).unwrap();
        assert!(!format!("{stored:?}").contains(&B64.encode(stored.hash)));
    }
}
