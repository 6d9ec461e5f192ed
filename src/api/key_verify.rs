//! KeyVerify handlers: the hot path. Each Verify runs inside its
//! `keywarden.verify` span, parented on the caller's trace.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{
    convert,
    pb::{self, key_verify_server::KeyVerify},
    trace::{adopt_parent, traced},
};
use crate::{service::verify::Verifier, telemetry};

#[derive(Debug, Clone)]
pub struct KeyVerifyService {
    verifier: Arc<Verifier>,
}

impl KeyVerifyService {
    pub fn new(verifier: Arc<Verifier>) -> Self {
        Self { verifier }
    }
}

#[tonic::async_trait]
impl KeyVerify for KeyVerifyService {
    async fn verify(
        &self,
        request: Request<pb::VerifyRequest>,
    ) -> Result<Response<pb::VerifyResponse>, Status> {
        let span = telemetry::verify_span();
        adopt_parent(&span, &request);
        let request = request.into_inner();
        let verdict = traced(&span, async {
            let call = convert::verify_call(&self.verifier, request)?;
            self.verifier.verify(call, &span).await
        })
        .await?;
        Ok(Response::new(convert::verdict(verdict)))
    }

    async fn record_outcomes(
        &self,
        request: Request<pb::RecordOutcomesRequest>,
    ) -> Result<Response<pb::RecordOutcomesResponse>, Status> {
        let span = tracing::trace_span!("keywarden.record_outcomes", otel.kind = "server");
        adopt_parent(&span, &request);
        let outcomes =
            request.into_inner().outcomes.into_iter().map(|o| (o.audit_event_id, o.status)).collect();
        let updated = traced(&span, self.verifier.outcomes().record(outcomes)).await?;
        Ok(Response::new(pb::RecordOutcomesResponse { updated: i32::try_from(updated).unwrap_or(i32::MAX) }))
    }
}
