//! Per-method request size limits. tonic's own limit is per service (and
//! checks each message's declared length before reading it); this layer
//! adds tighter limits for single methods, so that a Verify (a few hundred
//! bytes) can never carry what RecordOutcomes, in the same service, may.
//! Other methods' bodies pass through untouched.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use http_body::{Frame, SizeHint};
use tonic::{
    Status,
    body::Body,
    codegen::{Bytes, http},
};
use tower::{Layer, Service};

/// gRPC frames each message with a 5-byte header.
const FRAME_HEADER: u64 = 5;

/// Most bytes one request message of a method (`/pkg.Service/Method`)
/// may have, for the methods whose limit is tighter than their service's.
#[derive(Debug, Clone, Default)]
pub struct MessageLimits(Vec<(&'static str, usize)>);

impl MessageLimits {
    pub fn with(mut self, method: &'static str, limit: usize) -> Self {
        self.0.push((method, limit));
        self
    }

    pub fn limit(&self, path: &str) -> Option<usize> {
        self.0.iter().find(|(method, _)| *method == path).map(|(_, limit)| *limit)
    }
}

#[derive(Debug, Clone)]
pub struct MessageLimitLayer(MessageLimits);

impl MessageLimitLayer {
    pub fn new(limits: MessageLimits) -> Self {
        Self(limits)
    }
}

impl<S> Layer<S> for MessageLimitLayer {
    type Service = MessageLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        MessageLimit { inner, limits: self.0.clone() }
    }
}

#[derive(Debug, Clone)]
pub struct MessageLimit<S> {
    inner: S,
    limits: MessageLimits,
}

impl<S> Service<http::Request<Body>> for MessageLimit<S>
where
    S: Service<http::Request<Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        match self.limits.limit(request.uri().path()) {
            Some(limit) => {
                self.inner.call(request.map(|body| Body::new(Limited { inner: body, limit, seen: 0 })))
            }
            None => self.inner.call(request),
        }
    }
}

/// A request body that fails with OUT_OF_RANGE (tonic's code for a message
/// over its limit) once it carries more than one message of `limit` bytes
/// (unary calls send one message).
struct Limited {
    inner: Body,
    limit: usize,
    seen: u64,
}

impl http_body::Body for Limited {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let frame = std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx));
        if let Some(Ok(frame)) = &frame
            && let Some(data) = frame.data_ref()
        {
            self.seen += data.len() as u64;
            if self.seen > self.limit as u64 + FRAME_HEADER {
                return Poll::Ready(Some(Err(Status::out_of_range(format!(
                    "request message larger than {} bytes, the limit for this method",
                    self.limit
                )))));
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_named_methods_have_a_limit_of_their_own() {
        let limits = MessageLimits::default().with("/keywarden.v1.KeyVerify/Verify", 16 << 10);
        assert_eq!(limits.limit("/keywarden.v1.KeyVerify/Verify"), Some(16 << 10));
        assert_eq!(limits.limit("/keywarden.v1.KeyVerify/RecordOutcomes"), None, "its service's limit");
        assert_eq!(limits.limit("/keywarden.v1.KeyVerify/VerifyX"), None);
    }
}
