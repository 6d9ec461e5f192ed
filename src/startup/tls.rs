//! The transport: TCP listeners, optionally TLS (1.2 and 1.3, ring), with
//! certificate, key and client CA re-read when their files change.
//!
//! A reload swaps the configuration that *new* handshakes use; established
//! connections keep the session they negotiated, so rotation drops nothing.
//! Files that do not load leave the previous configuration in place (logged
//! and counted), so a half-written Secret never takes the service down.

use std::{
    io,
    net::SocketAddr,
    path::Path,
    pin::Pin,
    sync::{Arc, RwLock},
    task::{Context, Poll},
    time::Duration,
};

use rustls::{
    ServerConfig,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
    server::WebPkiClientVerifier,
};
use thiserror::Error;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore, mpsc},
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use crate::{
    api::peer::{PeerInfo, identity_of},
    config::TlsSettings,
    metrics::Metrics,
};

/// How long a client may take to complete its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed `accept` (e.g. out of file descriptors), so the loop
/// does not spin while the condition lasts.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

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
        })
    }

    fn server_config(&self, settings: &TlsSettings) -> Result<ServerConfig, TlsError> {
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
            (Some(pem), Some(ca_path)) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(pem) {
                    let cert =
                        cert.map_err(|e| TlsError::Pem { path: path(ca_path), message: e.to_string() })?;
                    roots.add(cert)?;
                }
                if roots.is_empty() {
                    return Err(TlsError::Empty { what: "CA certificate", path: path(ca_path) });
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .map_err(|e| TlsError::ClientCa(e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
            _ => builder.with_no_client_auth(),
        };
        let mut config = builder.with_single_cert(chain, key)?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }
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
    config: Arc<ServerConfig>,
    seen: Material,
}

impl TlsSource {
    /// Loads the files; at start, a file that does not load is an error.
    pub fn load(settings: TlsSettings, metrics: Arc<Metrics>) -> Result<Arc<Self>, TlsError> {
        let material = Material::read(&settings)?;
        let config = material.server_config(&settings)?;
        let current = RwLock::new(Served { config: Arc::new(config), seen: material });
        Ok(Arc::new(Self { settings, current, metrics }))
    }

    fn acceptor(&self) -> TlsAcceptor {
        let current = self.current.read().unwrap_or_else(|e| e.into_inner());
        TlsAcceptor::from(Arc::clone(&current.config))
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
        let config = material.server_config(&self.settings);
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        current.seen = material;
        match config {
            Ok(config) => {
                current.config = Arc::new(config);
                self.metrics.tls_reloads.inc();
                tracing::info!("TLS certificate, key or client CA changed: new connections use them");
            }
            Err(e) => {
                self.metrics.tls_reload_failures.inc();
                tracing::error!(error = %e, "changed TLS files do not load; still serving the previous certificate");
            }
        }
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

/// One accepted connection, plaintext or TLS, with its peer. It holds one
/// of the listener's connection slots until it closes.
pub struct Conn {
    io: Io,
    peer: PeerInfo,
    _slot: OwnedSemaphorePermit,
}

enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Connected for Conn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Connections accepted on `listener`, handshaken with `tls` when given.
/// Handshakes run concurrently, off the accept loop, so a slow or hostile
/// client cannot hold up others. At most `max_connections` are open at
/// once, handshakes included: past that, new clients wait in the kernel's
/// backlog rather than cost memory here. A connection is accepted only when
/// the server can take it at once, and accepting stops (the listener closes)
/// as soon as `stop` resolves (the drain starts): a client connecting then
/// is refused and tries another replica, rather than being accepted and
/// then reset when the process exits.
pub fn incoming(
    listener: TcpListener,
    tls: Option<Arc<TlsSource>>,
    max_connections: usize,
    metrics: Arc<Metrics>,
    stop: impl Future<Output = ()> + Send + 'static,
) -> ReceiverStream<io::Result<Conn>> {
    let (tx, rx) = mpsc::channel::<io::Result<Conn>>(1);
    let open = Arc::new(Semaphore::new(max_connections.max(1)));
    tokio::spawn(async move {
        tokio::pin!(stop);
        loop {
            let room = tokio::select! {
                () = &mut stop => return,
                permit = Arc::clone(&open).acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => return,
                },
            };
            // Plaintext: hold a slot before accepting, so that a connection
            // is only accepted when the server takes it at once. (TLS
            // connections take their slot after the handshake.)
            let slot = match &tls {
                None => tokio::select! {
                    () = &mut stop => return,
                    permit = tx.clone().reserve_owned() => match permit {
                        Ok(p) => Slot::Plain(p),
                        Err(_) => return,
                    },
                },
                Some(tls) => Slot::AfterHandshake(Arc::clone(tls)),
            };
            let accepted = tokio::select! {
                () = &mut stop => return,
                () = tx.closed() => return,
                accepted = listener.accept() => accepted,
            };
            let (stream, addr) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed; retrying");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            // Small writes (one response at a time) must not wait for Nagle.
            let _ = stream.set_nodelay(true);
            match slot {
                Slot::Plain(permit) => {
                    let peer = PeerInfo { addr: Some(addr), identity: None };
                    permit.send(Ok(Conn { io: Io::Plain(stream), peer, _slot: room }));
                }
                Slot::AfterHandshake(tls) => {
                    // The configuration current now, after any reload.
                    let acceptor = tls.acceptor();
                    let tx = tx.clone();
                    let metrics = Arc::clone(&metrics);
                    tokio::spawn(async move {
                        match handshake(acceptor, stream, addr, room).await {
                            Ok(conn) => {
                                let _ = tx.send(Ok(conn)).await;
                            }
                            Err(e) => {
                                metrics.tls_handshake_failures.inc();
                                tracing::debug!(peer = %addr, error = %e, "TLS handshake failed");
                            }
                        }
                    });
                }
            }
        }
    });
    ReceiverStream::new(rx)
}

/// Where an accepted connection goes: into the slot held for it
/// (plaintext), or through a TLS handshake that then waits for one.
enum Slot {
    Plain(mpsc::OwnedPermit<io::Result<Conn>>),
    AfterHandshake(Arc<TlsSource>),
}

async fn handshake(
    acceptor: TlsAcceptor,
    stream: TcpStream,
    addr: SocketAddr,
    slot: OwnedSemaphorePermit,
) -> io::Result<Conn> {
    let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "handshake timed out"))??;
    let identity = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|leaf| identity_of(leaf.as_ref()))
        .map(Arc::from);
    Ok(Conn { io: Io::Tls(Box::new(tls)), peer: PeerInfo { addr: Some(addr), identity }, _slot: slot })
}
