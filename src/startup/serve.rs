//! Serving: the gRPC listeners with the tower stack every call goes
//! through, reflection per listener, the leak-report listener (HTTP), and
//! the drain (listeners close when draining starts; calls in flight get
//! the grace period).

use std::{future::Future, pin::Pin, sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::{net::TcpListener, sync::watch};
use tonic::{server::NamedService, transport::Server};
use tonic_health::pb::health_server::{Health, HealthServer};
use tower::ServiceBuilder;

use super::{
    stopped,
    tls::{self, Audience, ConnLimits, TlsSource},
};
use crate::{
    api::{
        self,
        access_log::AccessLogSink,
        auth::AdminAuthLayer,
        callers::Callers,
        ext_authz::CheckService,
        key_admin::KeyAdminService,
        key_verify::KeyVerifyService,
        leak_reports::LeakReportApi,
        lifetime::CallLifetimeLayer,
        limits::{MessageLimitLayer, MessageLimits},
        pb::{key_admin_server::KeyAdminServer, key_verify_server::KeyVerifyServer},
    },
    config::Settings,
    metrics::Metrics,
    service::access::Access,
};
use envoy_types::{
    ext_authz::v3::pb::AuthorizationServer,
    pb::envoy::service::accesslog::v3::access_log_service_server::AccessLogServiceServer,
};

/// Services every gRPC listener serves and reflection lists.
const REFLECTION_NAMES: [&str; 3] = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];
/// Largest health or reflection request (a service name, a symbol).
pub(super) const HEALTH_MAX_MESSAGE: usize = 4 << 10;
/// The Verify method's path (for its size limit).
const VERIFY_METHOD: &str = "/keywarden.v1.KeyVerify/Verify";
/// Largest ext_authz CheckRequest: Envoy's default request-header limit
/// (60 KiB) with room for the attributes around it.
const CHECK_MAX_MESSAGE: usize = 128 << 10;

/// The bound sockets.
#[derive(Debug)]
pub(super) struct Listeners {
    /// KeyVerify, Check, the access-log stream, and KeyAdmin unless it has its own.
    pub main: TcpListener,
    pub admin: Option<TcpListener>,
    /// Plaintext health for kubelet's probes.
    pub health: Option<TcpListener>,
    /// GitHub's leak reports (HTTP/1.1 and HTTP/2).
    pub leaks: Option<TcpListener>,
    pub tls: Option<Arc<TlsSource>>,
}

/// The gRPC services, with what their layers need.
pub(super) struct Services {
    pub admin: KeyAdminService,
    pub verify: KeyVerifyService,
    /// Envoy's ext_authz Check, on the same engine as Verify.
    pub check: CheckService,
    /// Envoy's access-log stream, onto the audit rows Check wrote.
    pub access_log: AccessLogSink,
    pub access: Arc<Access>,
    pub callers: Callers,
    /// The leak-report route, with the listener.
    pub leak_reports: Option<LeakReportApi>,
}

/// A listener's connections as axum takes them. Once the drain has closed
/// the listener, no connection comes again.
struct Accepted(tokio_stream::wrappers::ReceiverStream<std::io::Result<tls::Conn>>);

impl axum::serve::Listener for Accepted {
    type Io = tls::Conn;
    type Addr = ();

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        use tokio_stream::StreamExt as _;
        loop {
            match self.0.next().await {
                Some(Ok(conn)) => return (conn, ()),
                // Refused or failed handshakes are counted where they happen.
                Some(Err(_)) => continue,
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(())
    }
}

/// Serves until `draining` turns true, then for at most the shutdown grace
/// while calls in flight finish; then closes the health listener.
pub(super) async fn serve<H: Health>(
    settings: &Settings,
    listeners: Listeners,
    services: Services,
    health_service: HealthServer<H>,
    metrics: &Arc<Metrics>,
    draining: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let Listeners {
        main: listener,
        admin: admin_listener,
        health: health_listener,
        leaks: leak_listener,
        tls,
    } = listeners;
    let Services { admin, verify, check, access_log, access, callers, leak_reports } = services;
    // tonic reserves a message's declared length before reading it: every
    // service gets a limit, not tonic's 4 MiB default.
    let health_service = health_service.max_decoding_message_size(HEALTH_MAX_MESSAGE);

    // Reflection on each listener lists the services that listener
    // serves, and no other. grpcurl 1.8 only speaks v1alpha reflection;
    // newer tools use v1.
    let separate_admin = admin_listener.is_some();
    let verify_names = [
        KeyVerifyServer::<KeyVerifyService>::NAME,
        AuthorizationServer::<CheckService>::NAME,
        AccessLogServiceServer::<AccessLogSink>::NAME,
    ];
    let admin_names = [KeyAdminServer::<KeyAdminService>::NAME];
    let main_names: Vec<&str> =
        verify_names.iter().chain(admin_names.iter().filter(|_| !separate_admin)).copied().collect();
    let reflection = |names: &[&str]| {
        let builder = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(api::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(api::pb::ENVOY_FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET);
        REFLECTION_NAMES.iter().chain(names).fold(builder, |b, name| b.with_service_name(*name))
    };
    let reflection_v1 = |names: &[&str]| -> anyhow::Result<_> {
        Ok(reflection(names)
            .build_v1()
            .context("building reflection v1")?
            .max_decoding_message_size(HEALTH_MAX_MESSAGE))
    };
    let reflection_v1alpha = |names: &[&str]| -> anyhow::Result<_> {
        Ok(reflection(names)
            .build_v1alpha()
            .context("building reflection v1alpha")?
            .max_decoding_message_size(HEALTH_MAX_MESSAGE))
    };

    // Verify's limit is tighter than its service's (RecordOutcomes').
    let limits = MessageLimits::default().with(VERIFY_METHOD, settings.max_verify_message_bytes);
    // Layers on every gRPC listener, outermost first.
    let stack = ServiceBuilder::new()
        // Read the caller's W3C trace context before anything runs, so
        // every span and audit row of the call joins its trace.
        .layer(api::trace::TraceContextLayer)
        // Bound what a Verify may send, below its service's limit.
        .layer(MessageLimitLayer::new(limits))
        // Count error answers by code, for the overload and outage alerts.
        .layer(tower::util::MapResponseLayer::new(api::codes::counter(Arc::clone(metrics))))
        // Under mTLS, only listed identities verify (Verify, Check) and
        // report outcomes (RecordOutcomes, the access-log stream).
        .layer(callers)
        // Bound each call's time, and keep its connection counted busy.
        .layer(CallLifetimeLayer::new(settings.request_timeout()))
        .into_inner();
    // tonic's own per-message limit rejects on the declared length,
    // before buffering.
    let verify_service =
        KeyVerifyServer::new(verify).max_decoding_message_size(settings.max_record_outcomes_message_bytes);
    // Envoy's Check: a bound on the request headers Envoy forwards.
    let check_service = AuthorizationServer::new(check).max_decoding_message_size(CHECK_MAX_MESSAGE);
    let access_log_service =
        AccessLogServiceServer::new(access_log).max_decoding_message_size(settings.max_message_bytes);
    // KeyAdmin: every call authenticated before its handler runs.
    let admin_service = ServiceBuilder::new()
        .layer(AdminAuthLayer::new(access))
        .service(KeyAdminServer::new(admin).max_decoding_message_size(settings.max_message_bytes));
    // Every gRPC listener's HTTP/2 limits.
    let server = || {
        Server::builder()
            .max_concurrent_streams(settings.max_concurrent_streams)
            .http2_keepalive_interval(settings.http2_keepalive_interval())
            .http2_keepalive_timeout(Some(settings.http2_keepalive_timeout()))
    };

    let connection_limits = ConnLimits {
        max_connections: settings.max_connections,
        per_address: settings.max_connections_per_ip,
        handshake_timeout: settings.handshake_timeout(),
        idle_timeout: settings.idle_connection_timeout(),
    };
    // A listener's connections, until `stop` (the drain) closes it.
    let incoming = |listener, tls: Option<Arc<TlsSource>>, stop: &watch::Receiver<bool>| {
        let tls = tls.map(|t| (t, Audience::Grpc));
        tls::incoming(listener, tls, connection_limits, Arc::clone(metrics), stopped(stop.clone()))
    };
    type Serving = Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>>;
    let main_server: Serving = Box::pin(
        server()
            .layer(stack.clone())
            .add_service(health_service.clone())
            .add_service(reflection_v1(&main_names)?)
            .add_service(reflection_v1alpha(&main_names)?)
            .add_service(verify_service)
            .add_service(check_service)
            .add_service(access_log_service)
            .add_optional_service((!separate_admin).then(|| admin_service.clone()))
            .serve_with_incoming_shutdown(
                incoming(listener, tls.clone(), &draining),
                stopped(draining.clone()),
            ),
    );
    let admin_server: Serving = match admin_listener {
        Some(listener) => Box::pin(
            server()
                .layer(stack.clone())
                .add_service(health_service.clone())
                .add_service(reflection_v1(&admin_names)?)
                .add_service(reflection_v1alpha(&admin_names)?)
                .add_service(admin_service)
                .serve_with_incoming_shutdown(
                    incoming(listener, tls.clone(), &draining),
                    stopped(draining.clone()),
                ),
        ),
        None => Box::pin(async { Ok(()) }),
    };
    // Plaintext by design: kubelet's gRPC probes cannot speak TLS, and
    // health carries no secret. It keeps answering through the drain
    // (readiness NOT_SERVING, liveness SERVING) and closes after it.
    let (health_closing, health_close) = watch::channel(false);
    let health_server = health_listener.map(|listener| {
        tokio::spawn(server().add_service(health_service).serve_with_incoming_shutdown(
            incoming(listener, None, &health_close),
            stopped(health_close.clone()),
        ))
    });
    // GitHub's reports: the same certificate and connection limits, no
    // client certificate, HTTP/1.1 or HTTP/2; closed with the others.
    let leak_server = async {
        let (Some(listener), Some(api)) = (leak_listener, leak_reports) else { return Ok(()) };
        let connections = tls::incoming(
            listener,
            tls.clone().map(|t| (t, Audience::Public)),
            connection_limits,
            Arc::clone(metrics),
            stopped(draining.clone()),
        );
        axum::serve(Accepted(connections), api::leak_reports::router(api))
            .with_graceful_shutdown(stopped(draining.clone()))
            .await
            .context("serving leak reports")
    };
    let servers = async {
        let grpc = async { tokio::try_join!(main_server, admin_server).map(|_| ()).context("serving gRPC") };
        tokio::try_join!(grpc, leak_server).map(|_| ())
    };
    let grace = settings.shutdown_grace();
    let grace_over = {
        let draining = stopped(draining.clone());
        async move {
            draining.await;
            tokio::time::sleep(grace).await;
        }
    };
    tokio::select! {
        served = servers => served?,
        () = grace_over => tracing::warn!(grace_ms = grace.as_millis() as u64, "drain period over; abandoning calls still in flight"),
    }
    let _ = health_closing.send(true);
    if let Some(health_server) = health_server {
        let abort = health_server.abort_handle();
        if tokio::time::timeout(Duration::from_secs(1), health_server).await.is_err() {
            abort.abort();
        }
    }
    Ok(())
}
