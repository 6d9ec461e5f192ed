//! Where TLS comes from: the certificate, key, client CA and CRL files,
//! the server configuration each audience's handshakes use, and the
//! reload that swaps them when the files change.

use std::{
    io,
    path::Path,
    sync::{Arc, RwLock},
};

use rustls::{
    ServerConfig,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, pem::PemObject as _},
    server::WebPkiClientVerifier,
};
use thiserror::Error;
use tokio_rustls::TlsAcceptor;

use crate::{config::TlsSettings, metrics::Metrics, task::Task};

/// The one crypto provider of the binary, shared with sqlx's rustls.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("{what} {path}: {source}")]
    Read { what: &'static str, path: String, source: io::Error },
    #[error("{path}: no PEM {what} found")]
    Empty { what: &'static str, path: String },
    #[error("{path}: {message}")]
    Pem { path: String, message: String },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client CA: {0}")]
    ClientCa(String),
}

/// The files' contents as last loaded: a change is any difference, which
/// also catches Kubernetes' symlink swap of a Secret volume.
#[derive(Debug, PartialEq, Eq)]
struct Material {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
    client_crl: Option<Vec<u8>>,
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { what, path: path.display().to_string(), source })
}

impl Material {
    fn read(settings: &TlsSettings) -> Result<Self, TlsError> {
        Ok(Self {
            cert: read("cannot read the certificate", &settings.cert_file)?,
            key: read("cannot read the key", &settings.key_file)?,
            client_ca: settings
                .client_ca_file
                .as_deref()
                .map(|p| read("cannot read the client CA", p))
                .transpose()?,
            client_crl: settings
                .client_crl_file
                .as_deref()
                .map(|p| read("cannot read the client CRL", p))
                .transpose()?,
        })
    }

    /// The configuration of both audiences, built from the same files.
    fn server_configs(&self, settings: &TlsSettings) -> Result<Configs, TlsError> {
        Ok(Configs {
            grpc: Arc::new(self.server_config(settings, Audience::Grpc)?),
            public: Arc::new(self.server_config(settings, Audience::Public)?),
        })
    }

    fn server_config(&self, settings: &TlsSettings, audience: Audience) -> Result<ServerConfig, TlsError> {
        let path = |p: &Path| p.display().to_string();
        let chain = CertificateDer::pem_slice_iter(&self.cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::Pem { path: path(&settings.cert_file), message: e.to_string() })?;
        if chain.is_empty() {
            return Err(TlsError::Empty { what: "certificate", path: path(&settings.cert_file) });
        }
        // The error names the file, never its contents.
        let key = PrivateKeyDer::from_pem_slice(&self.key).map_err(|_| TlsError::Pem {
            path: path(&settings.key_file),
            message: "no PEM private key (PKCS#8, PKCS#1 or SEC1) could be read".into(),
        })?;
        let provider = provider();
        let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
        let builder = match (&self.client_ca, &settings.client_ca_file) {
            (Some(pem), Some(ca_path)) if audience == Audience::Grpc => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(pem) {
                    let cert =
                        cert.map_err(|e| TlsError::Pem { path: path(ca_path), message: e.to_string() })?;
                    roots.add(cert)?;
                }
                if roots.is_empty() {
                    return Err(TlsError::Empty { what: "CA certificate", path: path(ca_path) });
                }
                let mut verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
                if let (Some(pem), Some(crl_path)) = (&self.client_crl, &settings.client_crl_file) {
                    let crls = CertificateRevocationListDer::pem_slice_iter(pem)
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|e| TlsError::Pem { path: path(crl_path), message: e.to_string() })?;
                    if crls.is_empty() {
                        return Err(TlsError::Empty { what: "CRL", path: path(crl_path) });
                    }
                    verifier = verifier.with_crls(crls);
                }
                let verifier = verifier.build().map_err(|e| TlsError::ClientCa(e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
            _ => builder.with_no_client_auth(),
        };
        let mut config = builder.with_single_cert(chain, key)?;
        config.alpn_protocols = match audience {
            Audience::Grpc => vec![b"h2".to_vec()],
            Audience::Public => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        };
        Ok(config)
    }
}

/// Who a listener's TLS is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audience {
    /// gRPC clients: HTTP/2 only, and a client certificate under mTLS.
    Grpc,
    /// Senders from outside the platform (GitHub's leak reports): the same
    /// certificate, HTTP/1.1 or HTTP/2, and no client certificate, which
    /// they cannot present; they prove themselves in each request.
    Public,
}

/// The server configurations new handshakes use.
#[derive(Debug)]
struct Configs {
    grpc: Arc<ServerConfig>,
    public: Arc<ServerConfig>,
}

/// The current server configuration, swapped on reload.
#[derive(Debug)]
pub struct TlsSource {
    settings: TlsSettings,
    current: RwLock<Served>,
    metrics: Arc<Metrics>,
}

/// What new handshakes use, and the file contents last seen (a bad file
/// is remembered too, so that it is counted once).
#[derive(Debug)]
struct Served {
    configs: Configs,
    seen: Material,
}

impl TlsSource {
    /// Loads the files; at start, a file that does not load is an error.
    pub fn load(settings: TlsSettings, metrics: Arc<Metrics>) -> Result<Arc<Self>, TlsError> {
        let material = Material::read(&settings)?;
        let configs = material.server_configs(&settings)?;
        let current = RwLock::new(Served { configs, seen: material });
        Ok(Arc::new(Self { settings, current, metrics }))
    }

    pub(super) fn acceptor(&self, audience: Audience) -> TlsAcceptor {
        let current = self.current.read().unwrap_or_else(|e| e.into_inner());
        TlsAcceptor::from(Arc::clone(match audience {
            Audience::Grpc => &current.configs.grpc,
            Audience::Public => &current.configs.public,
        }))
    }

    /// Re-reads the files and, if they changed, serves them to new
    /// connections; files that do not load leave the current ones in place.
    fn reload(&self) {
        let material = match Material::read(&self.settings) {
            Ok(m) => m,
            Err(e) => {
                self.metrics.tls_reload_failures.inc();
                tracing::error!(error = %e, "TLS files unreadable; still serving the previous certificate");
                return;
            }
        };
        if self.current.read().unwrap_or_else(|e| e.into_inner()).seen == material {
            return;
        }
        let config = material.server_configs(&self.settings);
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        current.seen = material;
        match config {
            Ok(configs) => {
                current.configs = configs;
                self.metrics.tls_reloads.inc();
                tracing::info!("TLS certificate, key, client CA or CRL changed: new connections use them");
            }
            Err(e) => {
                self.metrics.tls_reload_failures.inc();
                tracing::error!(error = %e, "changed TLS files do not load; still serving the previous certificate");
            }
        }
    }

    /// The certificate reloader as a background task ([`TlsSource::watch`]).
    pub fn task(self: &Arc<Self>) -> Task {
        let tls = Arc::clone(self);
        Task::helper("certificate reloader", move |stop| Arc::clone(&tls).watch(stop))
    }

    /// Polls the files every reload interval until `stop`.
    pub async fn watch(self: Arc<Self>, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        let mut ticker = tokio::time::interval(self.settings.reload_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            tokio::select! {
                () = &mut stop => return,
                _ = ticker.tick() => {}
            }
            let this = Arc::clone(&self);
            // File reads and PEM parsing are blocking work.
            let _ = tokio::task::spawn_blocking(move || this.reload()).await;
        }
    }
}
