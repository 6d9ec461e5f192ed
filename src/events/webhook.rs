//! Webhooks: signing secrets, the Standard Webhooks signature, and the
//! POST of one event to one endpoint.
//!
//! The signing secret is `whsec_` + base64 of 32 random bytes, shown once
//! when the endpoint is created. The database holds it sealed: XORed with
//! a pad that is the MAC of the endpoint's id under a pepper subkey, so a
//! copy of the database alone cannot sign (the pad differs per endpoint,
//! and the secret never changes, so no pad is used twice).

use std::{fmt, sync::Arc, time::Duration};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{Request, Uri, client::conn::http1::SendRequest, header};
use hyper_util::rt::TokioIo;
use subtle::ConstantTimeEq as _;
use tokio::net::TcpStream;

use crate::keys::{
    PepperId,
    hash::{KeyedMac, SubkeyMacs, hmac_sha256},
};

/// The pepper subkey purpose that seals signing secrets.
pub const SEAL_PURPOSE: &str = "keywarden webhook signing secret";
const PREFIX: &str = "whsec_";
const SECRET_LEN: usize = 32;
/// Longest URL accepted.
pub const MAX_URL_LEN: usize = 2_048;
/// How much of a receiver's answer is read (then the connection is dropped).
const MAX_ANSWER_BYTES: usize = 64 << 10;

/// A webhook signing secret. `Debug` shows nothing of it.
#[derive(Clone)]
pub struct SigningSecret([u8; SECRET_LEN]);

impl fmt::Debug for SigningSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningSecret(..)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("no randomness for a signing secret")]
    Randomness,
    #[error("the signing secret of endpoint {0} is sealed under pepper {1}, which is not configured")]
    UnknownPepper(String, PepperId),
    #[error("the sealed signing secret of endpoint {0} is damaged")]
    Damaged(String),
}

impl SigningSecret {
    pub fn generate() -> Result<Self, SecretError> {
        let mut bytes = [0u8; SECRET_LEN];
        getrandom::fill(&mut bytes).map_err(|_| SecretError::Randomness)?;
        Ok(Self(bytes))
    }

    /// `whsec_…`, for the one answer that shows it.
    pub fn reveal(&self) -> String {
        format!("{PREFIX}{}", STANDARD.encode(self.0))
    }

    /// The sealed form stored for endpoint `id`, and the pepper it is
    /// sealed under.
    pub fn seal(&self, macs: &SubkeyMacs, id: &str) -> (String, PepperId) {
        let (pepper, mac) = macs.current();
        (STANDARD.encode(xor(&self.0, &pad(mac, id))), pepper.clone())
    }

    pub fn unseal(macs: &SubkeyMacs, id: &str, pepper: &PepperId, sealed: &str) -> Result<Self, SecretError> {
        let mac = macs.of(pepper).ok_or_else(|| SecretError::UnknownPepper(id.to_owned(), pepper.clone()))?;
        let bytes: [u8; SECRET_LEN] = STANDARD
            .decode(sealed)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| SecretError::Damaged(id.to_owned()))?;
        Ok(Self(xor(&bytes, &pad(mac, id))))
    }

    /// `v1,<base64 HMAC-SHA256(secret, "<id>.<timestamp>.<body>")>`.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        signature(&self.0, id, timestamp, body)
    }

    /// Whether `signature` (one `v1,…` entry) is this secret's for the
    /// message; in constant time.
    pub fn verifies(&self, id: &str, timestamp: i64, body: &[u8], signature: &str) -> bool {
        self.sign(id, timestamp, body).as_bytes().ct_eq(signature.as_bytes()).into()
    }
}

/// The Standard Webhooks `v1` signature under `secret` (the bytes after
/// `whsec_`, decoded).
pub fn signature(secret: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut message = format!("{id}.{timestamp}.").into_bytes();
    message.extend_from_slice(body);
    format!("v1,{}", STANDARD.encode(hmac_sha256(secret, &message)))
}

fn pad(mac: &KeyedMac, id: &str) -> [u8; SECRET_LEN] {
    mac.digest(id.as_bytes())
}

fn xor(a: &[u8; SECRET_LEN], b: &[u8; SECRET_LEN]) -> [u8; SECRET_LEN] {
    std::array::from_fn(|i| a[i] ^ b[i])
}

/// Why a URL is not a webhook endpoint.
pub fn check_url(url: &str, allow_http: bool) -> Result<Uri, String> {
    if url.len() > MAX_URL_LEN {
        return Err(format!("is longer than {MAX_URL_LEN} bytes"));
    }
    let uri: Uri = url.parse().map_err(|_| "is not a URL".to_owned())?;
    match uri.scheme_str() {
        Some("https") => {}
        Some("http") if allow_http => {}
        Some("http") => return Err("must be https:// (http:// needs webhook_allow_http)".into()),
        _ => return Err("must be an https:// URL".into()),
    }
    let Some(authority) = uri.authority() else {
        return Err("has no host".into());
    };
    // Credentials in a URL would be stored and listed in the clear.
    if authority.as_str().contains('@') {
        return Err("must not carry credentials (user:password@)".into());
    }
    if authority.host().is_empty() {
        return Err("has no host".into());
    }
    Ok(uri)
}

/// How one POST ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The receiver answered with this status.
    Status(u16),
    /// No answer: connection refused, TLS failure, timeout.
    Failed(String),
}

/// Posts events to one endpoint, keeping its connection between posts.
/// An endpoint that does not answer at all is rested (one second, doubling,
/// at most a minute) instead of being tried once per pending key.
pub struct Poster {
    uri: Uri,
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
    conn: Option<SendRequest<Full<Bytes>>>,
    failures: u32,
    rest_until: Option<tokio::time::Instant>,
}

const LONGEST_REST: Duration = Duration::from_secs(60);

impl fmt::Debug for Poster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Poster").field("uri", &self.uri).finish_non_exhaustive()
    }
}

impl Poster {
    pub fn new(uri: Uri, tls: Arc<rustls::ClientConfig>, timeout: Duration) -> Self {
        Self { uri, tls, timeout, conn: None, failures: 0, rest_until: None }
    }

    /// Whether the endpoint is being rested after answering nothing.
    pub fn resting(&self) -> bool {
        self.rest_until.is_some_and(|until| tokio::time::Instant::now() < until)
    }

    /// POSTs `body` signed for event `id` at `timestamp`, within the timeout.
    pub async fn post(&mut self, secret: &SigningSecret, id: &str, timestamp: i64, body: &str) -> Answer {
        let answer =
            match tokio::time::timeout(self.timeout, self.exchange(secret, id, timestamp, body)).await {
                Ok(Ok(status)) => Answer::Status(status),
                Ok(Err(e)) => Answer::Failed(e),
                Err(_) => Answer::Failed(format!("no answer within {:?}", self.timeout)),
            };
        if let Answer::Failed(_) = answer {
            self.conn = None;
            self.failures = self.failures.saturating_add(1);
            let rest = super::doubling_backoff(self.failures, LONGEST_REST);
            self.rest_until = Some(tokio::time::Instant::now() + rest);
        } else {
            self.failures = 0;
            self.rest_until = None;
        }
        answer
    }

    async fn exchange(
        &mut self,
        secret: &SigningSecret,
        id: &str,
        timestamp: i64,
        body: &str,
    ) -> Result<u16, String> {
        let mut conn = match self.conn.take() {
            Some(conn) if conn.is_ready() => conn,
            _ => self.connect().await?,
        };
        let path = self.uri.path_and_query().map_or("/", |p| p.as_str());
        let host = self.uri.authority().map(|a| a.as_str()).unwrap_or_default();
        let request = Request::post(path)
            .header(header::HOST, host)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::USER_AGENT, concat!("keywarden/", env!("CARGO_PKG_VERSION")))
            .header("webhook-id", id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", secret.sign(id, timestamp, body.as_bytes()))
            .body(Full::new(Bytes::copy_from_slice(body.as_bytes())))
            .map_err(|e| format!("request: {e}"))?;
        conn.ready().await.map_err(|e| format!("connection: {e}"))?;
        let response = conn.send_request(request).await.map_err(|e| format!("request: {e}"))?;
        let status = response.status().as_u16();
        // Read the (bounded) answer so the connection can carry the next post.
        if Limited::new(response.into_body(), MAX_ANSWER_BYTES).collect().await.is_ok() {
            self.conn = Some(conn);
        }
        Ok(status)
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, String> {
        let host = self.uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']');
        let https = self.uri.scheme_str() == Some("https");
        let port = self.uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tcp = TcpStream::connect((host, port)).await.map_err(|e| format!("connect: {e}"))?;
        let _ = tcp.set_nodelay(true);
        if https {
            let name = rustls::pki_types::ServerName::try_from(host.to_owned())
                .map_err(|_| format!("{host} is not a TLS server name"))?;
            let tls = tokio_rustls::TlsConnector::from(Arc::clone(&self.tls))
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS: {e}"))?;
            handshake(TokioIo::new(tls)).await
        } else {
            handshake(TokioIo::new(tcp)).await
        }
    }
}

async fn handshake<T>(io: T) -> Result<SendRequest<Full<Bytes>>, String>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (send, conn) = hyper::client::conn::http1::handshake(io).await.map_err(|e| format!("HTTP: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(send)
}

/// The roots webhook receivers' certificates chain to.
pub fn client_tls() -> Arc<rustls::ClientConfig> {
    let roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map(|b| b.with_root_certificates(roots).with_no_client_auth())
            .unwrap_or_else(|_| unreachable!("ring supports the default protocol versions")),
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::keys::KeyHasher;

    fn macs() -> SubkeyMacs {
        KeyHasher::from_base64(&STANDARD.encode([7u8; 32])).unwrap().subkey_macs(SEAL_PURPOSE)
    }

    #[test]
    fn a_secret_is_whsec_and_32_bytes_and_its_debug_shows_nothing() {
        let secret = SigningSecret::generate().unwrap();
        let shown = secret.reveal();
        assert!(shown.starts_with("whsec_"));
        assert_eq!(STANDARD.decode(&shown[6..]).unwrap().len(), 32);
        assert_eq!(format!("{secret:?}"), "SigningSecret(..)");
    }

    #[test]
    fn a_sealed_secret_unseals_only_for_its_endpoint_and_is_not_the_secret() {
        let secret = SigningSecret::generate().unwrap();
        let (sealed, pepper) = secret.seal(&macs(), "ep1");
        assert_ne!(sealed, STANDARD.encode(secret.0));
        assert_eq!(SigningSecret::unseal(&macs(), "ep1", &pepper, &sealed).unwrap().0, secret.0);
        assert_ne!(SigningSecret::unseal(&macs(), "ep2", &pepper, &sealed).unwrap().0, secret.0);
        assert!(SigningSecret::unseal(&macs(), "ep1", &pepper, "bm9wZQ==").is_err());
    }

    #[test]
    fn the_signature_is_standard_webhooks_v1() {
        // Standard Webhooks' published test vector.
        let secret = STANDARD.decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let signed =
            signature(&secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1_614_265_330, br#"{"test": 2432232314}"#);
        assert_eq!(signed, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        let ours = SigningSecret([9; 32]);
        let signature = ours.sign("evt", 1_614_265_330, b"{}");
        assert!(ours.verifies("evt", 1_614_265_330, b"{}", &signature));
        assert!(!ours.verifies("evt", 1_614_265_331, b"{}", &signature));
    }

    /// A receiver that writes `answer` to every connection, then, if
    /// `endless`, a chunked body that never ends; then holds it open.
    async fn hostile(answer: &'static [u8], endless: bool) -> Poster {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut request = [0u8; 4096];
                    let _ = conn.read(&mut request).await;
                    let _ = conn.write_all(answer).await;
                    let chunk = [b'x'; 0x4000];
                    if endless {
                        loop {
                            let written = async {
                                conn.write_all(b"4000\r\n").await?;
                                conn.write_all(&chunk).await?;
                                conn.write_all(b"\r\n").await
                            };
                            if written.await.is_err() {
                                return;
                            }
                        }
                    }
                    tokio::time::sleep(Duration::from_secs(60)).await;
                });
            }
        });
        let uri: Uri = format!("http://{addr}/hook").parse().unwrap();
        Poster::new(uri, client_tls(), Duration::from_millis(500))
    }

    #[tokio::test]
    async fn a_hostile_receiver_costs_a_bounded_time_and_no_unbounded_read() {
        let secret = SigningSecret([1; 32]);
        let started = tokio::time::Instant::now();
        // Never answers: a failure at the timeout, and the endpoint rests.
        let mut silent = hostile(b"", false).await;
        assert!(
            matches!(silent.post(&secret, "e", 1, "{}").await, Answer::Failed(why) if why.contains("no answer"))
        );
        assert!(silent.resting());
        // Answers 200 with a body that never ends: the status counts, the
        // body is read only so far, and the connection is dropped.
        let mut endless = hostile(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", true).await;
        let answer = endless.post(&secret, "e", 1, "{}").await;
        assert!(matches!(answer, Answer::Status(200) | Answer::Failed(_)), "{answer:?}");
        assert!(endless.conn.is_none(), "a connection with an unread body is not reused");
        // A redirect is an answer that is not a delivery, and is not followed.
        let mut redirect = hostile(
            b"HTTP/1.1 302 Found\r\nLocation: http://169.254.169.254/\r\nContent-Length: 0\r\n\r\n",
            false,
        )
        .await;
        assert_eq!(redirect.post(&secret, "e", 1, "{}").await, Answer::Status(302));
        assert!(started.elapsed() < Duration::from_secs(3), "each bounded by the timeout");
    }

    #[test]
    fn urls_must_be_https_without_credentials() {
        assert!(check_url("https://hooks.example.com/kw", false).is_ok());
        assert!(check_url("http://127.0.0.1:8080/kw", true).is_ok());
        for (bad, allow) in [
            ("http://hooks.example.com/kw", false),
            ("ftp://x/y", true),
            ("https://user:pw@hooks.example.com/", false),
            ("/relative", true),
            ("not a url", true),
        ] {
            assert!(check_url(bad, allow).is_err(), "{bad}");
        }
        assert!(check_url(&format!("https://x/{}", "a".repeat(MAX_URL_LEN)), false).is_err());
    }
}
