"""Standalone SQLite insert rate of audit rows, by batch size, checkpoint
interval and index set (the figures in BENCHMARKS.md, "What changed").

Rows are shaped like the Verify benchmark's: one merchant, 1000 keys,
sequential UUIDv7-like ids, inserted the way keywarden inserted them until
2026-11-28 (one JSON parameter per batch) and the way it inserts them now
(multi-row VALUES of up to 512 rows, one transaction). Uses Python's sqlite3 module, so the SQLite version
differs from the one keywarden bundles; compare the rows, not the absolutes.

    python3 benches/sqlite_audit_insert.py
"""

import json
import os
import sqlite3
import tempfile
import time

from audit_rows import COLUMNS, INDEXES, insert_values, row

N = 100_000
INSERT = "INSERT INTO audit_events SELECT " + ", ".join(f"value->>{i}" for i in range(16)) + " FROM json_each(?)"


def insert_json(c, batch):
    c.execute(INSERT, (json.dumps(batch),))


def connect(path, autocheckpoint, indexes):
    if os.path.exists(path):
        os.remove(path)
    c = sqlite3.connect(path, isolation_level=None)
    for pragma in ("journal_mode=wal", "synchronous=normal", "cache_size=-32768", f"wal_autocheckpoint={autocheckpoint}"):
        c.execute(f"PRAGMA {pragma}")
    c.execute("CREATE TABLE audit_events " + COLUMNS)
    for name, cols in indexes:
        c.execute(f"CREATE INDEX {name} ON audit_events ({cols})")
    return c


ALL = INDEXES

rows = [row(i) for i in range(N)]

print(f"SQLite {sqlite3.sqlite_version}, {N} rows")
with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "audit.db")
    for label, batch, checkpoint, indexes, insert in [
        ("JSON, batch 1000, checkpoint 1000 pages (11-27 before)", 1000, 1000, ALL, insert_json),
        ("JSON, batch 1000, checkpoint 1000 pages, without the by-key index", 1000, 1000, [ALL[0], ALL[2]], insert_json),
        ("JSON, batch 1000, checkpoint 10000 pages", 1000, 10000, ALL, insert_json),
        ("JSON, batch 4000, checkpoint 10000 pages (11-27 after)", 4000, 10000, ALL, insert_json),
        ("VALUES, batch 4000, checkpoint 10000 pages (now)", 4000, 10000, ALL, insert_values),
    ]:
        c = connect(path, checkpoint, indexes)
        start = time.perf_counter()
        for b in range(0, N, batch):
            insert(c, rows[b : b + batch])
        print(f"{label}: {N / (time.perf_counter() - start):.0f} rows/s")
        c.close()
