//! Leak reports: how long GitHub waits for the answer to a signed report
//! of live keys (each proved by one scrypt, none cached), and to one of
//! 1,000 garbage tokens (bad checksums and unknown prefixes: no scrypt),
//! through the real listener, on a server and database of their own.

use super::*;

use ring::{
    rand::SystemRandom,
    signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair as _},
};

/// What the leak-report area measured.
pub(super) struct LeakRun {
    pub(super) live: usize,
    /// Seconds until the report of `live` keys was answered.
    pub(super) live_s: f64,
    pub(super) garbage: usize,
    pub(super) garbage_s: f64,
}

/// A P-256 signer and the keys file that lists it.
fn signer(dir: &std::path::Path) -> (EcdsaKeyPair, std::path::PathBuf) {
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng).unwrap();
    // SubjectPublicKeyInfo: id-ecPublicKey on prime256v1, then the point.
    let mut der = vec![
        0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86,
        0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
    ];
    der.extend_from_slice(pair.public_key().as_ref());
    use base64::Engine as _;
    let pem = format!(
        "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
        base64::engine::general_purpose::STANDARD.encode(der)
    );
    let path = dir.join("github-keys.json");
    let doc =
        serde_json::json!({"public_keys": [{"key_identifier": "bench", "key": pem, "is_current": true}]});
    std::fs::write(&path, doc.to_string()).unwrap();
    (pair, path)
}

/// POSTs a signed report of `tokens` and waits for its answer.
async fn report(addr: SocketAddr, pair: &EcdsaKeyPair, tokens: &[String]) -> (u16, Duration) {
    use base64::Engine as _;
    use http_body_util::BodyExt as _;
    let entries: Vec<_> = tokens
        .iter()
        .map(|t| serde_json::json!({"token": t, "type": "keywarden_api_key", "url": "https://github.com/o/r", "source": "content"}))
        .collect();
    let body = serde_json::to_vec(&entries).unwrap();
    let signature = base64::engine::general_purpose::STANDARD
        .encode(pair.sign(&SystemRandom::new(), &body).unwrap().as_ref());
    let start = Instant::now();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    let request = hyper::Request::post("/v1/leaks/github")
        .header("host", addr.to_string())
        .header("content-type", "application/json")
        .header("github-public-key-identifier", "bench")
        .header("github-public-key-signature", signature)
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .unwrap();
    let response = send.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    response.into_body().collect().await.unwrap();
    (status, start.elapsed())
}

/// `live` keys created (and never verified, so no cache holds them), then
/// reported in one report; then 1,000 garbage tokens in another.
pub(super) async fn leaks_run(
    runtime: &tokio::runtime::Handle,
    dir: &std::path::Path,
    hash_workers: usize,
    live: usize,
) -> LeakRun {
    let (pair, keys_file) = signer(dir);
    let url = format!("sqlite://{}?mode=rwc", dir.join("leaks.db").display());
    let mut settings = bench_settings(&url, dir, true, hash_workers);
    settings.leak_report_listen_addr = Some("127.0.0.1:0".parse().unwrap());
    settings.leak_report_keys_file = Some(keys_file);
    let server = start_server_from(runtime, settings).await;
    let channel = Channel::from_shared(format!("http://{}", server.addr)).unwrap().connect().await.unwrap();
    let mut admin = KeyAdminClient::new(channel);
    let mut tokens = Vec::with_capacity(live);
    for i in 0..live {
        let request = pb::CreateKeyRequest {
            merchant_id: MERCHANT.into(),
            name: format!("published {i}"),
            scopes: vec!["sales:read".into()],
            ..Default::default()
        };
        let mut request = Request::new(request);
        request.metadata_mut().insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
        tokens.push(admin.create_key(request).await.unwrap().into_inner().plaintext_key);
    }
    let addr = server.leak_addr.expect("the leak-report listener");
    let (status, took) = report(addr, &pair, &tokens).await;
    assert_eq!(status, 200, "the live report was refused");
    let garbage: Vec<String> = (0..1_000)
        .map(|i| match i % 2 {
            0 => format!("sntr_{}", "x".repeat(49)),
            _ => PlainKey::generate(&KeyPrefix::default()).unwrap().expose().to_owned(),
        })
        .collect();
    let (status, garbage_took) = report(addr, &pair, &garbage).await;
    assert_eq!(status, 200, "the garbage report was refused");
    LeakRun {
        live,
        live_s: took.as_secs_f64(),
        garbage: garbage.len(),
        garbage_s: garbage_took.as_secs_f64(),
    }
}

impl LeakRun {
    pub(super) fn print_targets(&self, hash_seconds: f64, cores: usize) {
        // scrypt's own rate on this machine: what the live report cannot beat.
        let ceiling = cores as f64 / hash_seconds;
        println!(
            "| leaks: a report of {} live keys answered within 10 s | {:.2} s ({:.0} keys/s; scrypt alone allows {ceiling:.0}/s on {cores} cores) | {} |",
            self.live,
            self.live_s,
            self.live as f64 / self.live_s,
            verdict(self.live_s <= 10.0)
        );
        println!(
            "| leaks: a report of {} garbage tokens answered within 1 s | {:.0} ms | {} |",
            self.garbage,
            self.garbage_s * 1000.0,
            verdict(self.garbage_s <= 1.0)
        );
    }
}
