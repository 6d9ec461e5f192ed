//! Gateway mode: Envoy's Check requests and the access-log stream.

use super::*;

/// The gateway's route table on the benchmark's servers: the sales route
/// Check scenarios call needs the scope the warm keys hold.
pub(super) const ROUTES: &str = "unmatched = \"deny\"\n[[route]]\nmethod = \"GET\"\npath = \"/public/api/v1/sales/**\"\nscope = \"sales:read\"\n";

/// What Envoy sends to Check for a GET of the sales route with `key`.
pub(super) fn check_request(key: &str) -> CheckRequest {
    let source = Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: "10.1.2.3".into(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(40_000)),
            ..Default::default()
        })),
    };
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(Peer { address: Some(source), ..Default::default() }),
            request: Some(HttpAttributes {
                http: Some(HttpRequest {
                    method: "GET".into(),
                    path: "/public/api/v1/sales/2026/q4?currency=EUR".into(),
                    headers: [
                        ("authorization".to_owned(), format!("Bearer {key}")),
                        ("user-agent".to_owned(), "bench/1.0".to_owned()),
                        ("accept".to_owned(), "application/json".to_owned()),
                    ]
                    .into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

/// Entries per second Envoy's access-log stream takes: `n` audit ids from
/// warm Verify calls, then one stream of 100-entry messages carrying them,
/// timed from the first message to the answer (which follows the last
/// batch's write).
pub(super) async fn access_log_rate(
    addr: SocketAddr,
    conns: &[Connection],
    keys: &Arc<Vec<String>>,
    n: usize,
) -> f64 {
    use envoy_types::pb::{
        envoy::{
            data::accesslog::v3::{HttpAccessLogEntry, HttpRequestProperties, HttpResponseProperties},
            service::accesslog::v3::{
                StreamAccessLogsMessage,
                access_log_service_client::AccessLogServiceClient,
                stream_access_logs_message::{HttpAccessLogEntries, LogEntries},
            },
        },
        google::protobuf::UInt32Value,
    };
    let per_conn = n.div_ceil(conns.len());
    let mut tasks = Vec::new();
    for (c, conn) in conns.iter().enumerate() {
        let (mut client, keys) = (conn.verify.clone(), Arc::clone(keys));
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::with_capacity(per_conn);
            for i in 0..per_conn {
                let r = client
                    .verify(pb::VerifyRequest {
                        key: keys[(c * per_conn + i) % keys.len()].clone(),
                        ip: "10.1.2.3".into(),
                        required_scope: "sales:read".into(),
                        endpoint: "/public/api/v1/sales".into(),
                        method: "GET".into(),
                        cost: 0,
                    })
                    .await
                    .unwrap()
                    .into_inner();
                ids.push(r.audit_event_id);
            }
            ids
        }));
    }
    let mut ids = Vec::with_capacity(n);
    for t in tasks {
        ids.extend(t.await.unwrap());
    }
    let messages: Vec<StreamAccessLogsMessage> = ids
        .chunks(100)
        .map(|chunk| StreamAccessLogsMessage {
            log_entries: Some(LogEntries::HttpLogs(HttpAccessLogEntries {
                log_entry: chunk
                    .iter()
                    .map(|id| HttpAccessLogEntry {
                        request: Some(HttpRequestProperties {
                            request_headers: [("x-keywarden-audit-id".to_owned(), id.clone())].into(),
                            ..Default::default()
                        }),
                        response: Some(HttpResponseProperties {
                            response_code: Some(UInt32Value { value: 200 }),
                            ..Default::default()
                        }),
                        ..Default::default()
                    })
                    .collect(),
            })),
            ..Default::default()
        })
        .collect();
    let channel = Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let started = Instant::now();
    AccessLogServiceClient::new(channel).stream_access_logs(tokio_stream::iter(messages)).await.unwrap();
    ids.len() as f64 / started.elapsed().as_secs_f64()
}

// ------------------------------------------------------------------ fixtures

/// The gateway's scenarios: the hot path's warm keys through Envoy's
/// Check, and malformed keys answered 401.
pub(super) fn gateway_scenarios(keys: &Arc<Vec<String>>) -> Vec<Scenario> {
    let malformed: Arc<Vec<String>> = Arc::new(keys.iter().take(100).map(|k| bad_checksum(k)).collect());
    vec![
        Scenario::new(
            "warm Check ALLOW (gateway)",
            "check-allow",
            Arc::new(Load::Check(Arc::clone(keys))),
            0,
        ),
        Scenario::new(
            "Check DENY 401 (bad checksum)",
            "check-malformed",
            Arc::new(Load::Check(malformed)),
            0,
        ),
    ]
}
