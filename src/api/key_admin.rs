//! KeyAdmin handlers. The admin layer ([`super::auth`]) has already
//! authenticated the caller and left its [`Principal`] in the request
//! extensions; the service decides what it may do.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{
    convert::{self, duration_in, timestamp_in},
    pb::{self, key_admin_server::KeyAdmin},
    trace::{adopt_parent, traced},
};
use crate::service::{
    access::Principal,
    admin::{AuditFilter, CreateKey, KeyManager, UpdateKey},
    leaks::{Label, Leaks, Reported},
    operators::{NewOperator, OperatorTokens},
    peppers::Peppers,
};

#[derive(Debug, Clone)]
pub struct KeyAdminService {
    manager: Arc<KeyManager>,
    operators: Arc<OperatorTokens>,
    peppers: Arc<Peppers>,
    leaks: Arc<Leaks>,
}

impl KeyAdminService {
    pub fn new(
        manager: Arc<KeyManager>,
        operators: Arc<OperatorTokens>,
        peppers: Arc<Peppers>,
        leaks: Arc<Leaks>,
    ) -> Self {
        Self { manager, operators, peppers, leaks }
    }
}

/// The caller and a span for this admin call, joined to the caller's trace.
fn admin_call<T>(request: &Request<T>, rpc: &'static str) -> Result<(Principal, tracing::Span), Status> {
    let who = request
        .extensions()
        .get::<Principal>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("missing admin credentials"))?;
    let span =
        tracing::trace_span!("keywarden.admin", otel.name = rpc, otel.kind = "server", actor = %who.actor);
    adopt_parent(&span, request);
    Ok((who, span))
}

/// A webhook endpoint as KeyAdmin shows it: never its secret.
macro_rules! webhook_endpoint {
    ($e:expr) => {{
        let e = $e;
        pb::WebhookEndpoint {
            id: e.id,
            url: e.url,
            event_types: e.event_types,
            merchant_id: e.merchant_id,
            create_time: Some(convert::timestamp(e.created_at)),
            created_by: e.created_by,
        }
    }};
}

#[tonic::async_trait]
impl KeyAdmin for KeyAdminService {
    async fn create_key(
        &self,
        request: Request<pb::CreateKeyRequest>,
    ) -> Result<Response<pb::CreateKeyResponse>, Status> {
        let (who, span) = admin_call(&request, "keywarden.admin.CreateKey")?;
        let r = request.into_inner();
        let input = CreateKey {
            expires_at: timestamp_in("expires_at", r.expires_at)?,
            merchant_id: r.merchant_id,
            name: r.name,
            scopes: r.scopes,
            preset: r.preset,
            allowed_cidrs: r.allowed_cidrs,
            rate_limits: convert::rate_limits_in(r.rate_limits),
            credits: convert::credits_in(r.credits),
            metadata: r.metadata.into_iter().collect(),
        };
        let issued = traced(&span, self.manager.create(&who, input)).await?;
        Ok(Response::new(pb::CreateKeyResponse {
            plaintext_key: issued.plaintext.expose().to_owned(),
            api_key: Some(convert::api_key(issued.key)),
        }))
    }

    async fn get_key(
        &self,
        request: Request<pb::GetKeyRequest>,
    ) -> Result<Response<pb::GetKeyResponse>, Status> {
        let (who, span) = admin_call(&request, "keywarden.admin.GetKey")?;
        let r = request.into_inner();
        let key = traced(&span, self.manager.get(&who, &r.merchant_id, &r.key_id)).await?;
        Ok(Response::new(pb::GetKeyResponse { api_key: Some(convert::api_key(key)) }))
    }

    async fn list_keys(
        &self,
        request: Request<pb::ListKeysRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        let (who, span) = admin_call(&request, "keywarden.admin.ListKeys")?;
        let r = request.into_inner();
        let page = traced(
            &span,
            self.manager.list(&who, &r.merchant_id, r.page_size, &r.page_token, r.include_revoked),
        )
        .await?;
        Ok(Response::new(pb::ListKeysResponse {
            api_keys: page.items.into_iter().map(convert::api_key).collect(),
            next_page_token: page.next_page_token,
        }))
    }

    async fn update_key(
        &self,
        request: Request<pb::UpdateKeyRequest>,
    ) -> Result<Response<pb::UpdateKeyResponse>, Status> {
        let (who, span) = admin_call(&request, "keywarden.admin.UpdateKey")?;
        let r = request.into_inner();
        let input = UpdateKey {
            expires_at: timestamp_in("expires_at", r.expires_at)?,
            paths: r.update_mask.map(|m| m.paths).unwrap_or_default(),
            merchant_id: r.merchant_id,
            key_id: r.key_id,
            name: r.name,
            scopes: r.scopes,
            allowed_cidrs: r.allowed_cidrs,
            rate_limits: convert::rate_limits_in(r.rate_limits),
            credits: convert::credits_in(r.credits),
            metadata: r.metadata.into_iter().collect(),
        };
        let key = traced(&span, self.manager.update(&who, input)).await?;
        Ok(Response::new(pb::UpdateKeyResponse { api_key: Some(convert::api_key(key)) }))
    }

    async fn revoke_key(
        &self,
        request: Request<pb::RevokeKeyRequest>,
    ) -> Result<Response<pb::RevokeKeyResponse>, Status> {
        let (who, span) = admin_call(&request, "keywarden.admin.RevokeKey")?;
        let r = request.into_inner();
        let key = traced(&span, self.manager.revoke(&who, &r.merchant_id, &r.key_id, &r.reason)).await?;
        Ok(Response::new(pb::RevokeKeyResponse { api_key: Some(convert::api_key(key)) }))
    }

    async fn regenerate_key(
        &self,
        request: Request<pb::RegenerateKeyRequest>,
    ) -> Result<Response<pb::RegenerateKeyResponse>, Status> {
        let (who, span) = admin_call(&request, "keywarden.admin.RegenerateKey")?;
        let r = request.into_inner();
        let grace = duration_in("grace_period", r.grace_period)?;
        let done = traced(&span, self.manager.regenerate(&who, &r.merchant_id, &r.key_id, grace)).await?;
        Ok(Response::new(pb::RegenerateKeyResponse {
            plaintext_key: done.plaintext.expose().to_owned(),
            api_key: Some(convert::api_key(done.key)),
            previous_key: Some(convert::api_key(done.previous)),
        }))
    }

    async fn get_key_usage(
        &self,
        request: Request<pb::GetKeyUsageRequest>,
    ) -> Result<Response<pb::GetKeyUsageResponse>, Status> {
        let (who, span) = admin_call(&request, "keywarden.admin.GetKeyUsage")?;
        let r = request.into_inner();
        let usage = traced(&span, self.manager.usage(&who, &r.merchant_id, &r.key_id)).await?;
        Ok(Response::new(pb::GetKeyUsageResponse {
            last_used_at: usage.last_used_at.map(convert::timestamp),
            request_count: usage.request_count,
            denied_count: usage.denied_count,
        }))
    }

    async fn list_audit_events(
        &self,
        request: Request<pb::ListAuditEventsRequest>,
    ) -> Result<Response<pb::ListAuditEventsResponse>, Status> {
        let (who, span) = admin_call(&request, "keywarden.admin.ListAuditEvents")?;
        let r = request.into_inner();
        let filter = AuditFilter {
            start: timestamp_in("start_time", r.start_time)?,
            end: timestamp_in("end_time", r.end_time)?,
            merchant_id: r.merchant_id,
            unattributed: r.unattributed,
            api_key_id: r.api_key_id,
            page_size: r.page_size,
            page_token: r.page_token,
        };
        let page = traced(&span, self.manager.audit_events(&who, filter)).await?;
        Ok(Response::new(pb::ListAuditEventsResponse {
            events: page.items.into_iter().map(convert::audit_event).collect(),
            next_page_token: page.next_page_token,
        }))
    }

    async fn list_scopes(
        &self,
        request: Request<pb::ListScopesRequest>,
    ) -> Result<Response<pb::ListScopesResponse>, Status> {
        let (who, _span) = admin_call(&request, "keywarden.admin.ListScopes")?;
        let catalogue = self.manager.catalogue(&who)?;
        Ok(Response::new(pb::ListScopesResponse {
            scopes: catalogue
                .scopes()
                .map(|(def, implies)| pb::Scope {
                    name: def.name.clone(),
                    description: def.description.clone(),
                    implies: implies.to_vec(),
                })
                .collect(),
            presets: catalogue
                .presets()
                .iter()
                .map(|p| pb::Preset {
                    name: p.def.name.clone(),
                    scopes: catalogue.names(p.scopes),
                    use_case: p.def.use_case.clone(),
                    display_name: p.def.display_name.clone(),
                })
                .collect(),
        }))
    }

    async fn create_operator_token(
        &self,
        request: Request<pb::CreateOperatorTokenRequest>,
    ) -> Result<Response<pb::CreateOperatorTokenResponse>, Status> {
        let (who, span) = admin_call(&request, "keywarden.admin.CreateOperatorToken")?;
        let r = request.into_inner();
        let input = NewOperator {
            expires_at: timestamp_in("expires_at", r.expires_at)?,
            role: convert::role_in(r.role),
            name: r.name,
            merchant_ids: r.merchant_ids,
        };
        let issued = traced(&span, self.operators.create(&who, input)).await?;
        Ok(Response::new(pb::CreateOperatorTokenResponse {
            plaintext_token: issued.plaintext.expose().to_owned(),
            operator_token: Some(convert::operator_token(issued.token)),
        }))
    }

    async fn list_operator_tokens(
        &self,
        request: Request<pb::ListOperatorTokensRequest>,
    ) -> Result<Response<pb::ListOperatorTokensResponse>, Status> {
        let (who, span) = admin_call(&request, "keywarden.admin.ListOperatorTokens")?;
        let r = request.into_inner();
        let page = traced(&span, self.operators.list(&who, r.page_size, &r.page_token)).await?;
        Ok(Response::new(pb::ListOperatorTokensResponse {
            operator_tokens: page.items.into_iter().map(convert::operator_token).collect(),
            next_page_token: page.next_page_token,
        }))
    }

    async fn revoke_operator_token(
        &self,
        request: Request<pb::RevokeOperatorTokenRequest>,
    ) -> Result<Response<pb::RevokeOperatorTokenResponse>, Status> {
        let (who, span) = admin_call(&request, "keywarden.admin.RevokeOperatorToken")?;
        let r = request.into_inner();
        let token = traced(&span, self.operators.revoke(&who, &r.id)).await?;
        Ok(Response::new(pb::RevokeOperatorTokenResponse {
            operator_token: Some(convert::operator_token(token)),
        }))
    }

    async fn get_pepper_status(
        &self,
        request: Request<pb::GetPepperStatusRequest>,
    ) -> Result<Response<pb::GetPepperStatusResponse>, Status> {
        let (who, span) = admin_call(&request, "keywarden.admin.GetPepperStatus")?;
        let generations = traced(&span, self.peppers.status(&who)).await?;
        Ok(Response::new(pb::GetPepperStatusResponse {
            generations: generations.into_iter().map(convert::pepper_generation).collect(),
        }))
    }

    async fn list_events(
        &self,
        request: Request<pb::ListEventsRequest>,
    ) -> Result<Response<pb::ListEventsResponse>, Status> {
        let (who, span) = admin_call(&request, "keywarden.admin.ListEvents")?;
        let r = request.into_inner();
        let page =
            traced(&span, self.manager.list_events(&who, &r.merchant_id, &r.types, &r.after, r.page_size))
                .await?;
        let events = page
            .events
            .into_iter()
            .map(|e| convert::event(e.id, e.kind, e.key_id, e.time, &e.body))
            .collect::<Result<_, _>>()?;
        Ok(Response::new(pb::ListEventsResponse { events, next_cursor: page.next_cursor }))
    }

    async fn create_webhook_endpoint(
        &self,
        request: Request<pb::CreateWebhookEndpointRequest>,
    ) -> Result<Response<pb::CreateWebhookEndpointResponse>, Status> {
        let (who, span) = admin_call(&request, "keywarden.admin.CreateWebhookEndpoint")?;
        let r = request.into_inner();
        let created =
            traced(&span, self.manager.create_webhook(&who, &r.url, r.event_types, &r.merchant_id)).await?;
        Ok(Response::new(pb::CreateWebhookEndpointResponse {
            endpoint: Some(webhook_endpoint!(created.endpoint)),
            signing_secret: created.secret.reveal(),
        }))
    }

    async fn list_webhook_endpoints(
        &self,
        request: Request<pb::ListWebhookEndpointsRequest>,
    ) -> Result<Response<pb::ListWebhookEndpointsResponse>, Status> {
        let (who, span) = admin_call(&request, "keywarden.admin.ListWebhookEndpoints")?;
        let endpoints = traced(&span, self.manager.list_webhooks(&who)).await?;
        Ok(Response::new(pb::ListWebhookEndpointsResponse {
            endpoints: endpoints.into_iter().map(|e| webhook_endpoint!(e)).collect(),
        }))
    }

    async fn delete_webhook_endpoint(
        &self,
        request: Request<pb::DeleteWebhookEndpointRequest>,
    ) -> Result<Response<pb::DeleteWebhookEndpointResponse>, Status> {
        let (who, span) = admin_call(&request, "keywarden.admin.DeleteWebhookEndpoint")?;
        let r = request.into_inner();
        traced(&span, self.manager.delete_webhook(&who, &r.id)).await?;
        Ok(Response::new(pb::DeleteWebhookEndpointResponse {}))
    }

    async fn list_webhook_deliveries(
        &self,
        request: Request<pb::ListWebhookDeliveriesRequest>,
    ) -> Result<Response<pb::ListWebhookDeliveriesResponse>, Status> {
        let (who, span) = admin_call(&request, "keywarden.admin.ListWebhookDeliveries")?;
        let r = request.into_inner();
        let page =
            traced(&span, self.manager.webhook_deliveries(&who, &r.endpoint_id, r.page_size, &r.page_token))
                .await?;
        Ok(Response::new(pb::ListWebhookDeliveriesResponse {
            deliveries: page
                .items
                .into_iter()
                .map(|d| pb::WebhookDelivery {
                    event_id: d.event_id,
                    event_type: d.kind,
                    state: d.state.as_str().to_owned(),
                    attempts: d.attempts,
                    last_http_status: d.last_status.unwrap_or(0),
                    last_error: d.last_error.unwrap_or_default(),
                    last_attempt_time: d.last_attempt_at.map(convert::timestamp),
                    // Only a pending delivery has a next attempt.
                    next_attempt_time: (d.state.as_str() == "pending")
                        .then(|| convert::timestamp(d.next_attempt_at)),
                })
                .collect(),
            next_page_token: page.next_page_token,
        }))
    }

    async fn redeliver_event(
        &self,
        request: Request<pb::RedeliverEventRequest>,
    ) -> Result<Response<pb::RedeliverEventResponse>, Status> {
        let (who, span) = admin_call(&request, "keywarden.admin.RedeliverEvent")?;
        let r = request.into_inner();
        traced(&span, self.manager.redeliver(&who, &r.endpoint_id, &r.event_id)).await?;
        Ok(Response::new(pb::RedeliverEventResponse {}))
    }

    async fn disable_key(
        &self,
        request: Request<pb::DisableKeyRequest>,
    ) -> Result<Response<pb::DisableKeyResponse>, Status> {
        let (who, span) = admin_call(&request, "keywarden.admin.DisableKey")?;
        let r = request.into_inner();
        let key = traced(&span, self.manager.disable(&who, &r.merchant_id, &r.key_id, &r.reason)).await?;
        Ok(Response::new(pb::DisableKeyResponse { api_key: Some(convert::api_key(key)) }))
    }

    async fn enable_key(
        &self,
        request: Request<pb::EnableKeyRequest>,
    ) -> Result<Response<pb::EnableKeyResponse>, Status> {
        let (who, span) = admin_call(&request, "keywarden.admin.EnableKey")?;
        let r = request.into_inner();
        let key = traced(&span, self.manager.enable(&who, &r.merchant_id, &r.key_id)).await?;
        Ok(Response::new(pb::EnableKeyResponse { api_key: Some(convert::api_key(key)) }))
    }

    async fn report_leaked_keys(
        &self,
        request: Request<pb::ReportLeakedKeysRequest>,
    ) -> Result<Response<pb::ReportLeakedKeysResponse>, Status> {
        let (who, span) = admin_call(&request, "keywarden.admin.ReportLeakedKeys")?;
        let reported = request.into_inner().keys.into_iter().map(|k| Reported {
            token: k.key,
            source: k.source,
            url: k.url,
        });
        let findings = traced(&span, self.leaks.report_by(&who, reported.collect())).await?;
        let results = findings
            .into_iter()
            .map(|f| {
                let (merchant_id, key_id) = f.key.unwrap_or_default();
                pb::LeakResult {
                    token_hash: f.token_hash,
                    label: match f.label {
                        Label::TruePositive => pb::LeakLabel::TruePositive,
                        Label::FalsePositive => pb::LeakLabel::FalsePositive,
                    }
                    .into(),
                    key_id,
                    merchant_id,
                }
            })
            .collect();
        Ok(Response::new(pb::ReportLeakedKeysResponse { results }))
    }
}
