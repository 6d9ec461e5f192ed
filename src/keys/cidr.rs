//! IP allow-lists: single addresses and CIDR ranges, IPv4 and IPv6.
//!
//! Entries are canonicalised on the way in (a host is its plain address, a
//! range is `network/length`), and a range with host bits set is refused as a
//! probable typo. IPv4-mapped IPv6 addresses count as IPv4 on both sides.

use std::net::IpAddr;

use ipnet::IpNet;
use thiserror::Error;

/// Most entries one key may list.
pub const MAX_ENTRIES: usize = 100;

/// `entry` is an excerpt of what was sent ([`super::excerpt`]), quoted.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CidrError {
    #[error("{entry} is not an IP address or CIDR range")]
    Syntax { index: usize, entry: String },
    #[error("{entry} has host bits set; did you mean {suggestion}?")]
    HostBits { index: usize, entry: String, suggestion: String },
    #[error("{entry} is listed twice")]
    Duplicate { index: usize, entry: String },
    #[error("at most {MAX_ENTRIES} entries may be given")]
    TooMany,
}

impl CidrError {
    /// Position of the offending entry, where there is one.
    pub fn index(&self) -> Option<usize> {
        match self {
            Self::Syntax { index, .. } | Self::HostBits { index, .. } | Self::Duplicate { index, .. } => {
                Some(*index)
            }
            Self::TooMany => None,
        }
    }
}

/// Where a key may be used from. Empty means anywhere.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList(Vec<IpNet>);

impl AllowList {
    /// Validates and canonicalises entries given by an administrator.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Self, CidrError> {
        if entries.len() > MAX_ENTRIES {
            return Err(CidrError::TooMany);
        }
        let mut nets: Vec<IpNet> = Vec::with_capacity(entries.len());
        let mut seen = std::collections::HashSet::with_capacity(entries.len());
        for (index, entry) in entries.iter().enumerate() {
            let entry = entry.as_ref();
            let net = parse_entry(entry).map_err(|e| e.at(index, entry))?;
            if !seen.insert(net) {
                return Err(CidrError::Duplicate { index, entry: super::excerpt(entry, super::MAX_EXCERPT) });
            }
            nets.push(net);
        }
        Ok(Self(nets))
    }

    /// Reads back a stored, already canonical list. An unreadable entry is an
    /// error (naming it) rather than skipped, since skipping could widen access.
    pub fn from_stored<'a>(entries: impl IntoIterator<Item = &'a str>) -> Result<Self, String> {
        entries
            .into_iter()
            .map(|e| parse_entry(e).map_err(|_| e.to_owned()))
            .collect::<Result<Vec<_>, _>>()
            .map(Self)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether a caller at `ip` may use the key. A restricted key needs a
    /// known caller address.
    pub fn permits(&self, ip: Option<IpAddr>) -> bool {
        if self.0.is_empty() {
            return true;
        }
        let Some(ip) = ip else { return false };
        let ip = ip.to_canonical();
        self.0.iter().any(|net| net.contains(&ip))
    }

    /// Canonical text of each entry.
    pub fn canonical(&self) -> Vec<String> {
        self.0.iter().map(|net| canonical(*net)).collect()
    }
}

enum EntryError {
    Syntax,
    HostBits(IpNet),
}

impl EntryError {
    fn at(self, index: usize, entry: &str) -> CidrError {
        let entry = super::excerpt(entry, super::MAX_EXCERPT);
        match self {
            Self::Syntax => CidrError::Syntax { index, entry },
            Self::HostBits(net) => CidrError::HostBits { index, entry, suggestion: canonical(net.trunc()) },
        }
    }
}

fn parse_entry(entry: &str) -> Result<IpNet, EntryError> {
    let net = if entry.contains('/') {
        let net: IpNet = entry.parse().map_err(|_| EntryError::Syntax)?;
        if net.trunc() != net {
            return Err(EntryError::HostBits(net));
        }
        net
    } else {
        IpNet::from(entry.parse::<IpAddr>().map_err(|_| EntryError::Syntax)?)
    };
    Ok(unmap(net))
}

/// `::ffff:a.b.c.d/n` (n ≥ 96) is the IPv4 range `a.b.c.d/(n-96)`.
fn unmap(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96).map(IpNet::V4).unwrap_or(net),
            None => net,
        },
        _ => net,
    }
}

fn canonical(net: IpNet) -> String {
    if net.prefix_len() == net.max_prefix_len() { net.addr().to_string() } else { net.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn list(entries: &[&str]) -> AllowList {
        AllowList::parse(entries).unwrap()
    }

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn empty_list_permits_everyone_even_without_an_address() {
        assert!(AllowList::default().permits(None));
        assert!(AllowList::default().permits(ip("8.8.8.8")));
    }

    #[test]
    fn restricted_keys_need_a_caller_address() {
        assert!(!list(&["10.0.0.0/8"]).permits(None));
    }

    #[test]
    fn ipv4_single_and_range() {
        let l = list(&["203.0.113.7", "10.0.0.0/8"]);
        assert!(l.permits(ip("203.0.113.7")));
        assert!(!l.permits(ip("203.0.113.8")));
        assert!(l.permits(ip("10.255.1.2")));
        assert!(!l.permits(ip("11.0.0.1")));
    }

    #[test]
    fn ipv6_single_and_range() {
        let l = list(&["2001:db8::/32", "2001:db9::1"]);
        assert!(l.permits(ip("2001:db8:ffff::1")));
        assert!(l.permits(ip("2001:db9::1")));
        assert!(!l.permits(ip("2001:db9::2")));
        assert!(!l.permits(ip("10.0.0.1")));
    }

    #[test]
    fn mapped_ipv6_callers_match_ipv4_ranges() {
        let l = list(&["192.168.1.0/24"]);
        assert!(l.permits(ip("::ffff:192.168.1.100")));
        assert!(!l.permits(ip("::ffff:192.168.2.1")));
    }

    #[test]
    fn mapped_ipv6_entries_become_ipv4() {
        let l = list(&["::ffff:192.168.1.0/120", "::ffff:10.0.0.1"]);
        assert_eq!(l.canonical(), ["192.168.1.0/24", "10.0.0.1"]);
        assert!(l.permits(ip("192.168.1.9")));
    }

    #[test]
    fn entries_are_canonicalised() {
        let l = list(&["203.0.113.7/32", "2001:DB8:0:0::/32", "2001:db8::1/128", "10.0.0.0/8"]);
        assert_eq!(l.canonical(), ["203.0.113.7", "2001:db8::/32", "2001:db8::1", "10.0.0.0/8"]);
    }

    #[test]
    fn host_bits_are_refused_with_a_suggestion() {
        let err = AllowList::parse(&["1.2.3.4", "10.1.2.3/8"]).unwrap_err();
        assert_eq!(
            err,
            CidrError::HostBits { index: 1, entry: "\"10.1.2.3/8\"".into(), suggestion: "10.0.0.0/8".into() }
        );
        // However long the entry, the error quotes 64 characters of it.
        let long = format!("10.1.2.3/8{}", "x".repeat(1 << 20));
        let err = AllowList::parse(&[long]).unwrap_err().to_string();
        assert!(err.len() < 200, "{} bytes", err.len());
    }

    #[test]
    fn garbage_and_duplicates_are_refused_by_position() {
        for bad in ["", "10.0.0", "10.0.0.0/33", "::/129", "host.example", " 10.0.0.1", "10.0.0.1/"] {
            assert!(matches!(AllowList::parse(&[bad]), Err(CidrError::Syntax { index: 0, .. })), "{bad:?}");
        }
        let err = AllowList::parse(&["10.0.0.1", "10.0.0.1/32"]).unwrap_err();
        assert_eq!(err.index(), Some(1));
        assert!(matches!(err, CidrError::Duplicate { .. }));
    }

    #[test]
    fn at_most_a_hundred_entries() {
        let entries: Vec<String> = (0..101).map(|i| format!("10.0.{}.{}", i / 256, i % 256)).collect();
        assert_eq!(AllowList::parse(&entries).unwrap_err(), CidrError::TooMany);
        assert!(AllowList::parse(&entries[..100]).is_ok());
    }

    proptest! {
        #[test]
        fn parse_never_panics(s in "\\PC{0,60}") {
            let _ = AllowList::parse(&[s]);
        }

        #[test]
        fn canonical_form_is_a_fixed_point(a in any::<u32>(), len in 0u8..=32) {
            let net = ipnet::Ipv4Net::new(a.into(), len).unwrap().trunc();
            let first = list(&[&net.to_string()]).canonical();
            let again = AllowList::parse(&first).unwrap().canonical();
            prop_assert_eq!(first, again);
        }

        #[test]
        fn v4_range_membership_matches_arithmetic(a in any::<u32>(), len in 0u8..=32, probe in any::<u32>()) {
            let net = ipnet::Ipv4Net::new(a.into(), len).unwrap().trunc();
            let l = list(&[&net.to_string()]);
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            let inside = probe & mask == u32::from(net.network());
            prop_assert_eq!(l.permits(Some(IpAddr::from(std::net::Ipv4Addr::from(probe)))), inside);
            let mapped = std::net::Ipv4Addr::from(probe).to_ipv6_mapped();
            prop_assert_eq!(l.permits(Some(IpAddr::from(mapped))), inside);
        }
    }
}
