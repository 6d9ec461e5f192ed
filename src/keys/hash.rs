//! Keys at rest: scrypt over HMAC-SHA256(pepper, key), in a string that
//! names the pepper generation it was made under.
//!
//! - `v1$<salt>$<hash>`: the first generation, pepper id `1` (the product's
//!   documented form; a deployment that never rotates stores only this).
//! - `v2$<pepper id>$<salt>$<hash>`: any later generation.
//!
//! Peppers live in configuration, never in the database, so a stolen
//! database alone cannot be brute-forced. Several may be configured, one of
//! them current: new hashes use the current one, and a key hashed under an
//! older one still verifies while that pepper is configured. Both forms fix
//! scrypt at N=2^15, r=8, p=1 with a 16-byte salt and a 32-byte output; salt
//! and hash are standard base64 without padding.

use std::{fmt, str::FromStr, sync::Arc};

use base64::{Engine as _, engine::general_purpose::STANDARD_NO_PAD as B64};
use hmac::{Hmac, KeyInit, Mac};
use secrecy::{ExposeSecret, SecretSlice};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use thiserror::Error;

use super::format::{PlainKey, RandomnessUnavailable};

const LOG_N: u8 = 15;
const R: u32 = 8;
const P: u32 = 1;
const SALT_LEN: usize = 16;
const HASH_LEN: usize = 32;
/// A pepper shorter than this is too easy to guess to be worth having.
pub const MIN_PEPPER_LEN: usize = 32;
/// Longest pepper id: it is written into every hash made under it.
pub const MAX_PEPPER_ID_LEN: usize = 32;

/// The name of a pepper generation: 1-32 of `A-Z a-z 0-9 _ -`. Not a
/// secret. `1` is the first generation, written in the `v1` form.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PepperId(Arc<str>);

#[derive(Debug, Error, PartialEq, Eq)]
#[error("a pepper id is 1-{MAX_PEPPER_ID_LEN} characters of A-Z, a-z, 0-9, '_' or '-'")]
pub struct BadPepperId;

impl PepperId {
    /// The first generation's id, which `v1$salt$hash` names implicitly.
    pub const FIRST: &'static str = "1";

    pub fn first() -> Self {
        Self(Arc::from(Self::FIRST))
    }

    pub fn parse(s: &str) -> Result<Self, BadPepperId> {
        let ok = !s.is_empty()
            && s.len() <= MAX_PEPPER_ID_LEN
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if ok { Ok(Self(Arc::from(s))) } else { Err(BadPepperId) }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_first(&self) -> bool {
        &*self.0 == Self::FIRST
    }
}

impl fmt::Display for PepperId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for PepperId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PepperId({:?})", &*self.0)
    }
}

/// A stored key hash and the pepper generation it was made under.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyHash {
    pepper: PepperId,
    salt: [u8; SALT_LEN],
    hash: [u8; HASH_LEN],
}

impl KeyHash {
    /// The generation of the pepper this hash needs.
    pub fn pepper(&self) -> &PepperId {
        &self.pepper
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum HashFormatError {
    #[error("expected v1$salt$hash or v2$pepper$salt$hash")]
    Shape,
    #[error("unknown hash version {0:?}")]
    Version(String),
    #[error("the pepper id is not 1-{MAX_PEPPER_ID_LEN} of A-Z, a-z, 0-9, '_', '-' other than 1")]
    Pepper,
    #[error("salt is not {SALT_LEN} bytes of base64")]
    Salt,
    #[error("hash is not {HASH_LEN} bytes of base64")]
    Hash,
}

impl FromStr for KeyHash {
    type Err = HashFormatError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.split('$');
        let pepper = match parts.next() {
            Some("v1") => PepperId::first(),
            // The first generation has one spelling only.
            Some("v2") => match parts.next().map(PepperId::parse) {
                Some(Ok(id)) if !id.is_first() => id,
                Some(_) => return Err(HashFormatError::Pepper),
                None => return Err(HashFormatError::Shape),
            },
            Some(version) if !version.is_empty() && s.contains('$') => {
                return Err(HashFormatError::Version(version.chars().take(8).collect()));
            }
            _ => return Err(HashFormatError::Shape),
        };
        let (Some(salt), Some(hash), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(HashFormatError::Shape);
        };
        Ok(Self {
            pepper,
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
        let (salt, hash) = (B64.encode(self.salt), B64.encode(self.hash));
        if self.pepper.is_first() {
            write!(f, "v1${salt}${hash}")
        } else {
            write!(f, "v2${}${salt}${hash}", self.pepper)
        }
    }
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyHash(pepper {}, ..)", self.pepper)
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PepperError {
    #[error("pepper {0} is not valid base64")]
    Encoding(PepperId),
    #[error("pepper {0} must be at least {MIN_PEPPER_LEN} bytes (it is {1})")]
    TooShort(PepperId, usize),
    #[error("pepper {0} is configured twice")]
    Duplicate(PepperId),
    #[error("peppers {0} and {1} are the same secret")]
    Reused(PepperId, PepperId),
    #[error("the current pepper {0} is not configured")]
    CurrentMissing(PepperId),
}

/// A key hashed under a pepper this process was not given: it cannot be
/// checked until that pepper is configured again.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("the key is hashed under pepper {0}, which is not configured")]
pub struct UnknownPepper(pub PepperId);

struct Pepper {
    id: PepperId,
    secret: SecretSlice<u8>,
}

/// Hashes and checks keys with the configured peppers. Cheap to clone.
#[derive(Clone)]
pub struct KeyHasher {
    /// The current pepper first.
    peppers: Arc<[Pepper]>,
    params: scrypt::Params,
}

impl fmt::Debug for KeyHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids: Vec<&str> = self.peppers.iter().map(|p| p.id.as_str()).collect();
        write!(f, "KeyHasher {{ peppers: {ids:?} (current first), secrets: [redacted], .. }}")
    }
}

impl KeyHasher {
    /// One generation: `pepper_b64` becomes pepper `1`, the current one.
    pub fn from_base64(pepper_b64: &str) -> Result<Self, PepperError> {
        Self::new([(PepperId::first(), pepper_b64)], &PepperId::first())
    }

    /// Several generations by id (base64 secrets), `current` among them.
    pub fn new<'a>(
        peppers: impl IntoIterator<Item = (PepperId, &'a str)>,
        current: &PepperId,
    ) -> Result<Self, PepperError> {
        let mut decoded: Vec<Pepper> = Vec::new();
        for (id, b64) in peppers {
            let secret = base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .map_err(|_| PepperError::Encoding(id.clone()))?;
            if secret.len() < MIN_PEPPER_LEN {
                return Err(PepperError::TooShort(id, secret.len()));
            }
            for other in &decoded {
                if other.id == id {
                    return Err(PepperError::Duplicate(id));
                }
                if bool::from(other.secret.expose_secret().ct_eq(&secret)) {
                    return Err(PepperError::Reused(other.id.clone(), id));
                }
            }
            decoded.push(Pepper { id, secret: secret.into() });
        }
        let at = decoded
            .iter()
            .position(|p| &p.id == current)
            .ok_or(PepperError::CurrentMissing(current.clone()))?;
        decoded.swap(0, at);
        // The parameters are constants that scrypt accepts; a failure here is a
        // programming error caught by the unit tests, so fall back loudly.
        #[allow(clippy::expect_used)]
        let params = scrypt::Params::new(LOG_N, R, P).expect("scrypt parameters are valid");
        Ok(Self { peppers: decoded.into(), params })
    }

    /// The generation new hashes are made under.
    pub fn current(&self) -> &PepperId {
        &self.peppers[0].id
    }

    /// Every configured generation, the current one first.
    pub fn ids(&self) -> impl Iterator<Item = &PepperId> {
        self.peppers.iter().map(|p| &p.id)
    }

    /// Whether `stored` was made under the current pepper (else it is
    /// worth rehashing after its next successful check).
    pub fn is_current(&self, stored: &KeyHash) -> bool {
        &stored.pepper == self.current()
    }

    /// Hashes `key` under the current pepper with a fresh random salt. Slow
    /// by design: run it off the async runtime.
    pub fn hash(&self, key: &PlainKey) -> Result<KeyHash, RandomnessUnavailable> {
        let mut salt = [0u8; SALT_LEN];
        crate::keys::format::fill_random(&mut salt)?;
        let current = &self.peppers[0];
        Ok(KeyHash { pepper: current.id.clone(), salt, hash: self.derive(current, key, &salt) })
    }

    /// Constant-time check of `key` against `stored`, under the pepper
    /// `stored` names. Slow by design.
    pub fn verify(&self, key: &PlainKey, stored: &KeyHash) -> Result<bool, UnknownPepper> {
        let pepper = self.pepper(&stored.pepper).ok_or_else(|| UnknownPepper(stored.pepper.clone()))?;
        Ok(self.derive(pepper, key, &stored.salt).ct_eq(&stored.hash).into())
    }

    fn pepper(&self, id: &PepperId) -> Option<&Pepper> {
        self.peppers.iter().find(|p| &p.id == id)
    }

    fn derive(&self, pepper: &Pepper, key: &PlainKey, salt: &[u8; SALT_LEN]) -> [u8; HASH_LEN] {
        let password = hmac_sha256(pepper.secret.expose_secret(), key.expose().as_bytes());
        let mut out = [0u8; HASH_LEN];
        // Only fails for an empty or absurdly long output, which HASH_LEN rules out.
        let _ = scrypt::scrypt(&password, salt, &self.params, &mut out);
        out
    }

    /// A MAC per configured generation, the current one first, each keyed
    /// by a subkey of its pepper for `purpose`, so that digests made for
    /// one use never match another's. New digests use the first; digests
    /// made before a rotation are recognised by the others.
    pub fn subkey_macs(&self, purpose: &str) -> SubkeyMacs {
        SubkeyMacs(
            self.peppers
                .iter()
                .map(|p| {
                    (p.id.clone(), KeyedMac::new(&hmac_sha256(p.secret.expose_secret(), purpose.as_bytes())))
                })
                .collect(),
        )
    }
}

/// A subkey's MAC under each configured pepper, the current one first.
#[derive(Clone, Debug)]
pub struct SubkeyMacs(Arc<[(PepperId, KeyedMac)]>);

impl SubkeyMacs {
    /// The current generation's MAC, for new digests.
    pub fn current(&self) -> (&PepperId, &KeyedMac) {
        let (id, mac) = &self.0[0];
        (id, mac)
    }

    /// The MAC of generation `id`, if it is configured.
    pub fn of(&self, id: &PepperId) -> Option<&KeyedMac> {
        self.0.iter().find(|(p, _)| p == id).map(|(_, mac)| mac)
    }

    /// Every configured generation's MAC, the current one first.
    pub fn all(&self) -> impl Iterator<Item = &KeyedMac> {
        self.0.iter().map(|(_, mac)| mac)
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

    fn b64(byte: u8) -> String {
        base64::engine::general_purpose::STANDARD.encode([byte; 32])
    }

    fn id(s: &str) -> PepperId {
        PepperId::parse(s).unwrap()
    }

    fn key() -> PlainKey {
        PlainKey::generate(&KeyPrefix::default()).unwrap()
    }

    #[test]
    fn hash_then_verify_accepts_the_key_and_rejects_another() {
        let hasher = hasher();
        let (key, other) = (key(), key());
        let stored = hasher.hash(&key).unwrap();
        assert_eq!(hasher.verify(&key, &stored), Ok(true));
        assert_eq!(hasher.verify(&other, &stored), Ok(false));
    }

    #[test]
    fn the_pepper_is_part_of_the_hash() {
        let key = key();
        let stored = hasher().hash(&key).unwrap();
        let other_pepper = KeyHasher::from_base64(&b64(8)).unwrap();
        assert_eq!(other_pepper.verify(&key, &stored), Ok(false));
    }

    #[test]
    fn v1_matches_scrypt_with_the_documented_parameters() {
        let hasher = hasher();
        let key = key();
        let stored = hasher.hash(&key).unwrap();
        let password = hmac_sha256(&[7u8; 32], key.expose().as_bytes());
        let mut expected = [0u8; 32];
        scrypt::scrypt(&password, &stored.salt, &scrypt::Params::new(15, 8, 1).unwrap(), &mut expected)
            .unwrap();
        assert_eq!(stored.hash, expected);
    }

    #[test]
    fn the_first_generation_keeps_the_v1_form() {
        let stored = hasher().hash(&key()).unwrap();
        let text = stored.to_string();
        assert!(text.starts_with("v1$"));
        assert_eq!(text.split('$').count(), 3);
        assert_eq!(stored.pepper(), &PepperId::first());
        assert_eq!(text.parse::<KeyHash>().unwrap(), stored);
    }

    #[test]
    fn later_generations_name_their_pepper_and_verify_under_it_only() {
        let rotated =
            KeyHasher::new([(id("1"), b64(7).as_str()), (id("2027-a"), b64(9).as_str())], &id("2027-a"))
                .unwrap();
        let key = key();
        let stored = rotated.hash(&key).unwrap();
        let text = stored.to_string();
        assert!(text.starts_with("v2$2027-a$"), "{text}");
        assert_eq!(text.split('$').count(), 4);
        assert_eq!(text.parse::<KeyHash>().unwrap(), stored);
        assert!(rotated.is_current(&stored));
        assert_eq!(rotated.verify(&key, &stored), Ok(true));

        // A generation-1 hash still verifies under the rotated set, and is not current.
        let old = hasher().hash(&key).unwrap();
        assert!(!rotated.is_current(&old));
        assert_eq!(rotated.verify(&key, &old), Ok(true));

        // Without pepper 1 the old hash cannot be checked; the new one can.
        let retired = KeyHasher::new([(id("2027-a"), b64(9).as_str())], &id("2027-a")).unwrap();
        assert_eq!(retired.verify(&key, &old), Err(UnknownPepper(PepperId::first())));
        assert_eq!(retired.verify(&key, &stored), Ok(true));
        // And pepper 1 alone cannot check the new one.
        assert_eq!(hasher().verify(&key, &stored), Err(UnknownPepper(id("2027-a"))));
    }

    #[test]
    fn a_set_of_peppers_is_refused_when_it_is_inconsistent() {
        let (a, b) = (b64(7), b64(9));
        let new = |list: &[(&str, &str)], current: &str| {
            KeyHasher::new(list.iter().map(|(i, s)| (id(i), *s)), &id(current)).map(|_| ())
        };
        assert_eq!(new(&[("1", &a), ("2", &b)], "3"), Err(PepperError::CurrentMissing(id("3"))));
        assert_eq!(new(&[("1", &a), ("1", &b)], "1"), Err(PepperError::Duplicate(id("1"))));
        assert_eq!(new(&[("1", &a), ("2", &a)], "2"), Err(PepperError::Reused(id("1"), id("2"))));
        assert_eq!(new(&[("1", &a), ("2", "!!")], "1"), Err(PepperError::Encoding(id("2"))));
        assert_eq!(new(&[("1", &a), ("2", &b)], "2"), Ok(()));
    }

    #[test]
    fn subkeys_differ_by_generation_and_put_the_current_first() {
        let rotated =
            KeyHasher::new([(id("1"), b64(7).as_str()), (id("2"), b64(9).as_str())], &id("2")).unwrap();
        let macs = rotated.subkey_macs("purpose");
        assert_eq!(macs.current().0, &id("2"));
        let old = hasher().subkey_macs("purpose");
        assert_eq!(macs.of(&id("1")).unwrap().digest(b"m"), old.current().1.digest(b"m"));
        assert_ne!(macs.current().1.digest(b"m"), old.current().1.digest(b"m"));
        assert_eq!(macs.all().count(), 2);
    }

    #[test]
    fn parse_rejects_bad_strings_cleanly() {
        let salt = B64.encode([1u8; 16]);
        let hash = B64.encode([2u8; 32]);
        assert_eq!("".parse::<KeyHash>().unwrap_err(), HashFormatError::Shape);
        assert_eq!(format!("v1${salt}").parse::<KeyHash>().unwrap_err(), HashFormatError::Shape);
        assert_eq!(format!("v1${salt}${hash}$x").parse::<KeyHash>().unwrap_err(), HashFormatError::Shape);
        assert!(matches!(format!("v3${salt}${hash}").parse::<KeyHash>(), Err(HashFormatError::Version(_))));
        assert_eq!(format!("v2${salt}${hash}").parse::<KeyHash>().unwrap_err(), HashFormatError::Shape);
        assert_eq!(format!("v2$1${salt}${hash}").parse::<KeyHash>().unwrap_err(), HashFormatError::Pepper);
        assert_eq!(format!("v2$a.b${salt}${hash}").parse::<KeyHash>().unwrap_err(), HashFormatError::Pepper);
        assert_eq!(format!("v2$${salt}${hash}").parse::<KeyHash>().unwrap_err(), HashFormatError::Pepper);
        assert_eq!(format!("v1$!!!${hash}").parse::<KeyHash>().unwrap_err(), HashFormatError::Salt);
        assert_eq!(format!("v1${hash}${hash}").parse::<KeyHash>().unwrap_err(), HashFormatError::Salt);
        assert_eq!(format!("v1${salt}${salt}").parse::<KeyHash>().unwrap_err(), HashFormatError::Hash);
        assert!(format!("v1${salt}${hash}").parse::<KeyHash>().is_ok());
        assert!(format!("v2$2${salt}${hash}").parse::<KeyHash>().is_ok());
    }

    proptest::proptest! {
        #[test]
        fn any_string_parses_to_a_hash_that_prints_back_or_is_refused(s in "(v[0-9]?\\$)?[A-Za-z0-9+/$_.-]{0,100}") {
            if let Ok(hash) = s.parse::<KeyHash>() {
                proptest::prop_assert_eq!(hash.to_string(), s);
            }
        }

        #[test]
        fn every_valid_pepper_id_round_trips_through_a_hash(name in "[A-Za-z0-9_-]{1,32}", salt: [u8; 16], digest: [u8; 32]) {
            let hash = KeyHash { pepper: id(&name), salt, hash: digest };
            proptest::prop_assert_eq!(hash.to_string().parse::<KeyHash>().unwrap(), hash);
        }
    }

    #[test]
    fn short_or_garbled_peppers_are_refused() {
        let short = base64::engine::general_purpose::STANDARD.encode([1u8; 31]);
        assert_eq!(KeyHasher::from_base64(&short).unwrap_err(), PepperError::TooShort(PepperId::first(), 31));
        assert_eq!(
            KeyHasher::from_base64("not base64!").unwrap_err(),
            PepperError::Encoding(PepperId::first())
        );
        assert!(PepperId::parse("").is_err());
        assert!(PepperId::parse(&"a".repeat(33)).is_err());
        assert!(PepperId::parse("a$b").is_err());
    }

    #[test]
    fn debug_output_hides_secrets() {
        assert!(!format!("{:?}", hasher()).contains(&b64(7)));
        let stored = hasher().hash(&key()).unwrap();
        assert!(!format!("{stored:?}").contains(&B64.encode(stored.hash)));
    }
}
