//! The usage spill: where unwritten usage batches go when the database
//! cannot take them, so that a replica killed during an outage (the usual
//! end of a failing liveness probe) loses no count and no credit spent.
//!
//! One file per batch, `usage-<flush id>.json`, written to a temporary
//! name, synced and renamed, so a file is either whole or absent. The
//! next process applies every file under its flush id before it serves;
//! the store records flush ids, so a batch whose commit landed before the
//! kill is recognised and not counted twice.

use std::{
    collections::HashMap,
    fs,
    io::{self, Write as _},
    path::{Path, PathBuf},
};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::store::usage::UsageDelta;

const PREFIX: &str = "usage-";
const SUFFIX: &str = ".json";

/// A spilled batch as stored: the flush id and each key's delta.
#[derive(Debug, Serialize, Deserialize)]
struct Stored {
    id: String,
    deltas: Vec<StoredDelta>,
}

#[derive(Debug, Serialize, Deserialize)]
struct StoredDelta {
    key_id: String,
    allowed: i64,
    denied: i64,
    /// Microseconds since the epoch.
    last_used_at: Option<i64>,
    spent: i64,
}

/// A batch read back from the spill.
#[derive(Debug)]
pub struct Spilled {
    pub id: String,
    pub deltas: HashMap<String, UsageDelta>,
}

#[derive(Debug)]
pub struct Spill {
    dir: PathBuf,
}

impl Spill {
    /// Opens (creating, owner-only) the spill directory.
    pub fn open(dir: &Path) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
        }
        Ok(Self { dir: dir.to_owned() })
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{PREFIX}{id}{SUFFIX}"))
    }

    /// Writes (or replaces) the batch `id`, whole or not at all.
    pub fn write(&self, id: &str, deltas: &HashMap<String, UsageDelta>) -> io::Result<()> {
        let stored = Stored {
            id: id.to_owned(),
            deltas: deltas
                .iter()
                .map(|(key_id, d)| StoredDelta {
                    key_id: key_id.clone(),
                    allowed: d.allowed,
                    denied: d.denied,
                    last_used_at: d.last_used_at.map(|t| t.timestamp_micros()),
                    spent: d.spent,
                })
                .collect(),
        };
        let body = serde_json::to_vec(&stored).map_err(io::Error::other)?;
        let temporary = self.dir.join(format!(".{PREFIX}{id}.tmp"));
        let mut file = fs::File::create(&temporary)?;
        file.write_all(&body)?;
        file.sync_all()?;
        fs::rename(&temporary, self.path(id))
    }

    /// Forgets the batch `id` (written to the database, or never spilled).
    pub fn remove(&self, id: &str) -> io::Result<()> {
        match fs::remove_file(self.path(id)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Every batch a previous process left, oldest first (flush ids are
    /// UUIDv7). A file that cannot be read is renamed aside with
    /// `.unreadable` and reported, never silently dropped.
    pub fn load(&self) -> io::Result<(Vec<Spilled>, Vec<PathBuf>)> {
        let mut names: Vec<String> = fs::read_dir(&self.dir)?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with(PREFIX) && n.ends_with(SUFFIX))
            .collect();
        names.sort_unstable();
        let (mut batches, mut unreadable) = (Vec::new(), Vec::new());
        for name in names {
            let path = self.dir.join(&name);
            match fs::read(&path).ok().and_then(|b| serde_json::from_slice::<Stored>(&b).ok()) {
                Some(stored) if self.path(&stored.id) == path => batches.push(Spilled {
                    id: stored.id,
                    deltas: stored
                        .deltas
                        .into_iter()
                        .map(|d| {
                            let delta = UsageDelta {
                                allowed: d.allowed,
                                denied: d.denied,
                                last_used_at: d.last_used_at.and_then(DateTime::<Utc>::from_timestamp_micros),
                                spent: d.spent,
                            };
                            (d.key_id, delta)
                        })
                        .collect(),
                }),
                _ => {
                    let aside = path.with_extension("json.unreadable");
                    fs::rename(&path, &aside)?;
                    unreadable.push(aside);
                }
            }
        }
        Ok((batches, unreadable))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn delta(allowed: i64, spent: i64) -> UsageDelta {
        let at = DateTime::<Utc>::from_timestamp_micros(1_800_000_000_123_456);
        UsageDelta { allowed, denied: 2, last_used_at: at, spent }
    }

    #[test]
    fn a_batch_reads_back_as_written_and_a_rewrite_replaces_it() {
        let dir = tempfile::tempdir().unwrap();
        let spill = Spill::open(dir.path()).unwrap();
        let first = HashMap::from([("k1".to_owned(), delta(3, 1))]);
        spill.write("0001", &first).unwrap();
        let second = HashMap::from([("k1".to_owned(), delta(5, 0)), ("k2".to_owned(), delta(1, 7))]);
        spill.write("0002", &first).unwrap();
        spill.write("0002", &second).unwrap();
        let (batches, unreadable) = spill.load().unwrap();
        assert!(unreadable.is_empty());
        let read: Vec<_> = batches.iter().map(|b| (b.id.as_str(), b.deltas.clone())).collect();
        assert_eq!(read, vec![("0001", first), ("0002", second)]);
        spill.remove("0001").unwrap();
        spill.remove("0001").unwrap();
        assert_eq!(spill.load().unwrap().0.len(), 1);
    }

    #[test]
    fn an_unreadable_file_is_set_aside_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let spill = Spill::open(dir.path()).unwrap();
        fs::write(dir.path().join("usage-0003.json"), b"{\"id\": \"0003\", \"del").unwrap();
        // A file whose id is not its name's would be removed under the wrong name.
        spill.write("0004", &HashMap::from([("k".to_owned(), delta(1, 0))])).unwrap();
        fs::rename(dir.path().join("usage-0004.json"), dir.path().join("usage-0005.json")).unwrap();
        let (batches, unreadable) = spill.load().unwrap();
        assert!(batches.is_empty());
        assert_eq!(unreadable.len(), 2);
        assert!(dir.path().join("usage-0003.json.unreadable").exists());
        assert!(spill.load().unwrap().1.is_empty(), "set aside once");
    }
}
