//! The whole Verify decision from request bytes, without I/O: decode a
//! `VerifyRequest`, convert it as the handler does, validate, parse the key
//! and decide against a key state that the first bytes describe; then map
//! errors to a status and the verdict to a response as the server does.
//!
//! Input: byte 0 holds flags (is the key found, is it revoked or expiring
//! and when, is it disabled, should the key field be made well-formed,
//! which allow-list),
//! bytes 1..9 a grant as a bit mask over the catalogue, the rest is the
//! request's protobuf encoding.
//!
//! Checked against an oracle written from the contract: a request is
//! invalid exactly when one of its fields is, and the outcome is the first
//! of malformed, not found, revoked, disabled, expired, IP not allowed,
//! insufficient scope that applies, else an allow that grants what the key
//! holds, with its metadata.
#![no_main]

use std::{net::IpAddr, sync::Arc, sync::LazyLock};

use chrono::{DateTime, Duration, Utc};
use keywarden::{
    api::{convert, pb},
    keys::{
        AllowList, DenyReason, KeyPrefix, KeyState, Metadata, PlainKey, Policy, ScopeCatalogue, ScopeSet,
        format::checksummed,
    },
    service::{
        ServiceError, validate,
        verify::{Verdict, decide_offline},
    },
};
use libfuzzer_sys::fuzz_target;
use prost::Message;

static CATALOGUE: LazyLock<ScopeCatalogue> = LazyLock::new(|| {
    let (defs, presets) = ScopeCatalogue::default_defs();
    ScopeCatalogue::new(defs, presets).expect("the default catalogue")
});
static PREFIX: LazyLock<KeyPrefix> = LazyLock::new(|| KeyPrefix::new("sntr_").expect("the default prefix"));
static SCOPE_NAMES: LazyLock<Vec<String>> =
    LazyLock::new(|| CATALOGUE.scopes().map(|(def, _)| def.name.clone()).collect());

const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
const ALLOW_LISTS: [&[&str]; 4] = [&[], &["10.0.0.0/8"], &["192.168.1.0/24", "::1/128"], &["0.0.0.0/0"]];

const FOUND: u8 = 1;
const REVOKED: u8 = 1 << 1;
const LATER: u8 = 1 << 2;
const EXPIRES: u8 = 1 << 3;
const WELL_FORMED: u8 = 1 << 4;
const DISABLED: u8 = 1 << 5;

fn now() -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000, 0).expect("a valid instant")
}

/// The key state the flags and mask describe.
fn state(flags: u8, mask: u64) -> KeyState {
    let now = now();
    let at = if flags & LATER != 0 { now + Duration::seconds(1) } else { now };
    let granted: Vec<&str> = SCOPE_NAMES
        .iter()
        .enumerate()
        .filter(|(i, _)| mask & (1 << (i % 64)) != 0)
        .map(|(_, n)| n.as_str())
        .collect();
    // An empty grant is refused at issue; a key granting nothing is still a
    // state worth deciding on.
    let scopes = match granted.is_empty() {
        true => ScopeSet::default(),
        false => CATALOGUE.expand(CATALOGUE.parse_grant(&granted).expect("catalogue names")),
    };
    KeyState {
        key_id: Arc::from("0190f5c2-0000-7000-8000-000000000001"),
        merchant_id: "m_fuzz".into(),
        name: "fuzzed".into(),
        policy: Policy {
            revoked_at: (flags & REVOKED != 0).then_some(at),
            expires_at: (flags & EXPIRES != 0).then_some(at + Duration::milliseconds(1)),
            disabled: flags & DISABLED != 0,
            allowed: AllowList::parse(ALLOW_LISTS[usize::from(flags >> 6)]).expect("fixed lists parse"),
            scopes,
        },
        rate_limits: Default::default(),
        credits: None,
        metadata: Metadata::new([("plan".to_owned(), "gold".to_owned())]).expect("a valid entry"),
        version: 1,
    }
}

/// A well-formed key whose random part comes from `seed`.
fn well_formed(seed: &str) -> String {
    let mut body = PREFIX.as_str().to_owned();
    let bytes = seed.as_bytes();
    body.extend((0..43).map(|i| char::from(BASE62[usize::from(bytes.get(i).copied().unwrap_or(0)) % 62])));
    checksummed(body)
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else { return };
    let Some((mask, body)) = rest.split_first_chunk::<8>() else { return };
    let Ok(request) = pb::VerifyRequest::decode(body) else { return };
    let mut input = convert::verify_input(request);
    if flags & WELL_FORMED != 0 {
        input.key = well_formed(&input.key);
    }
    let key_state = state(flags, u64::from_le_bytes(*mask));
    let found = (flags & FOUND != 0).then_some(&key_state);
    let now = now();

    let result = decide_offline(&CATALOGUE, &PREFIX, &input, found, now);

    let ip = (!input.ip.is_empty()).then(|| input.ip.parse::<IpAddr>());
    let required = (!input.required_scope.is_empty()).then(|| CATALOGUE.required(&input.required_scope));
    let invalid = input.key.len() > validate::MAX_PRESENTED_KEY
        || matches!(ip, Some(Err(_)))
        || matches!(required, Some(None))
        || validate::endpoint(&input.endpoint).is_err()
        || validate::method(&input.method).is_err();
    let outcome = match result {
        Err(e) => {
            assert!(invalid, "refused a valid request: {e}");
            let ServiceError::Invalid(violations) = &e else { panic!("not a validation error: {e}") };
            assert!(!violations.is_empty() && violations.len() <= validate::MAX_LISTED_VIOLATIONS + 1);
            let status = tonic::Status::from(e);
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert!(status.message().len() <= 2048, "an unbounded message: {} bytes", status.message().len());
            return;
        }
        Ok(outcome) => outcome,
    };
    assert!(!invalid, "accepted an invalid request");
    let ip = ip.and_then(Result::ok);
    let required = required.flatten();

    let well_formed = PlainKey::parse(&PREFIX, &input.key).is_ok();
    let expected = if !well_formed {
        Err(DenyReason::Malformed)
    } else if let Some(state) = found {
        let p = &state.policy;
        if p.revoked_at.is_some_and(|at| at <= now) {
            Err(DenyReason::Revoked)
        } else if p.disabled {
            Err(DenyReason::Disabled)
        } else if p.expires_at.is_some_and(|at| at <= now) {
            Err(DenyReason::Expired)
        } else if !p.allowed.permits(ip) {
            Err(DenyReason::IpNotAllowed)
        } else if required.is_some_and(|r| !p.scopes.contains(r)) {
            Err(DenyReason::InsufficientScope)
        } else {
            Ok(())
        }
    } else {
        Err(DenyReason::NotFound)
    };
    assert_eq!(outcome.as_ref().map(|_| ()).map_err(|r| *r), expected);
    if let Ok(grant) = &outcome {
        assert_eq!(grant.merchant_id, key_state.merchant_id);
        assert_eq!(grant.scopes, CATALOGUE.names(key_state.policy.scopes));
        assert_eq!(grant.metadata, key_state.metadata, "an allow carries the key's metadata");
        if let Some(required) = required {
            let names = CATALOGUE.names(required);
            assert!(names.iter().all(|n| grant.scopes.contains(n)), "allowed without {names:?}");
        }
    }

    let response = convert::verdict(Verdict {
        outcome: outcome.clone(),
        audit_event_id: "id".into(),
        rate_limit: None,
        credits_remaining: None,
    });
    let decoded = pb::VerifyResponse::decode(response.encode_to_vec().as_slice()).expect("our own encoding");
    match outcome {
        Ok(_) => assert_eq!(decoded.decision(), pb::Decision::Allow),
        Err(reason) => {
            assert_eq!(decoded.decision(), pb::Decision::Deny);
            assert_eq!(decoded.deny_reason(), convert::deny_reason(reason));
            assert!(
                decoded.merchant_id.is_empty() && decoded.scopes.is_empty() && decoded.metadata.is_empty(),
                "a denial leaks the key"
            );
        }
    }
});
