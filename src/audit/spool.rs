//! The audit spool: where the writer puts rows while the database is slow
//! or unreachable, instead of letting the queue fill and Verify block.
//!
//! An append-only local directory of segment files (`seg-<n>.jsonl`, one
//! JSON row per line), bounded by a size setting. Rows are replayed in
//! order, a chunk at a time, once the database answers; the byte offset
//! replayed so far is kept in `replay.offset` (written by rename), so a
//! restart resumes where the last committed chunk ended, and a chunk
//! replayed twice is harmless (rows are upserted on their id). A segment
//! fully replayed is deleted.
//!
//! Appends are plain `write`s: they survive the process being killed
//! (the kernel has them); a machine crash may lose what the kernel had not
//! written back, and leaves at most a torn last line, which replay skips.
//! File I/O runs on the writer task itself: an append of one batch is one
//! `write` to the page cache.

use std::{
    collections::VecDeque,
    fs,
    io::{self, Read as _, Seek as _, Write as _},
    path::{Path, PathBuf},
    sync::{Mutex, PoisonError},
};

use chrono::{DateTime, Utc};

use super::AuditRecord;

/// A segment is closed for appends past this size.
const SEGMENT_BYTES: u64 = 16 * 1024 * 1024;
const OFFSET_FILE: &str = "replay.offset";

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("the audit spool is full ({0} bytes)")]
    Full(u64),
    #[error("audit spool: {0}")]
    Io(#[from] io::Error),
}

#[derive(Debug)]
struct Segment {
    seq: u64,
    bytes: u64,
    /// Takes no more appends: a torn last line (a crash mid-write) stays
    /// the last thing in it.
    sealed: bool,
}

#[derive(Debug)]
struct State {
    /// Oldest first; the last one takes appends.
    segments: VecDeque<Segment>,
    /// Bytes of the oldest segment already replayed.
    offset: u64,
    /// Rows spooled and not yet replayed.
    rows: u64,
    /// The oldest unreplayed row's timestamp, when known.
    oldest: Option<DateTime<Utc>>,
    replayed: u64,
    /// Lines skipped for being unreadable since start.
    unreadable: u64,
}

/// Rows read for replay, and where the oldest segment's replay then ends.
#[derive(Debug)]
pub struct Chunk {
    pub rows: Vec<AuditRecord>,
    /// Lines that could not be read back (torn or damaged); skipped.
    pub unreadable: u64,
    seq: u64,
    end: u64,
    lines: u64,
}

#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    state: Mutex<State>,
    /// Held open with an exclusive lock for the spool's life: a second
    /// process on the same directory would replay, delete and append to
    /// segments under this one.
    _lock: fs::File,
}

/// The file whose lock says which process owns the directory (the usage
/// spill beside the segments included).
const LOCK_FILE: &str = "lock";

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("seg-{seq:020}.jsonl"))
}

impl Spool {
    /// Opens (creating) the spool in `dir`, with what a previous process
    /// left there still to replay.
    pub fn open(dir: &Path, max_bytes: u64) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
        }
        let lock = Self::take_lock(dir)?;
        let mut seqs: Vec<u64> = fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_prefix("seg-")?.strip_suffix(".jsonl")?.parse().ok()
            })
            .collect();
        seqs.sort_unstable();
        let mut segments = VecDeque::new();
        let mut rows = 0;
        let offset =
            fs::read_to_string(dir.join(OFFSET_FILE)).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0);
        for (i, seq) in seqs.into_iter().enumerate() {
            let data = fs::read(segment_path(dir, seq))?;
            let from = if i == 0 { usize::try_from(offset).unwrap_or(usize::MAX).min(data.len()) } else { 0 };
            rows += data[from..].iter().filter(|b| **b == b'\n').count() as u64;
            // Appends go to a new segment: whatever this process left,
            // torn or not, stays as it was written.
            segments.push_back(Segment { seq, bytes: data.len() as u64, sealed: true });
        }
        let offset = if segments.is_empty() { 0 } else { offset };
        let spool = Self {
            dir: dir.to_owned(),
            max_bytes,
            state: Mutex::new(State { segments, offset, rows, oldest: None, replayed: 0, unreadable: 0 }),
            _lock: lock,
        };
        if rows > 0 {
            tracing::warn!(rows, dir = %dir.display(), "audit rows left in the spool by a previous run; replaying them");
        }
        Ok(spool)
    }

    /// Locks `dir` for this process; refuses when another holds it. The
    /// kernel drops the lock when the process dies, however it dies.
    fn take_lock(dir: &Path) -> io::Result<fs::File> {
        let mut options = fs::OpenOptions::new();
        options.create(true).truncate(false).write(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let file = options.open(dir.join(LOCK_FILE))?;
        match file.try_lock() {
            Ok(()) => Ok(file),
            Err(fs::TryLockError::WouldBlock) => Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                format!(
                    "another process holds the spool in {}: every replica needs a data directory of its own",
                    dir.display()
                ),
            )),
            Err(fs::TryLockError::Error(e)) => Err(e),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends `rows` in order, or refuses them all when they do not fit.
    pub fn append(&self, rows: &[AuditRecord]) -> Result<(), SpoolError> {
        let mut buf = Vec::with_capacity(rows.len() * 256);
        for row in rows {
            buf.extend_from_slice(row.to_json().as_bytes());
            buf.push(b'\n');
        }
        let mut state = self.lock();
        let total: u64 = state.segments.iter().map(|s| s.bytes).sum::<u64>() - state.offset;
        if total + buf.len() as u64 > self.max_bytes {
            return Err(SpoolError::Full(self.max_bytes));
        }
        let seq = match state.segments.back() {
            Some(last) if !last.sealed && last.bytes < SEGMENT_BYTES => last.seq,
            Some(last) => last.seq + 1,
            None => 0,
        };
        if state.segments.back().is_none_or(|last| last.seq != seq) {
            state.segments.push_back(Segment { seq, bytes: 0, sealed: false });
        }
        let mut file = fs::OpenOptions::new().create(true).append(true).open(segment_path(&self.dir, seq))?;
        file.write_all(&buf)?;
        if let Some(last) = state.segments.back_mut() {
            last.bytes += buf.len() as u64;
        }
        if state.rows == 0 {
            state.oldest = rows.first().map(|r| r.timestamp);
        }
        state.rows += rows.len() as u64;
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.lock().rows == 0
    }

    /// Reads up to `max_rows` rows from where replay stands.
    pub fn read_chunk(&self, max_rows: usize) -> io::Result<Option<Chunk>> {
        let (seq, offset, newest) = {
            let state = self.lock();
            let Some(first) = state.segments.front() else { return Ok(None) };
            (first.seq, state.offset, !first.sealed && state.segments.len() == 1)
        };
        let mut file = fs::File::open(segment_path(&self.dir, seq))?;
        file.seek(io::SeekFrom::Start(offset))?;
        // Enough for `max_rows` ordinary rows; more only if not even one
        // line fits.
        let mut data = Vec::new();
        let mut window = (max_rows.max(1) as u64) * 1024;
        let eof = loop {
            let read = (&mut file).take(window).read_to_end(&mut data)? as u64;
            if read < window {
                break true;
            }
            if data.contains(&b'\n') {
                break false;
            }
            window *= 2;
        };
        let mut rows = Vec::new();
        let (mut end, mut lines, mut unreadable) = (offset, 0, 0);
        for line in data.split_inclusive(|b| *b == b'\n') {
            if rows.len() >= max_rows {
                break;
            }
            if line.last() != Some(&b'\n') {
                // Cut by the read window: the rest comes next time. A torn
                // tail (a crash mid-write) of a sealed segment is skipped.
                if eof && !newest {
                    unreadable += 1;
                    end += line.len() as u64;
                }
                break;
            }
            end += line.len() as u64;
            lines += 1;
            match AuditRecord::from_json(line) {
                Some(row) => rows.push(row),
                None => unreadable += 1,
            }
        }
        let mut state = self.lock();
        if state.oldest.is_none() {
            state.oldest = rows.first().map(|r| r.timestamp);
        }
        Ok(Some(Chunk { rows, unreadable, seq, end, lines }))
    }

    /// Records `chunk` as replayed: the offset moves past it, and a segment
    /// replayed to its end (and closed) is deleted.
    pub fn commit(&self, chunk: &Chunk) -> io::Result<()> {
        let mut state = self.lock();
        if state.segments.front().map(|s| s.seq) != Some(chunk.seq) {
            return Ok(());
        }
        state.offset = chunk.end;
        state.rows = state.rows.saturating_sub(chunk.lines);
        state.replayed += chunk.rows.len() as u64;
        state.unreadable += chunk.unreadable;
        state.oldest = None;
        let done = state.segments.front().is_some_and(|s| s.bytes <= chunk.end);
        if done {
            // The open segment goes too once nothing is left in it: the
            // next append starts a new one.
            let closed = state.segments.len() > 1 || state.rows == 0;
            if closed {
                state.segments.pop_front();
                state.offset = 0;
                fs::remove_file(segment_path(&self.dir, chunk.seq))?;
            }
        }
        let tmp = self.dir.join(format!("{OFFSET_FILE}.tmp"));
        fs::write(&tmp, state.offset.to_string())?;
        fs::rename(&tmp, self.dir.join(OFFSET_FILE))?;
        Ok(())
    }

    /// Bytes on disk not yet replayed.
    pub fn bytes(&self) -> u64 {
        let state = self.lock();
        state.segments.iter().map(|s| s.bytes).sum::<u64>() - state.offset
    }

    /// Rows spooled and not yet replayed.
    pub fn rows(&self) -> u64 {
        self.lock().rows
    }

    /// Rows replayed into the database since start.
    pub fn replayed(&self) -> u64 {
        self.lock().replayed
    }

    /// Lines that could not be read back (a torn line after a machine
    /// crash), skipped, since start.
    pub fn unreadable(&self) -> u64 {
        self.lock().unreadable
    }

    /// Age of the oldest row waiting, from its timestamp (rows left by a
    /// previous process are aged from the first replay read on).
    pub fn oldest_age(&self, now: DateTime<Utc>) -> f64 {
        let state = self.lock();
        match (state.rows, state.oldest) {
            (0, _) | (_, None) => 0.0,
            (_, Some(t)) => (now - t).num_milliseconds().max(0) as f64 / 1000.0,
        }
    }
}

#[cfg(test)]
mod tests {
    // Tests read the real clock to build their inputs.
    #![allow(clippy::disallowed_methods)]

    use super::*;
    use crate::{
        audit::AuditKind,
        keys::{Decision, DenyReason},
    };

    fn row(i: u32) -> AuditRecord {
        let mut r = AuditRecord::new(AuditKind::Verify, crate::clock::now(), Some(format!("trace{i}")));
        r.endpoint = Some(format!("/e\u{0}{i}"));
        r.decision = Some(Decision::Deny);
        r.deny_reason = Some(DenyReason::Revoked);
        r.status = Some(401);
        r
    }

    #[test]
    fn rows_come_back_in_order_across_restarts_and_replayed_segments_go() {
        let dir = tempfile::tempdir().unwrap();
        let rows: Vec<AuditRecord> = (0..10).map(row).collect();
        {
            let spool = Spool::open(dir.path(), 1 << 20).unwrap();
            spool.append(&rows[..6]).unwrap();
            spool.append(&rows[6..]).unwrap();
            let chunk = spool.read_chunk(4).unwrap().unwrap();
            assert_eq!(chunk.rows, rows[..4]);
            spool.commit(&chunk).unwrap();
            assert_eq!(spool.rows(), 6);
        }
        // A new process resumes after the committed chunk.
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(spool.rows(), 6);
        let chunk = spool.read_chunk(100).unwrap().unwrap();
        assert_eq!(chunk.rows, rows[4..]);
        spool.commit(&chunk).unwrap();
        assert!(spool.is_empty());
        assert_eq!(spool.bytes(), 0);
        let left: Vec<_> = fs::read_dir(dir.path()).unwrap().filter_map(|e| e.ok()).collect();
        assert!(left.iter().all(|e| !e.file_name().to_string_lossy().starts_with("seg-")), "{left:?}");
    }

    #[test]
    fn a_second_owner_of_the_directory_is_refused_until_the_first_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let first = Spool::open(dir.path(), 1 << 20).unwrap();
        let second = Spool::open(dir.path(), 1 << 20).unwrap_err();
        assert_eq!(second.kind(), io::ErrorKind::WouldBlock);
        assert!(second.to_string().contains("a data directory of its own"), "{second}");
        drop(first);
        Spool::open(dir.path(), 1 << 20).expect("free once the first owner is gone");
    }

    #[test]
    fn a_full_spool_refuses_a_batch_whole_and_a_torn_tail_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 600).unwrap();
        spool.append(&[row(1)]).unwrap();
        assert!(matches!(spool.append(&(0..10).map(row).collect::<Vec<_>>()), Err(SpoolError::Full(600))));
        assert_eq!(spool.rows(), 1);
        // A crash mid-write leaves half a line; the next process seals
        // that segment, appends to a new one, and skips the torn line.
        drop(spool);
        let mut f = fs::OpenOptions::new().append(true).open(segment_path(dir.path(), 0)).unwrap();
        f.write_all(b"{\"id\":\"torn").unwrap();
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        spool.append(&[row(2)]).unwrap();
        let first = spool.read_chunk(10).unwrap().unwrap();
        assert_eq!((first.rows.len(), first.unreadable), (1, 1));
        spool.commit(&first).unwrap();
        let second = spool.read_chunk(10).unwrap().unwrap();
        assert_eq!(second.rows[0].trace_id.as_deref(), Some("trace2"));
        spool.commit(&second).unwrap();
        assert!(spool.is_empty());
    }
}
