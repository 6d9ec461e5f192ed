//! Who is on the other end of a connection: its address and, under mTLS,
//! the identity its certificate names. Worked out once per connection (the
//! transport puts a [`PeerInfo`] into every request's extensions), read by
//! the caller check and the admin authentication. [`ActiveStreams`] counts
//! the connection's calls in flight, so that the transport can close a
//! connection that has had none for a while.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use x509_parser::{extensions::GeneralName, prelude::FromDer};

pub use crate::keys::identity::{ClientIdentity, has_scheme};

/// The peer of one connection.
#[derive(Debug, Clone, Default)]
pub struct PeerInfo {
    pub addr: Option<SocketAddr>,
    /// The client certificate's identity (mTLS only): its URI SAN, else its
    /// first DNS SAN.
    pub identity: Option<ClientIdentity>,
    /// The connection's calls in flight (absent where nothing closes idle
    /// connections, as in tests that build a `PeerInfo` by hand).
    pub streams: Option<Arc<ActiveStreams>>,
}

/// Longest identity kept: a SAN is attacker-chosen only within what the CA
/// signed, but audit rows and logs should stay bounded anyway.
const MAX_IDENTITY: usize = 512;

/// The identity a DER certificate names: its first URI SAN with a scheme
/// (SPIFFE ids are URI SANs), else its first DNS SAN that has none. `None`
/// for a certificate with neither, or one that does not parse.
pub fn identity_of(der: &[u8]) -> Option<ClientIdentity> {
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let names = &san.value.general_names;
    let fits = |s: &&str| !s.is_empty() && s.len() <= MAX_IDENTITY;
    let uri = names.iter().find_map(|n| match n {
        GeneralName::URI(u) if has_scheme(u) => Some(*u),
        _ => None,
    });
    let dns = || {
        names.iter().find_map(|n| match n {
            GeneralName::DNSName(d) if !has_scheme(d) => Some(*d),
            _ => None,
        })
    };
    match uri.filter(fits) {
        Some(uri) => Some(ClientIdentity::Uri(uri.into())),
        None => dns().filter(fits).map(|d| ClientIdentity::Dns(d.into())),
    }
}

/// A connection's calls in flight, and when its last one ended.
#[derive(Debug)]
pub struct ActiveStreams {
    open: AtomicUsize,
    since: Instant,
    /// Milliseconds after `since` that the last call ended (or the
    /// connection opened).
    last_end_ms: AtomicU64,
}

impl ActiveStreams {
    pub fn new(since: Instant) -> Self {
        Self { open: AtomicUsize::new(0), since, last_end_ms: AtomicU64::new(0) }
    }

    /// A call begins; it ends when the returned guard drops.
    pub fn begin(self: &Arc<Self>) -> StreamGuard {
        self.open.fetch_add(1, Ordering::AcqRel);
        StreamGuard(Arc::clone(self))
    }

    /// When the connection last had no call in flight, or `None` while it
    /// has one.
    pub fn idle_since(&self) -> Option<Instant> {
        if self.open.load(Ordering::Acquire) > 0 {
            return None;
        }
        Some(self.since + Duration::from_millis(self.last_end_ms.load(Ordering::Acquire)))
    }
}

/// One call in flight on a connection (see [`ActiveStreams::begin`]).
#[derive(Debug)]
pub struct StreamGuard(Arc<ActiveStreams>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let ms = u64::try_from(self.0.since.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.0.last_end_ms.fetch_max(ms, Ordering::AcqRel);
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cert(sans: Vec<rcgen::SanType>) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = sans;
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    fn uri(s: &str) -> Option<ClientIdentity> {
        Some(ClientIdentity::Uri(s.into()))
    }

    fn dns(s: &str) -> Option<ClientIdentity> {
        Some(ClientIdentity::Dns(s.into()))
    }

    #[test]
    fn the_uri_san_wins_over_dns_names() {
        let der = cert(vec![
            rcgen::SanType::DnsName("invoice.billing.svc".try_into().unwrap()),
            rcgen::SanType::URI("spiffe://cluster.local/ns/billing/sa/invoice".try_into().unwrap()),
        ]);
        assert_eq!(identity_of(&der), uri("spiffe://cluster.local/ns/billing/sa/invoice"));
    }

    #[test]
    fn without_a_uri_the_first_dns_name_is_the_identity() {
        let der = cert(vec![
            rcgen::SanType::DnsName("portal.example".try_into().unwrap()),
            rcgen::SanType::DnsName("second.example".try_into().unwrap()),
        ]);
        assert_eq!(identity_of(&der), dns("portal.example"));
    }

    #[test]
    fn a_dns_san_spelled_like_a_uri_is_no_identity_and_entries_match_their_own_kind() {
        let der = cert(vec![rcgen::SanType::DnsName("spiffe://cluster.local/ns/a/sa/b".try_into().unwrap())]);
        assert_eq!(identity_of(&der), None);
        let spiffe = "spiffe://cluster.local/ns/a/sa/b";
        assert!(ClientIdentity::Uri(spiffe.into()).matches(spiffe));
        assert!(!ClientIdentity::Dns(spiffe.into()).matches(spiffe), "a DNS SAN never matches a URI entry");
        assert!(ClientIdentity::Dns("portal.example".into()).matches("portal.example"));
        assert!(!ClientIdentity::Uri("portal.example".into()).matches("portal.example"));
        assert!(!ClientIdentity::Uri("spiffe://a".into()).matches("spiffe://b"));
    }

    #[test]
    fn a_connection_is_idle_only_with_no_call_in_flight() {
        let opened = Instant::now();
        let streams = Arc::new(ActiveStreams::new(opened));
        assert_eq!(streams.idle_since(), Some(opened));
        let call = streams.begin();
        let other = streams.begin();
        assert_eq!(streams.idle_since(), None);
        drop(call);
        assert_eq!(streams.idle_since(), None, "one call still in flight");
        drop(other);
        assert!(streams.idle_since().is_some_and(|at| at >= opened));
    }

    #[test]
    fn a_certificate_without_names_has_no_identity() {
        assert_eq!(identity_of(&cert(vec![rcgen::SanType::IpAddress([127, 0, 0, 1].into())])), None);
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = identity_of(&bytes);
        }

        #[test]
        fn truncated_certificates_never_panic(cut in 0usize..400) {
            let der = cert(vec![rcgen::SanType::URI("spiffe://a/b".try_into().unwrap())]);
            let _ = identity_of(&der[..cut.min(der.len())]);
        }
    }
}
