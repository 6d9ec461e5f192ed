//! Throwaway PKI for the TLS tests: a CA per test, server and client
//! certificates signed by it, and a TLS client (tokio-rustls under tonic)
//! that records every connection it makes and the serial each server
//! presented.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose, SanType,
    SerialNumber, date_time_ymd,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject as _};
use tonic::transport::{Channel, Endpoint, Uri};

pub struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, PEM.
#[derive(Clone)]
pub struct Leaf {
    pub cert: String,
    pub key: String,
}

impl Pki {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        Self { ca: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap() }
    }

    pub fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    /// A leaf for `names`: `spiffe://…` become URI SANs, IPs IP SANs, the
    /// rest DNS SANs. `expired` dates it in 2020.
    pub fn issue(&self, names: &[&str], serial: u64, expired: bool) -> Leaf {
        let mut params = CertificateParams::default();
        params.subject_alt_names = names
            .iter()
            .map(|n| {
                if n.contains("://") {
                    SanType::URI((*n).try_into().unwrap())
                } else if let Ok(ip) = n.parse() {
                    SanType::IpAddress(ip)
                } else {
                    SanType::DnsName((*n).try_into().unwrap())
                }
            })
            .collect();
        params.serial_number = Some(SerialNumber::from(serial));
        if expired {
            params.not_before = date_time_ymd(2020, 1, 1);
            params.not_after = date_time_ymd(2020, 6, 1);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        Leaf { cert: cert.pem(), key: key.serialize_pem() }
    }

    /// A leaf whose only SAN is the DNS name `name`, however it reads.
    pub fn issue_dns(&self, name: &str, serial: u64) -> Leaf {
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::DnsName(name.try_into().unwrap())];
        params.serial_number = Some(SerialNumber::from(serial));
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        Leaf { cert: cert.pem(), key: key.serialize_pem() }
    }

    /// A CRL of this CA revoking `serials`, PEM.
    pub fn crl(&self, number: u64, serials: &[u64]) -> String {
        let params = rcgen::CertificateRevocationListParams {
            this_update: date_time_ymd(2026, 1, 1),
            next_update: date_time_ymd(2099, 1, 1),
            crl_number: SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|s| rcgen::RevokedCertParams {
                    serial_number: SerialNumber::from(*s),
                    revocation_time: date_time_ymd(2026, 1, 1),
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        params.signed_by(&self.ca).unwrap().pem().unwrap()
    }

    /// The server's certificate: localhost and 127.0.0.1.
    pub fn server(&self, serial: u64) -> Leaf {
        self.issue(&["localhost", "127.0.0.1"], serial, false)
    }
}

/// Server TLS files in `dir`: cert.pem, key.pem and (for mTLS) client-ca.pem.
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

impl TlsFiles {
    pub fn new(dir: &Path) -> Self {
        Self { cert: dir.join("cert.pem"), key: dir.join("key.pem"), client_ca: dir.join("client-ca.pem") }
    }

    /// Replaces the certificate and key as a Secret volume update does: new
    /// files renamed into place.
    pub fn install(&self, leaf: &Leaf) {
        for (path, pem) in [(&self.cert, &leaf.cert), (&self.key, &leaf.key)] {
            let staged = path.with_extension("new");
            std::fs::write(&staged, pem).unwrap();
            std::fs::rename(&staged, path).unwrap();
        }
    }

    pub fn install_client_ca(&self, pem: &str) {
        std::fs::write(&self.client_ca, pem).unwrap();
    }
}

/// What a [`TlsClient`]'s channel did: connections made and the serial of
/// the certificate each server presented.
#[derive(Debug, Clone, Default)]
pub struct Dialed {
    pub connections: Arc<AtomicUsize>,
    pub serials: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl Dialed {
    pub fn count(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    pub fn last_serial(&self) -> Option<Vec<u8>> {
        self.serials.lock().unwrap().last().cloned()
    }
}

/// `serial`'s big-endian bytes without leading zeros, as X.509 holds it.
pub fn serial_bytes(serial: u64) -> Vec<u8> {
    let bytes = serial.to_be_bytes();
    let first = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len() - 1);
    bytes[first..].to_vec()
}

/// A TLS client trusting `ca_pem`, presenting `identity` if given.
#[derive(Clone)]
pub struct TlsClient {
    config: Arc<rustls::ClientConfig>,
}

impl TlsClient {
    pub fn new(ca_pem: &str, identity: Option<&Leaf>) -> Self {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        let builder =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots);
        let mut config = match identity {
            Some(leaf) => {
                let chain = CertificateDer::pem_slice_iter(leaf.cert.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .unwrap();
                let key = PrivateKeyDer::from_pem_slice(leaf.key.as_bytes()).unwrap();
                builder.with_client_auth_cert(chain, key).unwrap()
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Self { config: Arc::new(config) }
    }

    /// A lazy channel to `addr` over this client's TLS: it connects on the
    /// first call, and a failed handshake shows as that call's error.
    pub fn channel(&self, addr: SocketAddr) -> (Channel, Dialed) {
        let dialed = Dialed::default();
        let record = dialed.clone();
        let connector = tokio_rustls::TlsConnector::from(Arc::clone(&self.config));
        let connect = tower::service_fn(move |_: Uri| {
            let connector = connector.clone();
            let record = record.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                let tls = connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await?;
                let serial = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                    .and_then(|leaf| {
                        use x509_parser::prelude::FromDer;
                        let (_, cert) =
                            x509_parser::certificate::X509Certificate::from_der(leaf.as_ref()).ok()?;
                        Some(cert.tbs_certificate.raw_serial().to_vec())
                    })
                    .unwrap_or_default();
                record.connections.fetch_add(1, Ordering::SeqCst);
                record.serials.lock().unwrap().push(serial);
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        });
        let channel =
            Endpoint::from_shared(format!("http://{addr}")).unwrap().connect_with_connector_lazy(connect);
        (channel, dialed)
    }
}
