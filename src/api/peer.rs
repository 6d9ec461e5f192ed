//! Who is on the other end of a connection: its address and, under mTLS,
//! the identity its certificate names. Worked out once per connection (the
//! transport puts a [`PeerInfo`] into every request's extensions), read by
//! the caller check and the admin authentication.

use std::{net::SocketAddr, sync::Arc};

use x509_parser::{extensions::GeneralName, prelude::FromDer};

/// The peer of one connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerInfo {
    pub addr: Option<SocketAddr>,
    /// The client certificate's identity (mTLS only): its URI SAN, else its
    /// first DNS SAN.
    pub identity: Option<Arc<str>>,
}

/// Longest identity kept: a SAN is attacker-chosen only within what the CA
/// signed, but audit rows and logs should stay bounded anyway.
const MAX_IDENTITY: usize = 512;

/// The identity a DER certificate names: its first URI SAN (SPIFFE ids are
/// URI SANs), else its first DNS SAN. `None` for a certificate with neither,
/// or one that does not parse.
pub fn identity_of(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let names = &san.value.general_names;
    let uri = names.iter().find_map(|n| match n {
        GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    let dns = || {
        names.iter().find_map(|n| match n {
            GeneralName::DNSName(d) => Some(*d),
            _ => None,
        })
    };
    uri.or_else(dns).filter(|s| !s.is_empty() && s.len() <= MAX_IDENTITY).map(str::to_owned)
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

    #[test]
    fn the_uri_san_wins_over_dns_names() {
        let der = cert(vec![
            rcgen::SanType::DnsName("invoice.billing.svc".try_into().unwrap()),
            rcgen::SanType::URI("spiffe://cluster.local/ns/billing/sa/invoice".try_into().unwrap()),
        ]);
        assert_eq!(identity_of(&der).as_deref(), Some("spiffe://cluster.local/ns/billing/sa/invoice"));
    }

    #[test]
    fn without_a_uri_the_first_dns_name_is_the_identity() {
        let der = cert(vec![
            rcgen::SanType::DnsName("portal.example".try_into().unwrap()),
            rcgen::SanType::DnsName("second.example".try_into().unwrap()),
        ]);
        assert_eq!(identity_of(&der).as_deref(), Some("portal.example"));
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
