//! Audit event ids of verifications: UUIDv7 whose last 32 bits are a MAC of
//! the rest under a pepper subkey. Every replica of a deployment shares the
//! pepper, so any of them can tell an id the deployment issued from a
//! made-up one without storing anything, and keep state (held outcomes) only
//! for the former. New ids are tagged under the current pepper; ids tagged
//! under any other configured one are still recognised, so a rotation does
//! not orphan the outcomes of calls answered just before it.

use chrono::{DateTime, Utc};
use subtle::ConstantTimeEq as _;
use uuid::Uuid;

use super::hash::{KeyedMac, SubkeyMacs};

/// What the pepper's subkey for event ids is derived for.
pub const PURPOSE: &str = "keywarden audit event id v1";

/// Mints and recognises this deployment's verification event ids.
#[derive(Clone, Debug)]
pub struct EventIds(SubkeyMacs);

impl EventIds {
    pub fn new(macs: SubkeyMacs) -> Self {
        Self(macs)
    }

    /// A new id: a UUIDv7 (time-ordered, like every audit id) with the tag
    /// in place of its last four random bytes. The 42 random bits left
    /// keep ids minted in the same millisecond apart.
    pub fn mint(&self) -> String {
        let mut bytes = *Uuid::now_v7().as_bytes();
        let tag = tag(self.0.current().1, &bytes);
        bytes[12..].copy_from_slice(&tag);
        Uuid::from_bytes(bytes).to_string()
    }

    /// Whether `id` is one [`EventIds::mint`] made with this key, and when
    /// (its UUIDv7 timestamp).
    pub fn issued_at(&self, id: &str) -> Option<DateTime<Utc>> {
        // Only the canonical form (hyphenated, lower case) is ever issued.
        if id.len() != 36 || id.bytes().any(|b| b.is_ascii_uppercase()) {
            return None;
        }
        let uuid = Uuid::parse_str(id).ok()?;
        if uuid.get_version_num() != 7 {
            return None;
        }
        let bytes = uuid.as_bytes();
        let mut known = false;
        for mac in self.0.all() {
            known |= bool::from(tag(mac, bytes).ct_eq(&bytes[12..]));
        }
        if !known {
            return None;
        }
        let (secs, nanos) = uuid.get_timestamp()?.to_unix();
        DateTime::from_timestamp(i64::try_from(secs).ok()?, nanos)
    }
}

fn tag(mac: &KeyedMac, bytes: &[u8; 16]) -> [u8; 4] {
    let digest = mac.digest(&bytes[..12]);
    [digest[0], digest[1], digest[2], digest[3]]
}

#[cfg(test)]
mod tests {
    // Tests read the real clock to build their inputs.
    #![allow(clippy::disallowed_methods)]

    use super::*;
    use proptest::prelude::*;

    use crate::keys::hash::{KeyHasher, PepperId};

    fn b64(secret: &[u8]) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(format!("{:<32}", String::from_utf8_lossy(secret)))
    }

    fn ids(secret: &[u8]) -> EventIds {
        EventIds::new(KeyHasher::from_base64(&b64(secret)).unwrap().subkey_macs("event ids"))
    }

    #[test]
    fn ids_minted_before_a_rotation_are_still_recognised_after_it() {
        let before = ids(b"one pepper");
        let id = before.mint();
        let (first, second) = (b64(b"one pepper"), b64(b"another pepper"));
        let rotated = KeyHasher::new(
            [(PepperId::first(), first.as_str()), (PepperId::parse("2").unwrap(), second.as_str())],
            &PepperId::parse("2").unwrap(),
        )
        .unwrap();
        let after = EventIds::new(rotated.subkey_macs("event ids"));
        assert!(after.issued_at(&id).is_some());
        // New ids are tagged under the new pepper: a replica without it cannot place them.
        let new = after.mint();
        assert!(after.issued_at(&new).is_some());
        assert_eq!(before.issued_at(&new), None);
        assert!(ids(b"another pepper").issued_at(&new).is_some());
    }

    #[test]
    fn minted_ids_are_v7_uuids_recognised_by_the_same_key_only() {
        let ours = ids(b"one pepper");
        let id = ours.mint();
        let uuid = Uuid::parse_str(&id).unwrap();
        assert_eq!(uuid.get_version_num(), 7);
        let at = ours.issued_at(&id).expect("recognised");
        assert!((Utc::now() - at).num_seconds().abs() < 5);
        assert_eq!(ids(b"another pepper").issued_at(&id), None);
        assert_eq!(ours.issued_at(&Uuid::now_v7().to_string()), None, "a plain v7 id");
        assert_eq!(ours.issued_at(&id.to_uppercase()), None, "not the form we issue");
        assert_ne!(ours.mint(), ours.mint());
    }

    proptest! {
        #[test]
        fn made_up_ids_are_not_recognised(s in ".{0,64}", raw in any::<[u8; 16]>()) {
            let ours = ids(b"pepper");
            prop_assert_eq!(ours.issued_at(&s), None);
            prop_assert_eq!(ours.issued_at(&Uuid::from_bytes(raw).to_string()), None);
        }

        #[test]
        fn any_changed_byte_unrecognises_an_id(position in 0usize..16, flip in 1u8..=255) {
            let ours = ids(b"pepper");
            let mut bytes = *Uuid::parse_str(&ours.mint()).unwrap().as_bytes();
            bytes[position] ^= flip;
            prop_assert_eq!(ours.issued_at(&Uuid::from_bytes(bytes).to_string()), None);
        }
    }
}
