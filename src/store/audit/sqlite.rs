//! SQLite's bulk path: the writer's batch bound value by value into
//! multi-row VALUES inserts, in index order. On the embedded backend the
//! writer shares the service's cores, so what a row costs here is Verify's.

use std::sync::{Arc, LazyLock};

use chrono::{DateTime, Utc};
use sea_orm::sqlx::{
    self, Arguments,
    query::Query as SqlxQuery,
    sqlite::{Sqlite, SqliteArguments},
};

use super::{AuditRow, COLUMN_COUNT, Cell, RowKey, column_list};
use crate::store::{Store, StoreError, sqlx_error};

/// Rows per INSERT: 16 parameters each, under SQLite's 32766. Full chunks
/// reuse one prepared statement; a batch's last, shorter chunk is prepared
/// for that batch only.
const CHUNK: usize = 512;

impl Store {
    /// Writes the batch in [`CHUNK`]-row inserts, in one transaction when it
    /// takes more than one.
    pub(super) async fn insert_audit_sqlite<R: AuditRow>(&self, rows: &[R]) -> Result<(), StoreError> {
        let rows = in_index_order(rows);
        let pool = self.db().get_sqlite_connection_pool();
        self.count(1);
        if rows.len() <= CHUNK {
            return insert(&rows)?.execute(pool).await.map(drop).map_err(sqlx_error);
        }
        let mut tx = pool.begin().await.map_err(sqlx_error)?;
        for chunk in rows.chunks(CHUNK) {
            self.count(1);
            insert(chunk)?.execute(&mut *tx).await.map_err(sqlx_error)?;
        }
        self.count(1);
        tx.commit().await.map_err(sqlx_error)
    }
}

/// The INSERT of `rows.len()` rows with `rows` bound. Each text value goes
/// in as one `Arc<str>` (a bound `&str` is copied into a `String` and then
/// wrapped in an `Arc`), and the argument list is sized once.
fn insert<R: AuditRow>(rows: &[&R]) -> Result<SqlxQuery<'static, Sqlite, SqliteArguments>, StoreError> {
    static FULL: LazyLock<String> = LazyLock::new(|| statement(CHUNK));
    let mut args = SqliteArguments::default();
    args.reserve(rows.len() * COLUMN_COUNT, 0);
    for row in rows {
        for (_, cell) in row.cells() {
            match cell {
                Cell::Text(v) => args.add(v.map(Arc::<str>::from)),
                Cell::Ip(v) => args.add(v.map(|ip| Arc::<str>::from(ip.to_string()))),
                Cell::Time(t) => args.add(rfc3339_auto_si(t)),
                Cell::Int(v) => args.add(v),
            }
            .map_err(|e| sqlx_error(sqlx::Error::Encode(e)))?;
        }
    }
    Ok(if rows.len() == CHUNK {
        sqlx::query_with(FULL.as_str(), args)
    } else {
        sqlx::query_with(sqlx::AssertSqlSafe(statement(rows.len())), args).persistent(false)
    })
}

fn statement(rows: usize) -> String {
    let row = format!("({})", ["?"; COLUMN_COUNT].join(", "));
    let values = vec![row.as_str(); rows].join(", ");
    format!(
        "INSERT INTO audit_events {} VALUES {values} \
         ON CONFLICT (id) DO UPDATE SET status = COALESCE(excluded.status, audit_events.status)",
        column_list()
    )
}

/// `t.to_rfc3339_opts(SecondsFormat::AutoSi, false)`: the text sqlx binds
/// for a timestamp on SQLite, which compares timestamps as text, so the
/// form must be exactly the same (see the test
/// `batched_rows_match_bound_timestamps_exactly_on_sqlite`). Written out
/// digit by digit because chrono's general formatter is a large share of
/// binding a row; instants it would print differently (leap seconds, years
/// outside 0–9999) go to chrono.
fn rfc3339_auto_si(t: DateTime<Utc>) -> String {
    use chrono::{Datelike, Timelike};
    let nanos = t.nanosecond();
    if !(0..=9999).contains(&t.year()) || nanos >= 1_000_000_000 {
        return t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, false);
    }
    fn push(s: &mut String, n: u32, width: u32) {
        for place in (0..width).rev() {
            s.push(char::from(b'0' + (n / 10u32.pow(place) % 10) as u8));
        }
    }
    let mut s = String::with_capacity(35);
    push(&mut s, t.year().unsigned_abs(), 4);
    s.push('-');
    push(&mut s, t.month(), 2);
    s.push('-');
    push(&mut s, t.day(), 2);
    s.push('T');
    push(&mut s, t.hour(), 2);
    s.push(':');
    push(&mut s, t.minute(), 2);
    s.push(':');
    push(&mut s, t.second(), 2);
    let (fraction, digits) = match nanos {
        0 => (0, 0),
        n if n % 1_000_000 == 0 => (n / 1_000_000, 3),
        n if n % 1_000 == 0 => (n / 1_000, 6),
        n => (n, 9),
    };
    if digits > 0 {
        s.push('.');
        push(&mut s, fraction, digits);
    }
    s.push_str("+00:00");
    s
}

/// The batch in the order of the per-merchant and per-key indexes
/// (merchant, key, time, id), so that the insert walks each index once
/// instead of moving to another leaf page for every row of another key.
/// Nothing reads the order in which a batch's rows were written: listings
/// order by (timestamp, id).
fn in_index_order<R: AuditRow>(rows: &[R]) -> Vec<&R> {
    let mut sorted: Vec<(RowKey<'_>, &R)> = rows.iter().map(|r| (RowKey::of(r), r)).collect();
    sorted.sort_unstable_by_key(|&(key, _)| key);
    sorted.into_iter().map(|(_, r)| r).collect()
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Timelike};

    use super::*;
    use crate::store::audit::tests::TestRow;

    fn key_row(id: &str, merchant: Option<&str>, key: Option<&str>, at: DateTime<Utc>) -> TestRow {
        TestRow { id: id.into(), merchant: merchant.map(Into::into), key: key.map(Into::into), at }
    }

    #[test]
    fn a_batch_is_written_grouped_by_merchant_and_key_in_time_order() {
        let t = |s| Utc.with_ymd_and_hms(2026, 11, 28, 12, 0, s).unwrap();
        let rows = [
            key_row("6", Some("m2"), Some("k1"), t(1)),
            key_row("1", Some("m1"), Some("k2"), t(2)),
            key_row("4", Some("m1"), Some("k9"), t(0)),
            key_row("2", Some("m1"), Some("k2"), t(3)),
            key_row("0", None, None, t(5)),
            key_row("5", Some("m1"), Some("k9"), t(4)),
            key_row("3", Some("m1"), Some("k2"), t(3)),
        ];
        let order: Vec<&str> = in_index_order(&rows).iter().map(|r| r.id.as_str()).collect();
        assert_eq!(order, ["0", "1", "2", "3", "4", "5", "6"]);
    }

    proptest::proptest! {
        /// Every instant, and especially the whole seconds, milliseconds and
        /// microseconds where AutoSi shortens the fraction.
        #[test]
        fn timestamps_are_written_exactly_as_chrono_writes_them(
            secs in -62_167_219_200_i64..253_402_300_800,
            nanos in 0u32..1_000_000_000,
            shorten in 0u32..4,
        ) {
            let nanos = match shorten {
                0 => 0,
                1 => nanos / 1_000_000 * 1_000_000,
                2 => nanos / 1_000 * 1_000,
                _ => nanos,
            };
            let t = DateTime::from_timestamp(secs, nanos).unwrap();
            proptest::prop_assert_eq!(
                rfc3339_auto_si(t),
                t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, false)
            );
        }
    }

    #[test]
    fn timestamps_chrono_writes_its_own_way_are_left_to_chrono() {
        for t in [DateTime::<Utc>::MIN_UTC, DateTime::<Utc>::MAX_UTC] {
            assert_eq!(rfc3339_auto_si(t), t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, false));
        }
        let leap = Utc.with_ymd_and_hms(2016, 12, 31, 23, 59, 59).unwrap()
            + chrono::Duration::nanoseconds(999_999_999);
        let leap = leap.with_nanosecond(1_500_000_000).unwrap();
        assert_eq!(rfc3339_auto_si(leap), leap.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, false));
    }
}
