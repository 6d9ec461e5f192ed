//! PostgreSQL's binary `COPY` format, for the audit writer's batches.
//! Binary rather than text or CSV so that no value ever needs escaping.
//!
//! Layout (PostgreSQL docs, "COPY — Binary Format"): a signature, flags and
//! header-extension length; per row a field count, then per field its byte
//! length (-1 for NULL) and the value in the type's send format; a -1 field
//! count as trailer.

use chrono::{DateTime, TimeDelta, Utc};

const SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";

/// Why a value has no binary COPY encoding.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EncodeError {
    /// Cannot happen within chrono's range (±262,000 years is ~8.3e18 µs),
    /// but the conversion is fallible and a request path must not panic.
    #[error("timestamp {0} is outside PostgreSQL's range")]
    TimestampOutOfRange(DateTime<Utc>),
    #[error("a {0}-byte value does not fit a COPY field")]
    TooLong(usize),
}

/// Builds one COPY data stream.
pub struct CopyWriter {
    buf: Vec<u8>,
}

impl CopyWriter {
    pub fn with_capacity(bytes: usize) -> Self {
        let mut buf = Vec::with_capacity(bytes + SIGNATURE.len() + 10);
        buf.extend_from_slice(SIGNATURE);
        buf.extend_from_slice(&0i32.to_be_bytes()); // flags: no OIDs
        buf.extend_from_slice(&0i32.to_be_bytes()); // no header extension
        Self { buf }
    }

    /// Starts a row of `fields` values; exactly that many must follow.
    pub fn row(&mut self, fields: i16) -> &mut Self {
        self.buf.extend_from_slice(&fields.to_be_bytes());
        self
    }

    /// A `text`/`varchar` value: its UTF-8 bytes (sqlx sets the client
    /// encoding to UTF-8, and the server converts from it).
    pub fn text(&mut self, value: Option<&str>) -> Result<&mut Self, EncodeError> {
        match value {
            None => self.null(),
            Some(s) => {
                let len = i32::try_from(s.len()).map_err(|_| EncodeError::TooLong(s.len()))?;
                self.buf.extend_from_slice(&len.to_be_bytes());
                self.buf.extend_from_slice(s.as_bytes());
            }
        }
        Ok(self)
    }

    pub fn int4(&mut self, value: Option<i32>) -> &mut Self {
        match value {
            None => self.null(),
            Some(v) => {
                self.buf.extend_from_slice(&4i32.to_be_bytes());
                self.buf.extend_from_slice(&v.to_be_bytes());
            }
        }
        self
    }

    /// A `timestamptz`: microseconds since 2000-01-01 UTC, truncated the way
    /// sqlx truncates a bound `DateTime`, so both insert paths store the
    /// same instant.
    pub fn timestamptz(&mut self, value: DateTime<Utc>) -> Result<&mut Self, EncodeError> {
        let micros =
            (value - postgres_epoch()).num_microseconds().ok_or(EncodeError::TimestampOutOfRange(value))?;
        self.buf.extend_from_slice(&8i32.to_be_bytes());
        self.buf.extend_from_slice(&micros.to_be_bytes());
        Ok(self)
    }

    fn null(&mut self) {
        self.buf.extend_from_slice(&(-1i32).to_be_bytes());
    }

    /// The stream with its trailer.
    pub fn finish(mut self) -> Vec<u8> {
        self.buf.extend_from_slice(&(-1i16).to_be_bytes());
        self.buf
    }
}

/// 2000-01-01T00:00:00Z, PostgreSQL's zero for timestamps.
fn postgres_epoch() -> DateTime<Utc> {
    DateTime::UNIX_EPOCH + TimeDelta::seconds(946_684_800)
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    #[test]
    fn an_empty_stream_is_header_and_trailer() {
        let bytes = CopyWriter::with_capacity(0).finish();
        assert_eq!(&bytes[..11], SIGNATURE);
        assert_eq!(&bytes[11..19], &[0; 8]);
        assert_eq!(&bytes[19..], &[0xff, 0xff]);
    }

    #[test]
    fn a_row_encodes_each_field_with_its_length_and_nulls_as_minus_one() {
        let mut w = CopyWriter::with_capacity(0);
        w.row(3).text(Some("ab")).unwrap().int4(None).int4(Some(403));
        let bytes = w.finish();
        let row = &bytes[19..bytes.len() - 2];
        assert_eq!(
            row,
            &[
                0, 3, // three fields
                0, 0, 0, 2, b'a', b'b', // "ab"
                0xff, 0xff, 0xff, 0xff, // NULL
                0, 0, 0, 4, 0, 0, 0x01, 0x93, // 403
            ]
        );
    }

    #[test]
    fn timestamps_count_microseconds_from_2000_and_drop_nanoseconds() {
        let at = Utc.with_ymd_and_hms(2000, 1, 1, 0, 0, 1).unwrap() + chrono::Duration::nanoseconds(2_999);
        let mut w = CopyWriter::with_capacity(0);
        w.row(1).timestamptz(at).unwrap();
        let bytes = w.finish();
        let field = &bytes[21..bytes.len() - 2];
        assert_eq!(field[..4], 8i32.to_be_bytes());
        assert_eq!(field[4..], 1_000_002i64.to_be_bytes());
    }
}
