//! W3C trace context from incoming gRPC metadata, so that keywarden's spans
//! join the calling service's trace.

use opentelemetry::{
    Context,
    propagation::{Extractor, TextMapPropagator},
};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tonic::codegen::http::{self, HeaderMap};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The caller's trace context, put into request extensions by
/// [`extract_parent`].
#[derive(Debug, Clone)]
pub struct ParentContext(pub Context);

struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// Request mapper for the tower stack: reads `traceparent`/`tracestate`.
pub fn extract_parent<B>(mut request: http::Request<B>) -> http::Request<B> {
    if request.headers().contains_key("traceparent") {
        let context = TraceContextPropagator::new().extract(&Headers(request.headers()));
        request.extensions_mut().insert(ParentContext(context));
    }
    request
}

/// Makes `span` a child of the caller's span, when the call carried one.
pub fn adopt_parent<T>(span: &tracing::Span, request: &tonic::Request<T>) {
    if let Some(ParentContext(context)) = request.extensions().get::<ParentContext>() {
        let _ = span.set_parent(context.clone());
    }
}
