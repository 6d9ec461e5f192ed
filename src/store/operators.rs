//! Queries on `operator_tokens`. A token and the audit row of its creation
//! or revocation are written in one transaction.

use chrono::{DateTime, Utc};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect, SqlErr,
    TransactionTrait, sea_query::Expr,
};

use super::{
    Store, StoreError,
    audit::{AuditRow, insert_audit_rows},
    entity::operator_token,
    keys::InsertError,
};
use crate::keys::{
    PepperId,
    operator::{OperatorRole, OperatorToken},
};

/// The token a stored row holds.
fn from_model(m: operator_token::Model) -> Result<OperatorToken, StoreError> {
    let corrupt = |what: &'static str, detail: String| StoreError::Corrupt { id: m.id.clone(), what, detail };
    let role =
        OperatorRole::parse(&m.role).ok_or_else(|| corrupt("operator role", format!("{:?}", m.role)))?;
    let digest = decode_hex(&m.digest).ok_or_else(|| corrupt("operator digest", "not hex".into()))?;
    let pepper =
        PepperId::parse(&m.pepper).map_err(|e| corrupt("operator digest's pepper", e.to_string()))?;
    Ok(OperatorToken {
        role,
        digest,
        pepper,
        merchant_ids: m.merchant_ids.split_whitespace().map(str::to_owned).collect(),
        id: m.id,
        name: m.name,
        prefix: m.prefix,
        created_by: m.created_by,
        created_at: m.created_at,
        expires_at: m.expires_at,
        revoked_at: m.revoked_at,
    })
}

fn into_active(t: OperatorToken) -> operator_token::ActiveModel {
    operator_token::ActiveModel {
        id: Set(t.id),
        name: Set(t.name),
        role: Set(t.role.as_str().to_owned()),
        merchant_ids: Set(t.merchant_ids.join(" ")),
        prefix: Set(t.prefix),
        digest: Set(encode_hex(&t.digest)),
        pepper: Set(t.pepper.to_string()),
        created_by: Set(t.created_by),
        created_at: Set(t.created_at),
        expires_at: Set(t.expires_at),
        revoked_at: Set(None),
    }
}

pub(super) fn encode_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

impl Store {
    /// Inserts a token and its OPERATOR_TOKEN_CREATED row together.
    pub async fn insert_operator(
        &self,
        token: OperatorToken,
        audit: impl AuditRow,
    ) -> Result<OperatorToken, InsertError> {
        let txn = self.db().begin().await.map_err(StoreError::from)?;
        self.count(4);
        match operator_token::Entity::insert(into_active(token.clone())).exec_without_returning(&txn).await {
            Err(e) if matches!(e.sql_err(), Some(SqlErr::UniqueConstraintViolation(_))) => {
                return Err(InsertError::PrefixTaken);
            }
            other => other.map_err(StoreError::from)?,
        };
        insert_audit_rows(&txn, &[audit]).await?;
        txn.commit().await.map_err(StoreError::from)?;
        Ok(token)
    }

    /// The token with this lookup prefix, for authentication.
    pub async fn find_operator_by_prefix(&self, prefix: &str) -> Result<Option<OperatorToken>, StoreError> {
        self.count_read();
        operator_token::Entity::find()
            .filter(operator_token::Column::Prefix.eq(prefix))
            .one(self.db())
            .await?
            .map(from_model)
            .transpose()
    }

    /// Newest first, `limit` tokens after `after`, revoked ones included.
    pub async fn list_operators(
        &self,
        after: Option<super::Cursor>,
        limit: u64,
    ) -> Result<Vec<OperatorToken>, StoreError> {
        use operator_token::Column as C;
        let mut query = operator_token::Entity::find();
        if let Some(cursor) = after {
            query = query.filter(cursor.after(C::CreatedAt, C::Id));
        }
        self.count_read();
        query
            .order_by_desc(C::CreatedAt)
            .order_by_desc(C::Id)
            .limit(limit)
            .all(self.db())
            .await?
            .into_iter()
            .map(from_model)
            .collect()
    }

    /// Revokes a token now, with its audit row; revoking a revoked token
    /// changes nothing and writes no row. `None`: no such token.
    pub async fn revoke_operator(
        &self,
        id: &str,
        now: DateTime<Utc>,
        audit: impl AuditRow,
    ) -> Result<Option<OperatorToken>, StoreError> {
        use operator_token::Column as C;
        let txn = self.db().begin().await?;
        self.count(4);
        let updated = operator_token::Entity::update_many()
            .col_expr(C::RevokedAt, Expr::value(Some(now)))
            .filter(C::Id.eq(id))
            .filter(C::RevokedAt.is_null())
            .exec(&txn)
            .await?
            .rows_affected;
        if updated == 1 {
            insert_audit_rows(&txn, &[audit]).await?;
        }
        let row = operator_token::Entity::find_by_id(id).one(&txn).await?;
        txn.commit().await?;
        row.map(from_model).transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_round_trip_through_hex() {
        let bytes: Vec<u8> = (0..=255).collect();
        assert_eq!(decode_hex(&encode_hex(&bytes)).unwrap(), bytes);
        assert_eq!(decode_hex("abc"), None);
        assert_eq!(decode_hex("zz"), None);
    }
}
