//! Logs and traces. Logs go to stderr (text or JSON). Spans always get W3C
//! ids — audit rows record the trace id — and are exported over OTLP/gRPC
//! only when the standard `OTEL_EXPORTER_OTLP_*` variables say where.

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::{KeyValue, trace::TracerProvider as _};
use opentelemetry_sdk::{Resource, propagation::TraceContextPropagator, trace::SdkTracerProvider};
use tracing_subscriber::{EnvFilter, Layer, layer::SubscriberExt, util::SubscriberInitExt};

use crate::config::LogFormat;

/// The `keywarden.verify` span, with a slot for every audit field so that
/// `audit::record_on_span` can fill them once the decision is made.
pub fn verify_span() -> tracing::Span {
    use tracing::field::Empty;
    tracing::trace_span!(
        "keywarden.verify",
        otel.kind = "server",
        keywarden.audit_event_id = Empty,
        keywarden.timestamp = Empty,
        keywarden.api_key_id = Empty,
        keywarden.api_key_name = Empty,
        keywarden.merchant_id = Empty,
        keywarden.endpoint = Empty,
        keywarden.method = Empty,
        keywarden.status = Empty,
        keywarden.ip = Empty,
        keywarden.decision = Empty,
        keywarden.deny_reason = Empty,
        keywarden.key_prefix = Empty,
    )
}

const DEFAULT_LOG_FILTER: &str =
    "info,h2=warn,hyper=warn,tower=warn,sqlx=warn,sea_orm=warn,sea_orm_migration=warn";

/// Keeps the tracer provider alive; [`Telemetry::shutdown`] flushes spans.
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

fn otlp_configured() -> bool {
    ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()))
}

/// service.name defaults to `keywarden` unless OTEL_SERVICE_NAME or
/// OTEL_RESOURCE_ATTRIBUTES set it; service.version is this build's.
pub fn resource() -> Resource {
    let named_by_env = std::env::var_os("OTEL_SERVICE_NAME").is_some()
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|a| a.contains("service.name="));
    let mut builder =
        Resource::builder().with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
    if !named_by_env {
        builder = builder.with_service_name("keywarden");
    }
    builder.build()
}

/// A provider exporting over OTLP/gRPC, if the OTEL_* variables name an
/// endpoint. Without one there is no provider at all: building spans that go
/// nowhere would only cost the hot path.
pub fn tracer_provider() -> Result<Option<SdkTracerProvider>, opentelemetry_otlp::ExporterBuildError> {
    if !otlp_configured() {
        return Ok(None);
    }
    let mut builder = opentelemetry_otlp::SpanExporter::builder().with_tonic();
    if let Some(tls) = otlp_tls(|variable| std::env::var_os(variable))? {
        use opentelemetry_otlp::WithTonicConfig as _;
        builder = builder.with_tls_config(tls);
    }
    let exporter = builder.build()?;
    Ok(Some(SdkTracerProvider::builder().with_resource(resource()).with_batch_exporter(exporter).build()))
}

/// TLS to the collector from the specification's variables: the CA in
/// `OTEL_EXPORTER_OTLP_CERTIFICATE`, and for mTLS the client certificate
/// and key in `OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE` and `…_CLIENT_KEY`.
/// Same rustls and ring provider as the listeners. `env` reads a variable.
fn otlp_tls(
    env: impl Fn(&str) -> Option<std::ffi::OsString>,
) -> Result<Option<tonic::transport::ClientTlsConfig>, opentelemetry_otlp::ExporterBuildError> {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let read = |variable: &str| -> Result<Option<Vec<u8>>, opentelemetry_otlp::ExporterBuildError> {
        match env(variable) {
            None => Ok(None),
            Some(path) => std::fs::read(&path).map(Some).map_err(|e| {
                opentelemetry_otlp::ExporterBuildError::InvalidConfiguration(format!(
                    "{variable}: cannot read {}: {e}",
                    std::path::Path::new(&path).display()
                ))
            }),
        }
    };
    let Some(ca) = read("OTEL_EXPORTER_OTLP_CERTIFICATE")? else { return Ok(None) };
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
    if let (Some(cert), Some(key)) =
        (read("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE")?, read("OTEL_EXPORTER_OTLP_CLIENT_KEY")?)
    {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Ok(Some(tls))
}

/// Whether an OpenTelemetry layer is installed, i.e. whether spans carry
/// trace ids worth reading.
static SPANS_EXPORTED: AtomicBool = AtomicBool::new(false);

/// The OpenTelemetry layer. Install it behind [`spans_filter`], which keeps
/// every other crate's spans out.
pub fn otel_layer<S>(provider: &SdkTracerProvider) -> impl Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    SPANS_EXPORTED.store(true, Ordering::Relaxed);
    tracing_opentelemetry::layer().with_tracer(provider.tracer("keywarden"))
}

/// A global filter for subscribers that export spans: keywarden's own spans
/// and every event (the log layer filters those by `RUST_LOG`). Global rather
/// than per-layer on purpose: with a per-layer filter on the OpenTelemetry
/// layer, spans were intermittently created yet never handed to it (stale
/// per-thread filter state), so never exported.
pub fn spans_filter() -> tracing_subscriber::filter::FilterFn {
    tracing_subscriber::filter::filter_fn(|metadata| {
        metadata.is_event() || metadata.target().starts_with("keywarden")
    })
}

/// Log lines beside the span exporter: the `RUST_LOG` filter must then be
/// per-layer, since the exporter wants spans the log filter rejects.
/// keywarden's per-call spans are at TRACE, below any sensible log filter, so
/// the log layer never formats them (that would cost every call).
fn log_layer<S>(format: LogFormat) -> Box<dyn Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fmt_layer(format).with_filter(env_filter()).boxed()
}

fn env_filter() -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER))
}

fn fmt_layer<S>(format: LogFormat) -> Box<dyn Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    match format {
        LogFormat::Text => tracing_subscriber::fmt::layer().with_writer(std::io::stderr).boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .boxed(),
    }
}

/// Installs the global subscriber: logs, plus spans when they are exported.
pub fn init(format: LogFormat) -> Result<Telemetry, Box<dyn std::error::Error + Send + Sync>> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let provider = tracer_provider()?;
    // Two stacks rather than an `Option` layer: a `None` layer counts as
    // interested in every callsite, which would enable every dependency's
    // trace-level spans, a large share of the server's CPU on the warm path.
    match &provider {
        Some(provider) => {
            tracing_subscriber::registry()
                .with(spans_filter())
                .with(otel_layer(provider))
                .with(log_layer(format))
                .try_init()?;
        }
        // Logs only: the filter can be global, so callsites it rejects (all
        // per-call spans among them) are never even evaluated again.
        None => tracing_subscriber::registry().with(env_filter()).with(fmt_layer(format)).try_init()?,
    }
    Ok(Telemetry { provider })
}

impl Telemetry {
    /// Exports what is buffered; called last on shutdown.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(e) = provider.shutdown()
        {
            eprintln!("keywarden: flushing spans failed: {e}");
        }
    }

    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }
}

tokio::task_local! {
    /// The caller's W3C trace id for the call being served.
    static CALLER_TRACE: Option<String>;
}

/// A request future running with its caller's trace id in scope.
pub type CallerTrace<F> = tokio::task::futures::TaskLocalFuture<Option<String>, F>;

pub fn with_caller_trace<F: Future>(trace_id: Option<String>, f: F) -> CallerTrace<F> {
    CALLER_TRACE.scope(trace_id, f)
}

/// The trace the call being served belongs to: its span's trace when spans
/// are exported, otherwise the caller's (from its `traceparent`), if any.
pub fn current_trace_id() -> Option<String> {
    CALLER_TRACE.try_with(Clone::clone).ok().flatten()
}

/// The W3C trace id of `span`, when spans are exported and it has one.
pub fn span_trace_id(span: &tracing::Span) -> Option<String> {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    if !SPANS_EXPORTED.load(Ordering::Relaxed) || span.is_disabled() {
        return None;
    }
    let context = span.context();
    let otel_span = context.span();
    let span_context = otel_span.span_context();
    span_context.is_valid().then(|| span_context.trace_id().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn otlp_tls_comes_from_the_specification_variables() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        let cert = rcgen::generate_simple_self_signed(vec!["collector".into()]).unwrap();
        std::fs::write(&ca, cert.cert.pem()).unwrap();
        let vars = |pairs: Vec<(&'static str, std::path::PathBuf)>| {
            move |name: &str| pairs.iter().find(|(n, _)| *n == name).map(|(_, p)| p.clone().into_os_string())
        };
        assert!(otlp_tls(vars(vec![])).unwrap().is_none(), "no CA: plaintext or system defaults");
        assert!(otlp_tls(vars(vec![("OTEL_EXPORTER_OTLP_CERTIFICATE", ca)])).unwrap().is_some());
        let missing = otlp_tls(vars(vec![("OTEL_EXPORTER_OTLP_CERTIFICATE", dir.path().join("absent.pem"))]))
            .unwrap_err()
            .to_string();
        assert!(
            missing.contains("OTEL_EXPORTER_OTLP_CERTIFICATE") && missing.contains("absent.pem"),
            "{missing}"
        );
    }
}
