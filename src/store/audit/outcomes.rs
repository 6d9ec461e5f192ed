//! Reported outcomes: the HTTP status a caller answered, written once onto
//! its allowed verification row (PostgreSQL's outcomes held for rows still
//! in another replica's queue are in `postgres.rs`).

use sea_orm::{
    ConnectionTrait,
    sea_query::{CaseStatement, Expr, ExprTrait, Query},
};

use super::{Store, StoreError, VERIFY_KIND};
use crate::{keys::Decision, store::entity::audit_event};

/// Outcomes per UPDATE: three bound values each, well inside both
/// backends' parameter limits.
const OUTCOME_CHUNK: usize = 1000;

/// What a reported status found in the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutcomeWrite {
    /// Written on its allowed verification row.
    Written,
    /// The row has a status already, which it keeps.
    AlreadySet,
    /// No allowed verification row with this id (yet).
    NoRow,
}

impl Store {
    /// Sets the reported status of allowed verification rows that have
    /// none yet, one statement per 1000 outcomes (an `UPDATE … CASE …
    /// WHERE status IS NULL RETURNING id`); says for each outcome what it
    /// found. A status is written once: when an id comes twice, its first
    /// status wins, and a row with a status keeps it (one more read, only
    /// for the outcomes that wrote nothing, tells those apart).
    pub async fn set_outcomes(&self, outcomes: &[(String, u16)]) -> Result<Vec<OutcomeWrite>, StoreError> {
        use audit_event::Column as C;
        let mut updated = std::collections::HashSet::new();
        let mut unwritten = Vec::new();
        for chunk in outcomes.chunks(OUTCOME_CHUNK) {
            let mut first: std::collections::HashMap<&str, u16> = std::collections::HashMap::new();
            for (id, status) in chunk {
                first.entry(id.as_str()).or_insert(*status);
            }
            let mut by_id = CaseStatement::new();
            for (id, status) in &first {
                by_id = by_id.case(Expr::col(C::Id).eq(*id), Expr::value(i32::from(*status)));
            }
            let statement = Query::update()
                .table(audit_event::Entity)
                .value(C::Status, by_id.finally(Expr::col(C::Status)))
                .and_where(Expr::col(C::Id).is_in(first.keys().copied()))
                .and_where(Expr::col(C::Kind).eq(VERIFY_KIND))
                .and_where(Expr::col(C::Decision).eq(Decision::Allow.as_str()))
                .and_where(Expr::col(C::Status).is_null())
                .returning_col(C::Id)
                .to_owned();
            self.count(1);
            for row in self.db().query_all(&statement).await? {
                updated.insert(row.try_get::<String>("", "id")?);
            }
            unwritten.extend(first.keys().filter(|id| !updated.contains(**id)).map(|id| (*id).to_owned()));
        }
        let mut already = std::collections::HashSet::new();
        for chunk in unwritten.chunks(OUTCOME_CHUNK) {
            let statement = Query::select()
                .column(C::Id)
                .from(audit_event::Entity)
                .and_where(Expr::col(C::Id).is_in(chunk.iter().map(String::as_str)))
                .and_where(Expr::col(C::Kind).eq(VERIFY_KIND))
                .and_where(Expr::col(C::Decision).eq(Decision::Allow.as_str()))
                .to_owned();
            self.count_read();
            for row in self.db().query_all(&statement).await? {
                already.insert(row.try_get::<String>("", "id")?);
            }
        }
        Ok(outcomes
            .iter()
            .map(|(id, _)| {
                if updated.contains(id) {
                    OutcomeWrite::Written
                } else if already.contains(id) {
                    OutcomeWrite::AlreadySet
                } else {
                    OutcomeWrite::NoRow
                }
            })
            .collect())
    }
}
