//! The trust boundary over real TLS: handshakes (right CA, wrong CA,
//! expired certificates, plaintext), mTLS and KeyVerify's allowed callers,
//! certificate rotation without dropped connections, the separate admin and
//! plaintext health listeners, and client identities acting as operators.

use keywarden::{
    api::pb::{self, key_admin_client::KeyAdminClient, key_verify_client::KeyVerifyClient},
    config::{IdentityGrant, Settings},
    keys::operator::OperatorRole,
};
use tonic::{Code, transport::Channel};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::{
    helpers::{
        ADMIN_TOKEN, Backend, MERCHANT, OTHER_MERCHANT, TestApp, admin_client, allowed, eventually, outcome,
        parse_metrics, scalar, spawn_app_over, until,
    },
    pki::{Leaf, Pki, TlsClient, TlsFiles, serial_bytes},
};

once_tests!(
    tls_serves_clients_that_trust_its_ca_and_no_one_else,
    mtls_admits_only_unexpired_certificates_from_the_client_ca,
    keyverify_answers_only_the_listed_callers,
    outcome_reporters_are_their_own_list_and_default_to_the_verify_callers,
    a_revoked_client_certificate_is_refused_at_its_next_handshake,
    rotated_certificates_reach_new_connections_and_spare_open_ones,
    keyadmin_moves_to_its_own_listener_and_health_gets_a_plaintext_one,
    a_mapped_client_identity_acts_as_an_operator_within_its_limits,
    the_cli_speaks_mtls_and_takes_tokens_only_from_a_file_or_the_environment,
    the_leak_listener_serves_the_same_certificate_and_asks_for_no_client_certificate,
);

const INVOICE: &str = "spiffe://cluster.local/ns/billing/sa/invoice";
const PORTAL: &str = "spiffe://cluster.local/ns/portal/sa/portal";

/// A CA, and the server's files in a directory of their own.
struct Tls {
    pki: Pki,
    files: TlsFiles,
    _dir: tempfile::TempDir,
}

fn tls(mtls: bool) -> Tls {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("keywarden test CA");
    let files = TlsFiles::new(dir.path());
    files.install(&pki.server(1));
    if mtls {
        files.install_client_ca(&pki.ca_pem());
    }
    Tls { pki, files, _dir: dir }
}

impl Tls {
    fn configure(&self, settings: &mut Settings, mtls: bool) {
        settings.tls_cert_file = Some(self.files.cert.clone());
        settings.tls_key_file = Some(self.files.key.clone());
        settings.tls_client_ca_file = mtls.then(|| self.files.client_ca.clone());
        settings.tls_reload_interval_ms = 100;
    }

    fn client(&self, identity: Option<&Leaf>) -> TlsClient {
        TlsClient::new(&self.pki.ca_pem(), identity)
    }
}

async fn spawn(
    tls: &Tls,
    mtls: bool,
    identity: Option<&Leaf>,
    customise: impl FnOnce(&mut Settings),
) -> TestApp {
    spawn_app_over(
        Backend::Sqlite,
        Some(tls.client(identity)),
        |_| async {},
        |s| {
            tls.configure(s, mtls);
            customise(s);
        },
    )
    .await
}

async fn health(channel: Channel) -> Result<i32, tonic::Status> {
    HealthClient::new(channel).check(HealthCheckRequest::default()).await.map(|r| r.into_inner().status)
}

fn metric(app: &TestApp, name: &str) -> f64 {
    parse_metrics(&app.probes.exporter.render()).get(name).copied().unwrap_or(0.0)
}

async fn tls_serves_clients_that_trust_its_ca_and_no_one_else() {
    let tls = tls(false);
    let mut app = spawn(&tls, false, None, |_| {}).await;
    let (_, key) = app.key_with_scopes(&["sales:read"]).await;
    assert_eq!(outcome(&app.verify(&key, "", "sales:read").await), allowed(), "Verify over TLS");

    let other = Pki::new("another CA");
    let wrong_ca = TlsClient::new(&other.ca_pem(), None).channel(app.addr).0;
    assert!(health(wrong_ca).await.is_err(), "a client trusting another CA got through");
    let plaintext = Channel::from_shared(format!("http://{}", app.addr)).unwrap().connect_lazy();
    assert!(health(plaintext).await.is_err(), "plaintext HTTP/2 was answered on a TLS port");

    // An expired server certificate, once served, is refused by clients.
    tls.files.install(&tls.pki.issue(&["localhost", "127.0.0.1"], 2, true));
    until("new connections to be offered the expired certificate", || async {
        health(tls.client(None).channel(app.addr).0).await.is_err().then_some(())
    })
    .await;
    app.stop().await;
}

async fn mtls_admits_only_unexpired_certificates_from_the_client_ca() {
    let tls = tls(true);
    let invoice = tls.pki.issue(&[INVOICE], 10, false);
    let mut app = spawn(&tls, true, Some(&invoice), |_| {}).await;
    let (_, key) = app.key_with_scopes(&["sales:read"]).await;
    assert_eq!(outcome(&app.verify(&key, "", "sales:read").await), allowed(), "Verify over mTLS");

    let other = Pki::new("another CA");
    let refused = [
        ("no client certificate", tls.client(None)),
        ("a certificate from another CA", tls.client(Some(&other.issue(&[INVOICE], 11, false)))),
        ("an expired certificate from the client CA", tls.client(Some(&tls.pki.issue(&[INVOICE], 12, true)))),
    ];
    for (what, client) in &refused {
        let result = health(client.channel(app.addr).0).await;
        assert!(result.is_err(), "{what} was let in");
    }
    eventually("the refused handshakes to be counted", || {
        (metric(&app, "keywarden_tls_handshake_failures_total") >= refused.len() as f64).then_some(())
    })
    .await;
    app.stop().await;
}

async fn keyverify_answers_only_the_listed_callers() {
    let tls = tls(true);
    let invoice = tls.pki.issue(&[INVOICE], 10, false);
    let mut app = spawn(&tls, true, Some(&invoice), |s| s.verify_callers = vec![INVOICE.to_owned()]).await;
    let (_, key) = app.key_with_scopes(&["sales:read"]).await;
    assert_eq!(outcome(&app.verify(&key, "", "sales:read").await), allowed(), "a listed caller");

    // Same CA, another identity (a DNS SAN only): the handshake succeeds,
    // KeyVerify refuses, health still answers.
    let reports = tls.client(Some(&tls.pki.issue(&["reports.internal"], 13, false))).channel(app.addr).0;
    let mut verify = KeyVerifyClient::new(reports.clone());
    let denied =
        verify.verify(pb::VerifyRequest { key: key.clone(), ..Default::default() }).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    let denied = verify.record_outcomes(pb::RecordOutcomesRequest::default()).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    // Envoy's surfaces are KeyVerify's too: Check and the access-log stream.
    assert_eq!(check(reports.clone()).await, Err(Code::PermissionDenied), "Check");
    assert_eq!(stream_access_logs(reports.clone()).await, Err(Code::PermissionDenied), "StreamAccessLogs");
    assert_eq!(health(reports).await.unwrap(), 1, "health is not limited to verify callers");

    // A DNS SAN that reads like the listed URI is not that identity.
    let spelled = tls.client(Some(&tls.pki.issue_dns(INVOICE, 14))).channel(app.addr).0;
    let denied = KeyVerifyClient::new(spelled.clone())
        .verify(pb::VerifyRequest { key: key.clone(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "a DNS SAN spelled like a URI: {denied:?}");
    assert_eq!(check(spelled).await, Err(Code::PermissionDenied));
    app.stop().await;
}

/// Envoy's Check, with no HTTP attributes: the code it is answered with.
async fn check(channel: Channel) -> Result<(), Code> {
    use envoy_types::pb::envoy::service::auth::v3::{
        CheckRequest, authorization_client::AuthorizationClient,
    };
    AuthorizationClient::new(channel).check(CheckRequest::default()).await.map(drop).map_err(|s| s.code())
}

/// One empty access-log stream: the code it is answered with.
async fn stream_access_logs(channel: Channel) -> Result<(), Code> {
    use envoy_types::pb::envoy::service::accesslog::v3::{
        StreamAccessLogsMessage, access_log_service_client::AccessLogServiceClient,
    };
    AccessLogServiceClient::new(channel)
        .stream_access_logs(tokio_stream::iter(Vec::<StreamAccessLogsMessage>::new()))
        .await
        .map(drop)
        .map_err(|s| s.code())
}

async fn outcome_reporters_are_their_own_list_and_default_to_the_verify_callers() {
    const ENVOY: &str = "spiffe://cluster.local/ns/mesh/sa/envoy";
    let tls = tls(true);
    let invoice = tls.pki.issue(&[INVOICE], 10, false);
    let mut app = spawn(&tls, true, Some(&invoice), |s| {
        s.verify_callers = vec![INVOICE.to_owned(), ENVOY.to_owned()];
        s.outcome_reporters = Some(vec![ENVOY.to_owned()]);
    })
    .await;
    let (_, key) = app.key_with_scopes(&["sales:read"]).await;
    let verified = app.verify(&key, "", "sales:read").await;
    assert_eq!(outcome(&verified), allowed(), "a verify caller verifies");
    let report = || pb::RecordOutcomesRequest {
        outcomes: vec![pb::Outcome { audit_event_id: verified.audit_event_id.clone(), status: 201 }],
    };
    let denied = app.verify.record_outcomes(report()).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "a verify caller that is no reporter: {denied:?}");
    let invoice_channel = tls.client(Some(&invoice)).channel(app.addr).0;
    assert_eq!(stream_access_logs(invoice_channel).await, Err(Code::PermissionDenied));

    let envoy = tls.client(Some(&tls.pki.issue(&[ENVOY], 11, false))).channel(app.addr).0;
    let mut as_envoy = KeyVerifyClient::new(envoy.clone());
    app.settle().await;
    assert_eq!(
        as_envoy.record_outcomes(report()).await.unwrap().into_inner().updated,
        1,
        "a reporter reports"
    );
    assert_eq!(stream_access_logs(envoy).await, Ok(()));
    app.stop().await;
}

async fn a_revoked_client_certificate_is_refused_at_its_next_handshake() {
    let tls = tls(true);
    let crl = tls.files.client_ca.with_file_name("client-crl.pem");
    std::fs::write(&crl, tls.pki.crl(1, &[])).unwrap();
    let (kept, revoked) = (tls.pki.issue(&[INVOICE], 20, false), tls.pki.issue(&[PORTAL], 21, false));
    let app = spawn(&tls, true, Some(&kept), |s| s.tls_client_crl_file = Some(crl.clone())).await;
    let (open, _) = tls.client(Some(&revoked)).channel(app.addr);
    assert_eq!(health(open.clone()).await.unwrap(), 1, "not revoked yet");

    std::fs::write(&crl, tls.pki.crl(2, &[21])).unwrap();
    until("the CRL to refuse the revoked certificate's next handshake", || async {
        health(tls.client(Some(&revoked)).channel(app.addr).0).await.is_err().then_some(())
    })
    .await;
    assert_eq!(health(tls.client(Some(&kept)).channel(app.addr).0).await.unwrap(), 1, "others still pass");
    // A CRL that does not parse leaves the last good one in force.
    std::fs::write(&crl, "-----BEGIN X509 CRL-----\nnot base64\n").unwrap();
    eventually("the bad CRL to be counted", || {
        (metric(&app, "keywarden_tls_reload_failures_total") >= 1.0).then_some(())
    })
    .await;
    assert!(health(tls.client(Some(&revoked)).channel(app.addr).0).await.is_err(), "still revoked");
    drop(open);
    app.stop().await;
}

async fn rotated_certificates_reach_new_connections_and_spare_open_ones() {
    let tls = tls(false);
    let app = spawn(&tls, false, None, |_| {}).await;
    let (open, dialed) = tls.client(None).channel(app.addr);
    assert_eq!(health(open.clone()).await.unwrap(), 1);
    assert_eq!((dialed.count(), dialed.last_serial()), (1, Some(serial_bytes(1))));

    tls.files.install(&tls.pki.server(2));
    until("a new connection to be offered serial 2", || async {
        let (fresh, seen) = tls.client(None).channel(app.addr);
        health(fresh).await.ok()?;
        (seen.last_serial() == Some(serial_bytes(2))).then_some(())
    })
    .await;
    assert_eq!(health(open.clone()).await.unwrap(), 1, "the open connection stopped working");
    assert_eq!(dialed.count(), 1, "the open connection was dropped and redialled");

    // A certificate file that does not parse keeps serial 2 in service.
    std::fs::write(&tls.files.cert, "-----BEGIN CERTIFICATE-----\nnot base64\n").unwrap();
    eventually("the bad file to be counted", || {
        (metric(&app, "keywarden_tls_reload_failures_total") >= 1.0).then_some(())
    })
    .await;
    let (fresh, seen) = tls.client(None).channel(app.addr);
    assert_eq!(health(fresh).await.unwrap(), 1);
    assert_eq!(seen.last_serial(), Some(serial_bytes(2)));
    assert_eq!(health(open).await.unwrap(), 1);
    assert_eq!(metric(&app, "keywarden_tls_reloads_total"), 1.0);
    app.stop().await;
}

async fn keyadmin_moves_to_its_own_listener_and_health_gets_a_plaintext_one() {
    let tls = tls(false);
    let mut app = spawn(&tls, false, None, |s| {
        s.admin_listen_addr = Some("127.0.0.1:0".parse().unwrap());
        s.health_listen_addr = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let on_verify_port = tls.client(None).channel(app.addr).0;
    let moved =
        admin_client(on_verify_port, ADMIN_TOKEN).list_scopes(pb::ListScopesRequest {}).await.unwrap_err();
    assert_eq!(moved.code(), Code::Unimplemented, "KeyAdmin still answers on the verify listener");
    assert!(app.admin.list_scopes(pb::ListScopesRequest {}).await.is_ok(), "KeyAdmin on its listener");

    let health_port =
        Channel::from_shared(format!("http://{}", app.health_addr.unwrap())).unwrap().connect_lazy();
    assert_eq!(health(health_port.clone()).await.unwrap(), 1, "plaintext health");
    let verify = KeyVerifyClient::new(health_port).verify(pb::VerifyRequest::default()).await.unwrap_err();
    assert_eq!(verify.code(), Code::Unimplemented, "the health port serves only health");

    // Reflection on each listener lists what that listener serves.
    let on_verify = listed_services(tls.client(None).channel(app.addr).0).await;
    let on_admin = listed_services(tls.client(None).channel(app.admin_addr.unwrap()).0).await;
    let common = [
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ];
    let mut verify_side: Vec<&str> = common.to_vec();
    verify_side.extend([
        "envoy.service.accesslog.v3.AccessLogService",
        "envoy.service.auth.v3.Authorization",
        "keywarden.v1.KeyVerify",
    ]);
    verify_side.sort();
    let mut admin_side: Vec<&str> = common.to_vec();
    admin_side.push("keywarden.v1.KeyAdmin");
    admin_side.sort();
    assert_eq!(on_verify, verify_side, "the verify listener lists KeyAdmin, which it does not serve");
    assert_eq!(on_admin, admin_side);
    app.stop().await;
}

/// The services a listener's reflection (v1) lists, sorted.
async fn listed_services(channel: Channel) -> Vec<String> {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        answers.message().await.unwrap().and_then(|a| a.message_response)
    else {
        panic!("no service list")
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    names
}

async fn a_mapped_client_identity_acts_as_an_operator_within_its_limits() {
    let tls = tls(true);
    let portal = tls.pki.issue(&[PORTAL], 20, false);
    let invoice = tls.pki.issue(&[INVOICE], 21, false);
    let app = spawn(&tls, true, Some(&invoice), |s| {
        s.operator_identities = vec![IdentityGrant {
            identity: PORTAL.to_owned(),
            role: OperatorRole::KeyManager,
            merchant_ids: vec![MERCHANT.to_owned()],
        }]
    })
    .await;
    // Certificate alone, no bearer token.
    let mut as_portal = KeyAdminClient::new(tls.client(Some(&portal)).channel(app.addr).0);
    let created = as_portal
        .create_key(pb::CreateKeyRequest {
            merchant_id: MERCHANT.into(),
            name: "portal key".into(),
            scopes: vec!["sales:read".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .api_key
        .unwrap();
    assert_eq!(created.created_by, PORTAL);
    let denied = as_portal
        .create_key(pb::CreateKeyRequest {
            merchant_id: OTHER_MERCHANT.into(),
            name: "elsewhere".into(),
            scopes: vec!["sales:read".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let refused =
        as_portal.create_operator_token(pb::CreateOperatorTokenRequest::default()).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "a key manager issued operator tokens");

    // An identity with no grant and no token is not an operator.
    let mut as_invoice = KeyAdminClient::new(tls.client(Some(&invoice)).channel(app.addr).0);
    let status = as_invoice.list_scopes(pb::ListScopesRequest {}).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);

    app.settle().await;
    let actor_rows = scalar(
        &app.database_url,
        &format!("SELECT COUNT(*) FROM audit_events WHERE kind = 'KEY_CREATED' AND actor = '{PORTAL}'"),
    )
    .await;
    assert_eq!(actor_rows, 1, "the creation's audit row names the identity");
    let denial_rows = scalar(
        &app.database_url,
        &format!(
            "SELECT COUNT(*) FROM audit_events WHERE kind = 'ACCESS_DENIED' AND actor = '{PORTAL}' \
             AND merchant_id IS NULL AND detail LIKE '%named merchant {OTHER_MERCHANT}%' \
             AND endpoint = '/keywarden.v1.KeyAdmin/CreateKey'"
        ),
    )
    .await;
    assert_eq!(denial_rows, 1, "the denial's row (of no merchant) names actor, merchant and RPC");
    app.stop().await;
}

async fn the_cli_speaks_mtls_and_takes_tokens_only_from_a_file_or_the_environment() {
    let tls = tls(true);
    let client = tls.pki.issue(&["ops.internal"], 30, false);
    let app = spawn(&tls, true, Some(&client), |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, contents: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, contents).unwrap();
        path
    };
    let (ca, cert, key) = (
        write("ca.pem", &tls.pki.ca_pem()),
        write("client.pem", &client.cert),
        write("client.key", &client.key),
    );
    let token_file = write("token", &format!("{ADMIN_TOKEN}\n"));
    let cli = |args: &[&str], env: &[(&str, &str)]| {
        let output = crate::helpers::output_within(
            std::process::Command::new(env!("CARGO_BIN_EXE_keywarden"))
                .args(args)
                .env_clear()
                .env("KEYWARDEN_SERVER", format!("https://127.0.0.1:{}", app.addr.port()))
                .env("KEYWARDEN_CA_CERT", &ca)
                .env("KEYWARDEN_CLIENT_CERT", &cert)
                .env("KEYWARDEN_CLIENT_KEY", &key)
                .env("KEYWARDEN_DATA_DIR", dir.path().join("none"))
                .envs(env.iter().copied()),
            crate::helpers::CLI_WITHIN,
            &format!("keywarden {args:?} to finish"),
        );
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let create =
        ["operators", "create", "--name", "support", "--role", "auditor", "--merchant", MERCHANT, "--json"];
    let (ok, out, err) = cli(&[&create[..], &["--token-file"]].concat(), &[]);
    assert!(!ok && err.contains("--token-file"), "a flag without its file: {err}");
    let (ok, out2, err2) = cli(&[&create[..], &["--token-file", token_file.to_str().unwrap()]].concat(), &[]);
    assert!(ok, "{out}{err}{out2}{err2}");
    let created: serde_json::Value = serde_json::from_str(&out2).unwrap();
    let operator = created["plaintext_token"].as_str().unwrap().to_owned();
    assert!(operator.starts_with("kwop_"));
    assert_eq!(created["operator_token"]["role"], "AUDITOR");

    let (ok, out, err) =
        cli(&["keys", "list", "--merchant", MERCHANT, "--json"], &[("KEYWARDEN_TOKEN", &operator)]);
    assert!(ok, "an auditor lists keys: {out}{err}");
    let (ok, _, err) =
        cli(&["keys", "revoke", "--merchant", MERCHANT, "some-key"], &[("KEYWARDEN_TOKEN", &operator)]);
    assert!(!ok && err.contains("PermissionDenied"), "an auditor revoked: {err}");
    let (ok, _, err) = cli(&["keys", "list", "--merchant", MERCHANT, "--token", &operator], &[]);
    assert!(!ok && err.contains("--token"), "argv took a token: {err}");
    app.stop().await;
}

/// GitHub cannot present a client certificate: under mTLS the leak-report
/// listener still serves the gRPC listeners' certificate, over HTTP/1.1,
/// to a client with none, while gRPC keeps refusing such a client.
async fn the_leak_listener_serves_the_same_certificate_and_asks_for_no_client_certificate() {
    use http_body_util::BodyExt as _;
    use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject as _};
    let tls = tls(true);
    let keys = tls._dir.path().join("github-keys.json");
    std::fs::write(&keys, r#"{"public_keys":[]}"#).unwrap();
    let identity = tls.pki.issue(&[PORTAL], 10, false);
    let app = spawn(&tls, true, Some(&identity), |s| {
        s.leak_report_listen_addr = Some("127.0.0.1:0".parse().unwrap());
        s.leak_report_keys_file = Some(keys);
    })
    .await;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(tls.pki.ca_pem().as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(app.leak_addr.unwrap()).await.unwrap();
    let stream = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("no client certificate asked");
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let request = hyper::Request::post("/v1/leaks/github")
        .header("host", "localhost")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(b"[]")))
        .unwrap();
    let response = send.send_request(request).await.unwrap();
    assert_eq!(response.status(), 401, "served, and refused for want of GitHub's signature");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("signature"), "{body:?}");
    let anonymous = tls.client(None).channel(app.addr).0;
    assert!(health(anonymous).await.is_err(), "gRPC still wants a client certificate");
}
