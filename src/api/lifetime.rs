//! How long a call may live, and which calls keep a connection busy. Every
//! call but Envoy's access-log stream is bounded by the request timeout
//! (answered CANCELLED, as tonic's own timeout would; a shorter client
//! `grpc-timeout` still wins, applied by tonic): that stream is meant to
//! stay open, and ends at its own maximum age instead, after writing what
//! it holds (`api::access_log`). A call counts as in flight on its
//! connection ([`super::peer::ActiveStreams`]) until its response body ends, so that the
//! transport closes only connections with nothing in flight.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use http_body::{Frame, SizeHint};
use tonic::{
    Status,
    body::Body,
    codegen::{Bytes, http},
};
use tower::{Layer, Service};

use super::peer::{PeerInfo, StreamGuard};

/// Calls the request timeout does not bound.
pub const LONG_LIVED: [&str; 1] = ["/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs"];

#[derive(Debug, Clone, Copy)]
pub struct CallLifetimeLayer {
    timeout: Duration,
}

impl CallLifetimeLayer {
    pub fn new(timeout: Duration) -> Self {
        Self { timeout }
    }
}

impl<S> Layer<S> for CallLifetimeLayer {
    type Service = CallLifetime<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CallLifetime { inner, timeout: self.timeout }
    }
}

#[derive(Debug, Clone)]
pub struct CallLifetime<S> {
    inner: S,
    timeout: Duration,
}

impl<S> Service<http::Request<Body>> for CallLifetime<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let guard =
            request.extensions().get::<PeerInfo>().and_then(|p| p.streams.as_ref()).map(|s| s.begin());
        let timeout = (!LONG_LIVED.contains(&request.uri().path())).then_some(self.timeout);
        let call = self.inner.call(request);
        Box::pin(async move {
            let response = match timeout {
                Some(timeout) => match tokio::time::timeout(timeout, call).await {
                    Ok(response) => response?,
                    Err(_) => Status::cancelled("Timeout expired").into_http(),
                },
                None => call.await?,
            };
            Ok(match guard {
                Some(guard) => response.map(|body| Body::new(Tracked { inner: body, _guard: guard })),
                None => response,
            })
        })
    }
}

/// A response body that keeps its call counted until it ends or drops.
struct Tracked {
    inner: Body,
    _guard: StreamGuard,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
