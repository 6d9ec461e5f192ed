//! Connections are a bounded resource: sockets that never speak, or speak
//! once and then idle, cannot crowd out other callers; Envoy's access-log
//! stream outlives the request timeout, and ends at its maximum age having
//! written everything it was sent.

use std::time::Duration;

use envoy_types::pb::envoy::service::accesslog::v3::{
    StreamAccessLogsMessage,
    access_log_service_client::AccessLogServiceClient,
    stream_access_logs_message::{HttpAccessLogEntries, LogEntries},
};
use keywarden::api::pb::{self, key_verify_client::KeyVerifyClient};
use tokio::{io::AsyncReadExt as _, io::AsyncWriteExt as _, net::TcpSocket};
use tonic::transport::Channel;

use crate::helpers::{Backend, MERCHANT, allowed, create_sales_key, outcome, parse_metrics, spawn_app_with};

once_tests!(
    idle_sockets_from_one_address_leave_room_for_every_other_caller,
    a_connection_that_never_speaks_or_only_idles_is_closed,
    the_access_log_stream_outlives_the_request_timeout_and_ends_at_its_age_with_nothing_lost,
);

/// A TCP connection to `addr` from the loopback address `from`.
async fn connect_from(from: &str, addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    socket.connect(addr).await.expect("the kernel completes the connection")
}

/// Reads until the server closes the connection; how long that took.
async fn closed_within(mut stream: tokio::net::TcpStream, bound: Duration) -> Duration {
    let started = tokio::time::Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout_at(started + bound, stream.read(&mut buf)).await {
            Err(_) => panic!("the server kept a silent connection open for {bound:?}"),
            Ok(Ok(0) | Err(_)) => return started.elapsed(),
            // The server's own SETTINGS, PINGs: it is still open.
            Ok(Ok(_)) => {}
        }
    }
}

async fn idle_sockets_from_one_address_leave_room_for_every_other_caller() {
    let mut app = spawn_app_with(Backend::Sqlite, |_| {}).await;
    let (_, key) = app.key_with_scopes(&["sales:read"]).await;
    // More silent connections than the listener holds at all, from one
    // address; they stay open for the whole test.
    let mut silent = Vec::with_capacity(4_200);
    for _ in 0..4_200 {
        silent.push(connect_from("127.0.0.2", app.addr).await);
    }
    let fresh = Channel::from_shared(format!("http://{}", app.addr)).unwrap().connect_lazy();
    let answered = tokio::time::timeout(
        Duration::from_secs(2),
        KeyVerifyClient::new(fresh).verify(pb::VerifyRequest {
            key,
            required_scope: "sales:read".into(),
            ..Default::default()
        }),
    )
    .await
    .expect("a caller from another address is served within 2 s")
    .expect("Verify answers");
    assert_eq!(outcome(&answered.into_inner()), allowed());
    let m = parse_metrics(&app.probes.exporter.render());
    assert!(
        m["keywarden_connections_refused_per_address_total"] >= (4_200 - 512) as f64,
        "beyond 512 per address, connections are closed at accept: {m:?}",
        m = m["keywarden_connections_refused_per_address_total"]
    );
    drop(silent);
    app.stop().await;
}

async fn a_connection_that_never_speaks_or_only_idles_is_closed() {
    let mut app = spawn_app_with(Backend::Sqlite, |s| {
        s.handshake_timeout_ms = 300;
        s.idle_connection_timeout_ms = 500;
    })
    .await;
    // No HTTP/2 preface at all: closed after the handshake timeout.
    let silent = connect_from("127.0.0.1", app.addr).await;
    let took = closed_within(silent, Duration::from_secs(5)).await;
    assert!(took >= Duration::from_millis(250), "closed before its timeout: {took:?}");

    // The preface and SETTINGS, then no call: closed as idle.
    let mut idle = connect_from("127.0.0.1", app.addr).await;
    idle.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00").await.unwrap();
    let took = closed_within(idle, Duration::from_secs(5)).await;
    assert!(took >= Duration::from_millis(400), "closed before the idle timeout: {took:?}");

    // A connection making calls is not idle: calls spaced below the idle
    // timeout keep one connection serving throughout.
    let (_, key) = app.key_with_scopes(&["sales:read"]).await;
    let channel = Channel::from_shared(format!("http://{}", app.addr)).unwrap().connect_lazy();
    let mut verify = KeyVerifyClient::new(channel);
    for _ in 0..8 {
        let call = pb::VerifyRequest { key: key.clone(), ..Default::default() };
        assert_eq!(outcome(&verify.verify(call).await.unwrap().into_inner()), allowed());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    app.stop().await;
}

/// An access-log entry for the request Check allowed as `audit_id`.
fn entry(audit_id: &str, status: u32) -> envoy_types::pb::envoy::data::accesslog::v3::HttpAccessLogEntry {
    use envoy_types::pb::{
        envoy::{
            config::core::v3::Metadata,
            data::accesslog::v3::{AccessLogCommon, HttpAccessLogEntry, HttpResponseProperties},
        },
        google::protobuf::{Struct, UInt32Value, Value, value::Kind},
    };
    let checked = Struct {
        fields: [("audit_id".to_owned(), Value { kind: Some(Kind::StringValue(audit_id.to_owned())) })]
            .into(),
    };
    HttpAccessLogEntry {
        common_properties: Some(AccessLogCommon {
            metadata: Some(Metadata {
                filter_metadata: [("envoy.filters.http.ext_authz".to_owned(), checked)].into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        response: Some(HttpResponseProperties {
            response_code: Some(UInt32Value { value: status }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn message(
    entries: Vec<envoy_types::pb::envoy::data::accesslog::v3::HttpAccessLogEntry>,
) -> StreamAccessLogsMessage {
    StreamAccessLogsMessage {
        log_entries: Some(LogEntries::HttpLogs(HttpAccessLogEntries { log_entry: entries })),
        ..Default::default()
    }
}

async fn the_access_log_stream_outlives_the_request_timeout_and_ends_at_its_age_with_nothing_lost() {
    let mut app = spawn_app_with(Backend::Sqlite, |s| {
        s.request_timeout_ms = 400;
        s.idle_connection_timeout_ms = 300;
        s.access_log_stream_max_age_ms = 1_500;
    })
    .await;
    let (key_id, key) = create_sales_key(&mut app.admin, "logged").await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(app.verify(&key, "", "sales:read").await.audit_event_id);
    }
    app.settle().await;

    // Entries at 0, 600 and 1,200 ms: past the request timeout, past the
    // idle timeout, and the last one a moment before the stream's age.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let channel = Channel::from_shared(format!("http://{}", app.addr)).unwrap().connect_lazy();
    let call = tokio::spawn(async move {
        AccessLogServiceClient::new(channel)
            .stream_access_logs(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    for (i, id) in ids.iter().enumerate() {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(600)).await;
        }
        tx.send(message(vec![entry(id, 200 + i as u32)])).await.unwrap();
    }
    let ended = tokio::time::timeout(Duration::from_secs(5), call)
        .await
        .expect("the server ends the stream at its maximum age")
        .unwrap();
    assert!(ended.is_ok(), "the stream ended cleanly, not cancelled: {ended:?}");
    drop(tx);
    app.settle().await;
    let events = app.audit_of(&key_id).await;
    for (i, id) in ids.iter().enumerate() {
        let row = events.iter().find(|e| &e.id == id).expect("the row");
        assert_eq!(row.status, 200 + i as i32, "entry {i} was written");
    }
    assert_eq!(events[0].merchant_id, MERCHANT);
    app.stop().await;
}
