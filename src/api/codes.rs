//! Counts every gRPC error answer by status code, on every listener, for
//! alerts on RESOURCE_EXHAUSTED and UNAVAILABLE. An error answer is
//! trailers-only, so its `grpc-status` is in the response headers: reading
//! them costs nothing on success, where that header is absent.

use std::sync::Arc;

use tonic::{body::Body, codegen::http};

use crate::metrics::{CodeLabels, Metrics};

/// The response mapping for `tower::util::MapResponseLayer`.
pub fn counter(metrics: Arc<Metrics>) -> impl Fn(http::Response<Body>) -> http::Response<Body> + Clone {
    // Every code is exported from the start, at zero, so that rate() sees
    // the first error.
    for code in (1..=16).map(tonic::Code::from_i32) {
        metrics.grpc_errors.get_or_create(&CodeLabels { code: code_name(code) }).inc_by(0);
    }
    move |response| {
        if let Some(code) = response
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<i32>().ok())
            .map(tonic::Code::from_i32)
            .filter(|code| *code != tonic::Code::Ok)
        {
            metrics.grpc_errors.get_or_create(&CodeLabels { code: code_name(code) }).inc();
        }
        response
    }
}

fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}
