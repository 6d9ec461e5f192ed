//! Operator tokens: create (plaintext shown once), list, revoke. ADMIN only;
//! the caller's [`Principal`] has been authorized by [`Access`] already.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{
    ServiceError,
    access::{Access, Principal},
    page::{self, Page},
    validate::{self, Violations},
};
use crate::{
    audit::{AuditKind, AuditRecord},
    clock,
    keys::operator::{AdminAction, OperatorRole, OperatorSecret, OperatorToken},
    store::{Store, keys::InsertError},
    telemetry::current_trace_id,
};

/// Most merchants one token may be limited to.
pub const MAX_TOKEN_MERCHANTS: usize = 100;
const INSERT_ATTEMPTS: usize = 3;

#[derive(Debug)]
pub struct NewOperator {
    pub name: String,
    /// `None`: the request left it unspecified.
    pub role: Option<OperatorRole>,
    pub merchant_ids: Vec<String>,
    pub expires_at: Option<DateTime<Utc>>,
}

#[derive(Debug)]
pub struct IssuedOperator {
    pub token: OperatorToken,
    pub plaintext: OperatorSecret,
}

#[derive(Debug)]
pub struct OperatorTokens {
    store: Store,
    access: Arc<Access>,
}

impl OperatorTokens {
    pub fn new(store: Store, access: Arc<Access>) -> Self {
        Self { store, access }
    }

    pub async fn create(&self, who: &Principal, req: NewOperator) -> Result<IssuedOperator, ServiceError> {
        self.access.authorize(who, AdminAction::CreateOperatorToken, None)?;
        let now = self.access.now();
        let mut v = Violations::default();
        v.check("name", validate::text(&req.name, validate::MAX_NAME, true));
        match req.role {
            None => v.add(
                "role",
                "is required: OPERATOR_ROLE_ADMIN, OPERATOR_ROLE_KEY_MANAGER, OPERATOR_ROLE_AUDITOR or \
                 OPERATOR_ROLE_LEAK_REPORTER",
            ),
            Some(role) if role.spans_merchants() && !req.merchant_ids.is_empty() => {
                v.add(
                    "merchant_ids",
                    format!(
                        "must be empty for OPERATOR_ROLE_{} (it acts on every merchant's keys)",
                        role.as_str()
                    ),
                );
            }
            Some(_) => {}
        }
        if req.merchant_ids.len() > MAX_TOKEN_MERCHANTS {
            v.add("merchant_ids", format!("at most {MAX_TOKEN_MERCHANTS}"));
        } else {
            for (i, m) in req.merchant_ids.iter().enumerate() {
                v.check(&format!("merchant_ids[{i}]"), validate::merchant_id(m));
            }
        }
        if req.expires_at.is_some_and(|at| at <= now) {
            v.add("expires_at", "must be in the future");
        }
        v.into_result()?;
        let Some(role) = req.role else {
            return Err(ServiceError::Internal("validation passed without a role".into()));
        };
        let mut merchant_ids = req.merchant_ids;
        merchant_ids.sort();
        merchant_ids.dedup();
        for _ in 0..INSERT_ATTEMPTS {
            let plaintext = OperatorSecret::generate()?;
            let id = Uuid::now_v7().to_string();
            let (pepper, digest) = self.access.digester().digest(&plaintext);
            let token = OperatorToken {
                id: id.clone(),
                name: req.name.clone(),
                role,
                merchant_ids: merchant_ids.clone(),
                prefix: plaintext.lookup_prefix(),
                digest: digest.to_vec(),
                pepper,
                created_by: who.actor.clone(),
                created_at: now,
                expires_at: req.expires_at.map(clock::stored),
                revoked_at: None,
            };
            let mut audit = AuditRecord::new(AuditKind::OperatorTokenCreated, now, current_trace_id());
            audit.actor = Some(who.actor.clone());
            audit.key_prefix = Some(token.prefix.clone());
            audit.detail = Some(format!(
                "operator token {id} {:?}: role {}; merchants: {}; expires_at: {}",
                token.name,
                role.as_str(),
                if merchant_ids.is_empty() { "all".to_owned() } else { merchant_ids.join(",") },
                token.expires_at.map_or_else(|| "never".to_owned(), |e| e.to_rfc3339()),
            ));
            match self.store.insert_operator(token, audit).await {
                Ok(token) => {
                    tracing::info!(actor = %who.actor, token_id = %token.id, role = role.as_str(), prefix = %token.prefix, "operator token created");
                    return Ok(IssuedOperator { token, plaintext });
                }
                Err(InsertError::PrefixTaken) => continue,
                Err(InsertError::Store(e)) => return Err(e.into()),
            }
        }
        Err(ServiceError::Internal("could not find a free lookup prefix".into()))
    }

    pub async fn list(
        &self,
        who: &Principal,
        page_size: i32,
        page_token: &str,
    ) -> Result<Page<OperatorToken>, ServiceError> {
        self.access.authorize(who, AdminAction::ListOperatorTokens, None)?;
        page::keyset(
            page_size,
            page_token,
            |after, limit| self.store.list_operators(after, limit),
            |t: &OperatorToken| (t.created_at, &t.id),
        )
        .await
    }

    pub async fn revoke(&self, who: &Principal, id: &str) -> Result<OperatorToken, ServiceError> {
        self.access.authorize(who, AdminAction::RevokeOperatorToken, None)?;
        let mut v = Violations::default();
        v.check("id", validate::key_id(id));
        v.into_result()?;
        let now = self.access.now();
        let mut audit = AuditRecord::new(AuditKind::OperatorTokenRevoked, now, current_trace_id());
        audit.actor = Some(who.actor.clone());
        audit.detail = Some(format!("operator token {id}"));
        let token = self
            .store
            .revoke_operator(id, now, audit)
            .await?
            .ok_or(ServiceError::NotFound("operator token"))?;
        tracing::info!(actor = %who.actor, token_id = %id, "operator token revoked");
        Ok(token)
    }
}
