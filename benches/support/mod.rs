//! What the benchmark programs share: a throwaway PostgreSQL database next
//! to the one an admin URL names, so a run never touches existing data.

#![allow(dead_code, clippy::unwrap_used)]

use sea_orm::sqlx::{AssertSqlSafe, Connection, Executor, PgConnection};

/// Creates database `name` (dropping a leftover of the same name) and
/// returns its URL.
pub async fn create_postgres(admin_url: &str, name: &str) -> String {
    let mut conn = PgConnection::connect(admin_url).await.unwrap();
    let _ = conn.execute(AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))).await;
    conn.execute(AssertSqlSafe(format!("CREATE DATABASE {name}"))).await.unwrap();
    let base = admin_url.rsplit_once('/').map_or(admin_url, |(b, _)| b);
    format!("{base}/{name}")
}

/// Drops database `name`, best effort: a benchmark that ends anyway should
/// not fail over its clean-up.
pub async fn drop_postgres(admin_url: &str, name: &str) {
    if let Ok(mut conn) = PgConnection::connect(admin_url).await {
        let _ = conn.execute(AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))).await;
    }
}

/// A throwaway CA with a server certificate (127.0.0.1, localhost) and a
/// client certificate, as PEM files in `dir`, and TLS client settings that
/// trust the CA (presenting the client certificate for mTLS).
pub mod tls {
    use std::{
        net::SocketAddr,
        path::{Path, PathBuf},
        sync::Arc,
    };

    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, KeyUsagePurpose, SanType,
    };
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject as _};
    use tonic::transport::{Channel, Endpoint, Uri};

    pub struct Files {
        pub cert: PathBuf,
        pub key: PathBuf,
        pub ca: PathBuf,
        client_cert: String,
        client_key: String,
        ca_pem: String,
    }

    pub fn make(dir: &Path) -> Files {
        let mut ca = CertificateParams::default();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
        let leaf = |sans: Vec<SanType>| {
            let mut params = CertificateParams::default();
            params.subject_alt_names = sans;
            let key = KeyPair::generate().unwrap();
            (params.signed_by(&key, &ca).unwrap().pem(), key.serialize_pem())
        };
        let (server_cert, server_key) = leaf(vec![
            SanType::IpAddress([127, 0, 0, 1].into()),
            SanType::DnsName("localhost".try_into().unwrap()),
        ]);
        let (client_cert, client_key) =
            leaf(vec![SanType::URI("spiffe://bench/ns/billing/sa/invoice".try_into().unwrap())]);
        let files = Files {
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
            ca: dir.join("ca.pem"),
            client_cert,
            client_key,
            ca_pem: ca.pem(),
        };
        std::fs::write(&files.cert, server_cert).unwrap();
        std::fs::write(&files.key, server_key).unwrap();
        std::fs::write(&files.ca, &files.ca_pem).unwrap();
        files
    }

    impl Files {
        /// Client settings: the CA, and the client certificate if `mutual`.
        pub fn client(&self, mutual: bool) -> Arc<rustls::ClientConfig> {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
                roots.add(cert.unwrap()).unwrap();
            }
            let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
            let mut config = if mutual {
                let chain = CertificateDer::pem_slice_iter(self.client_cert.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .unwrap();
                builder
                    .with_client_auth_cert(
                        chain,
                        PrivateKeyDer::from_pem_slice(self.client_key.as_bytes()).unwrap(),
                    )
                    .unwrap()
            } else {
                builder.with_no_client_auth()
            };
            config.alpn_protocols = vec![b"h2".to_vec()];
            Arc::new(config)
        }
    }

    /// One TCP connection and TLS handshake to `addr`.
    pub async fn handshake(
        config: &Arc<rustls::ClientConfig>,
        addr: SocketAddr,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        tokio_rustls::TlsConnector::from(Arc::clone(config))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
    }

    /// An HTTP/2 channel over one TLS connection.
    pub async fn channel(config: Arc<rustls::ClientConfig>, addr: SocketAddr) -> Channel {
        let connector = tower::service_fn(move |_: Uri| {
            let config = Arc::clone(&config);
            async move { handshake(&config, addr).await.map(hyper_util::rt::TokioIo::new) }
        });
        Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_with_connector(connector)
            .await
            .unwrap()
    }
}
