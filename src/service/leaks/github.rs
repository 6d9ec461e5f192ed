//! GitHub's signature on a secret-scanning report: base64 of a DER ECDSA
//! P-256 SHA-256 signature over the raw body (`Github-Public-Key-Signature`),
//! by the key `Github-Public-Key-Identifier` names. The keys come from a
//! file in the shape of GitHub's public-keys endpoint, re-read when it
//! changes, and optionally from that endpoint itself, cached for an hour
//! and fetched again (at most once a minute) for an identifier not seen.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::{Request, Uri, header};
use hyper_util::rt::TokioIo;
use ring::signature::{ECDSA_P256_SHA256_ASN1, UnparsedPublicKey};
use serde::Deserialize;
use tokio::{net::TcpStream, sync::Mutex};
use x509_parser::{
    oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY},
    prelude::FromDer as _,
    x509::SubjectPublicKeyInfo,
};

use crate::keys::{MAX_EXCERPT, excerpt};

/// How long fetched keys are used before they are fetched again.
const URL_KEYS_TTL: Duration = Duration::from_secs(3_600);
/// Least time between fetches an unknown identifier causes: a sender of
/// made-up identifiers cannot turn each report into a fetch.
const REFETCH_SPACING: Duration = Duration::from_secs(60);
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest keys document read, from the file or the endpoint.
const MAX_KEYS_DOCUMENT: usize = 1 << 20;
/// Longest signature header accepted (a DER P-256 signature is at most 72
/// bytes, 96 in base64).
const MAX_SIGNATURE_HEADER: usize = 256;

/// Why a report's signature was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the report carries no signature or no key identifier")]
    Missing,
    #[error("no known key has the identifier {0}")]
    UnknownKey(String),
    #[error("the signature does not verify")]
    Invalid,
    /// No key could be loaded at all: the sender should try again later.
    #[error("no signing keys are available: {0}")]
    KeysUnavailable(String),
}

/// One public key, ready to verify.
#[derive(Clone)]
struct VerifyingKey(Arc<[u8]>);

impl VerifyingKey {
    fn verifies(&self, body: &[u8], signature: &[u8]) -> bool {
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, &*self.0).verify(body, signature).is_ok()
    }
}

/// GitHub's public-keys document.
#[derive(Deserialize)]
struct KeysDocument {
    public_keys: Vec<PublicKeyEntry>,
}

#[derive(Deserialize)]
struct PublicKeyEntry {
    key_identifier: String,
    key: String,
}

/// The keys of a document, by identifier. Every listed key is accepted,
/// current or not: GitHub signs with a key before and after it is current
/// while it rotates them. A key that does not parse is left out, named in
/// the log.
fn parse_document(bytes: &[u8]) -> Result<HashMap<String, VerifyingKey>, String> {
    let doc: KeysDocument =
        serde_json::from_slice(bytes).map_err(|e| format!("not a public-keys document: {e}"))?;
    let mut keys = HashMap::new();
    for entry in doc.public_keys {
        match p256_point(&entry.key) {
            Ok(point) => {
                keys.insert(entry.key_identifier, VerifyingKey(point.into()));
            }
            Err(why) => tracing::warn!(
                key_identifier = %excerpt(&entry.key_identifier, MAX_EXCERPT),
                why,
                "leak-report signing key skipped"
            ),
        }
    }
    if keys.is_empty() {
        return Err("no usable ECDSA P-256 key in it".into());
    }
    Ok(keys)
}

/// How many usable keys a public-keys document lists (for fuzzing and
/// checks of a keys file before it is deployed).
pub fn usable_keys(document: &[u8]) -> Result<usize, String> {
    parse_document(document).map(|keys| keys.len())
}

/// The uncompressed point of a PEM `PUBLIC KEY` on P-256.
fn p256_point(pem: &str) -> Result<Vec<u8>, &'static str> {
    let (_, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|_| "not PEM")?;
    if block.label != "PUBLIC KEY" {
        return Err("not a PUBLIC KEY block");
    }
    let (rest, spki) = SubjectPublicKeyInfo::from_der(&block.contents).map_err(|_| "not a public key")?;
    if !rest.is_empty() {
        return Err("trailing bytes after the key");
    }
    let curve = spki.algorithm.parameters.as_ref().and_then(|p| p.as_oid().ok());
    if spki.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY || curve != Some(OID_EC_P256) {
        return Err("not an ECDSA P-256 key");
    }
    let point = spki.subject_public_key.data.to_vec();
    if point.len() != 65 || point[0] != 4 {
        return Err("not an uncompressed P-256 point");
    }
    Ok(point)
}

/// Where the keys come from, and what was last read from each.
#[derive(Default)]
struct Loaded {
    file_bytes: Option<Vec<u8>>,
    file_keys: HashMap<String, VerifyingKey>,
    url_keys: HashMap<String, VerifyingKey>,
    fetched_at: Option<Instant>,
    /// The last fetch an unknown identifier caused.
    refetched_at: Option<Instant>,
    /// Why the latest read or fetch failed, while it does.
    trouble: Option<String>,
}

/// The keys that may sign reports.
pub struct GithubKeys {
    file: Option<PathBuf>,
    url: Option<Uri>,
    tls: Arc<rustls::ClientConfig>,
    loaded: Mutex<Loaded>,
}

impl std::fmt::Debug for GithubKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GithubKeys").field("file", &self.file).field("url", &self.url).finish_non_exhaustive()
    }
}

impl GithubKeys {
    /// `url` has been checked by the settings (https, or http to loopback).
    pub fn new(
        file: Option<PathBuf>,
        url: Option<&str>,
        tls: Arc<rustls::ClientConfig>,
    ) -> Result<Self, String> {
        let url = url.map(|u| u.parse::<Uri>().map_err(|_| format!("{u:?} is not a URL"))).transpose()?;
        Ok(Self { file, url, tls, loaded: Mutex::default() })
    }

    /// Accepts `body` if `signature` (base64) verifies under the key
    /// `identifier` names.
    pub async fn check(
        &self,
        identifier: Option<&str>,
        signature: Option<&str>,
        body: &[u8],
    ) -> Result<(), SignatureError> {
        let (Some(identifier), Some(signature)) = (identifier, signature) else {
            return Err(SignatureError::Missing);
        };
        if identifier.is_empty() || signature.is_empty() {
            return Err(SignatureError::Missing);
        }
        if signature.len() > MAX_SIGNATURE_HEADER {
            return Err(SignatureError::Invalid);
        }
        let signature = STANDARD.decode(signature.trim()).map_err(|_| SignatureError::Invalid)?;
        let key = self.key(identifier).await?;
        if key.verifies(body, &signature) { Ok(()) } else { Err(SignatureError::Invalid) }
    }

    /// The key `identifier` names, reading the file again if it changed
    /// and fetching the endpoint when its keys are old or lack it.
    async fn key(&self, identifier: &str) -> Result<VerifyingKey, SignatureError> {
        let mut loaded = self.loaded.lock().await;
        if let Some(path) = &self.file {
            self.read_file(path, &mut loaded).await;
        }
        if let Some(key) = loaded.file_keys.get(identifier) {
            return Ok(key.clone());
        }
        if let Some(url) = &self.url {
            let now = Instant::now();
            let stale = loaded.fetched_at.is_none_or(|at| now.duration_since(at) >= URL_KEYS_TTL);
            let unknown = !loaded.url_keys.contains_key(identifier)
                && loaded.refetched_at.is_none_or(|at| now.duration_since(at) >= REFETCH_SPACING);
            if stale || unknown {
                if !stale {
                    loaded.refetched_at = Some(now);
                }
                self.fetch(url, &mut loaded).await;
            }
            if let Some(key) = loaded.url_keys.get(identifier) {
                return Ok(key.clone());
            }
        }
        match (&loaded.trouble, loaded.file_keys.is_empty() && loaded.url_keys.is_empty()) {
            (Some(why), true) => Err(SignatureError::KeysUnavailable(why.clone())),
            _ => Err(SignatureError::UnknownKey(excerpt(identifier, MAX_EXCERPT))),
        }
    }

    /// Re-reads the file; a file that does not read or parse leaves the
    /// keys read before in place.
    async fn read_file(&self, path: &std::path::Path, loaded: &mut Loaded) {
        let bytes = match tokio::fs::read(path).await {
            Ok(b) if b.len() <= MAX_KEYS_DOCUMENT => b,
            Ok(_) => {
                note_trouble(loaded, format!("{} is larger than {MAX_KEYS_DOCUMENT} bytes", path.display()));
                return;
            }
            Err(e) => {
                note_trouble(loaded, format!("cannot read {}: {e}", path.display()));
                return;
            }
        };
        if loaded.file_bytes.as_ref() == Some(&bytes) {
            return;
        }
        match parse_document(&bytes) {
            Ok(keys) => {
                tracing::info!(path = %path.display(), keys = keys.len(), "leak-report signing keys read");
                loaded.file_keys = keys;
                loaded.trouble = None;
            }
            Err(why) => note_trouble(loaded, format!("{}: {why}", path.display())),
        }
        loaded.file_bytes = Some(bytes);
    }

    async fn fetch(&self, url: &Uri, loaded: &mut Loaded) {
        let fetched = tokio::time::timeout(FETCH_TIMEOUT, get(url, Arc::clone(&self.tls)))
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {FETCH_TIMEOUT:?}")));
        match fetched.and_then(|bytes| parse_document(&bytes)) {
            Ok(keys) => {
                tracing::info!(%url, keys = keys.len(), "leak-report signing keys fetched");
                loaded.url_keys = keys;
                loaded.fetched_at = Some(Instant::now());
                loaded.trouble = None;
            }
            Err(why) => note_trouble(loaded, format!("{url}: {why}")),
        }
    }
}

/// Logs a failure to load keys once, when it starts.
fn note_trouble(loaded: &mut Loaded, why: String) {
    if loaded.trouble.as_deref() != Some(why.as_str()) {
        tracing::error!(
            why,
            "leak-report signing keys could not be loaded; the keys read before stay in use"
        );
    }
    loaded.trouble = Some(why);
}

/// GETs `url`'s body, at most [`MAX_KEYS_DOCUMENT`] bytes of it.
async fn get(url: &Uri, tls: Arc<rustls::ClientConfig>) -> Result<Vec<u8>, String> {
    let host = url.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_owned();
    let https = url.scheme_str() == Some("https");
    let port = url.port_u16().unwrap_or(if https { 443 } else { 80 });
    let tcp = TcpStream::connect((host.as_str(), port)).await.map_err(|e| format!("connect: {e}"))?;
    let request = Request::get(url.path_and_query().map_or("/", |p| p.as_str()))
        .header(header::HOST, url.authority().map(|a| a.as_str()).unwrap_or_default())
        .header(header::ACCEPT, "application/json")
        .header(header::USER_AGENT, concat!("keywarden/", env!("CARGO_PKG_VERSION")))
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("request: {e}"))?;
    let response = if https {
        let name = rustls::pki_types::ServerName::try_from(host.clone())
            .map_err(|_| format!("{host} is not a TLS server name"))?;
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        send(TokioIo::new(stream), request).await?
    } else {
        send(TokioIo::new(tcp), request).await?
    };
    if !response.status().is_success() {
        return Err(format!("answered {}", response.status()));
    }
    let body = Limited::new(response.into_body(), MAX_KEYS_DOCUMENT)
        .collect()
        .await
        .map_err(|e| format!("reading the answer: {e}"))?;
    Ok(body.to_bytes().to_vec())
}

async fn send<T>(
    io: T,
    request: Request<Empty<Bytes>>,
) -> Result<hyper::Response<hyper::body::Incoming>, String>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(io).await.map_err(|e| format!("HTTP: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send.send_request(request).await.map_err(|e| format!("request: {e}"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use ring::{
        rand::SystemRandom,
        signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair as _},
    };

    use super::*;

    /// A P-256 key pair and its PEM public key.
    fn pair() -> (EcdsaKeyPair, String) {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng).unwrap();
        // SubjectPublicKeyInfo: id-ecPublicKey, prime256v1, then the point.
        let mut der = hex_bytes("3059301306072a8648ce3d020106082a8648ce3d030107034200");
        der.extend_from_slice(pair.public_key().as_ref());
        let pem = format!("-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n", STANDARD.encode(der));
        (pair, pem)
    }

    fn hex_bytes(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    fn sign(pair: &EcdsaKeyPair, body: &[u8]) -> String {
        STANDARD.encode(pair.sign(&SystemRandom::new(), body).unwrap().as_ref())
    }

    fn document(keys: &[(&str, &str)]) -> String {
        let entries: Vec<_> = keys
            .iter()
            .map(|(id, pem)| serde_json::json!({"key_identifier": id, "key": pem, "is_current": true}))
            .collect();
        serde_json::json!({ "public_keys": entries }).to_string()
    }

    #[tokio::test]
    async fn a_signature_verifies_only_over_its_body_by_its_key() {
        let (signer, pem) = pair();
        let (other, _) = pair();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        std::fs::write(&path, document(&[("k1", &pem)])).unwrap();
        let keys = GithubKeys::new(Some(path), None, crate::events::webhook::client_tls()).unwrap();
        let body = br#"[{"token":"x","type":"t","url":"u","source":"content"}]"#;
        assert_eq!(keys.check(Some("k1"), Some(&sign(&signer, body)), body).await, Ok(()));
        let mut changed = body.to_vec();
        changed[3] ^= 1;
        assert_eq!(
            keys.check(Some("k1"), Some(&sign(&signer, body)), &changed).await,
            Err(SignatureError::Invalid)
        );
        assert_eq!(
            keys.check(Some("k1"), Some(&sign(&other, body)), body).await,
            Err(SignatureError::Invalid)
        );
        assert!(matches!(
            keys.check(Some("k2"), Some(&sign(&signer, body)), body).await,
            Err(SignatureError::UnknownKey(_))
        ));
        assert_eq!(keys.check(None, Some(&sign(&signer, body)), body).await, Err(SignatureError::Missing));
        assert_eq!(keys.check(Some("k1"), None, body).await, Err(SignatureError::Missing));
        assert_eq!(keys.check(Some("k1"), Some("%%%"), body).await, Err(SignatureError::Invalid));
    }

    #[test]
    fn only_p256_public_keys_are_taken() {
        let (_, pem) = pair();
        assert_eq!(p256_point(&pem).unwrap().len(), 65);
        assert!(p256_point("not pem").is_err());
        let private = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
        assert!(p256_point(private).is_err());
        assert!(parse_document(br#"{"public_keys":[]}"#).is_err());
        assert!(parse_document(b"[]").is_err());
    }
}
