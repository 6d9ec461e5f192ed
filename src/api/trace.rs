//! W3C trace context from incoming gRPC metadata, so that keywarden's spans
//! and audit rows join the calling service's trace.

use std::task::{Context as TaskContext, Poll};

use opentelemetry::{
    Context,
    propagation::{Extractor, TextMapPropagator},
    trace::TraceContextExt,
};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tonic::codegen::http::{self, HeaderMap};
use tower::{Layer, Service};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::telemetry::{CallerTrace, with_caller_trace};

/// The caller's trace context, in request extensions.
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

/// Reads `traceparent`/`tracestate` once per call: the parent goes into the
/// request extensions (for spans), its trace id into a task-local (for audit
/// rows, even when no spans are exported).
#[derive(Debug, Clone, Copy, Default)]
pub struct TraceContextLayer;

impl<S> Layer<S> for TraceContextLayer {
    type Service = TraceContextService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TraceContextService { inner }
    }
}

#[derive(Debug, Clone)]
pub struct TraceContextService<S> {
    inner: S,
}

impl<S, B> Service<http::Request<B>> for TraceContextService<S>
where
    S: Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = CallerTrace<S::Future>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let mut trace_id = None;
        if request.headers().contains_key("traceparent") {
            let context = TraceContextPropagator::new().extract(&Headers(request.headers()));
            let span_context = context.span().span_context().clone();
            if span_context.is_valid() {
                trace_id = Some(span_context.trace_id().to_string());
                request.extensions_mut().insert(ParentContext(context));
            }
        }
        with_caller_trace(trace_id, self.inner.call(request))
    }
}

/// Runs a service call on behalf of `span` without entering it. The span
/// still times the call (it ends when the handler drops it) and names the
/// trace that audit rows record, but it is never the current span while
/// database or pool work runs: tasks spawned there capture the current span
/// and would keep it open, unexported, long after the call.
pub fn traced<F: Future>(span: &tracing::Span, call: F) -> CallerTrace<F> {
    let trace = crate::telemetry::span_trace_id(span).or_else(crate::telemetry::current_trace_id);
    with_caller_trace(trace, call)
}

/// Makes `span` a child of the caller's span, when the call carried one.
pub fn adopt_parent<T>(span: &tracing::Span, request: &tonic::Request<T>) {
    if let Some(ParentContext(context)) = request.extensions().get::<ParentContext>() {
        let _ = span.set_parent(context.clone());
    }
}
