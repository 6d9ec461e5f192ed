"""SQLite CPU per audit row by write order, batch size, layout and schema,
into a table that already holds rows (the figures in BENCHMARKS.md, "What
changed on 2026-11-28 (seventh session)" and "Schema variants priced").

Rows are shaped like the Verify benchmark's (one merchant, 1000 keys,
time-ordered ids) and go in as keywarden writes them: multi-row VALUES of
up to 512 rows, one transaction per batch. Uses Python's sqlite3 module, so
the SQLite version differs from the one keywarden bundles; compare the
rows, not the absolutes. CPU is this process's (user + system).

    python3 benches/sqlite_audit_order.py [--prefill 2000000] [--rows 200000]
"""

import argparse
import os
import sqlite3
import tempfile
import time
import uuid

from audit_rows import COLUMNS, INDEXES, insert_values, row

# The same row with its two uuids as 16-byte blobs and its timestamp as
# integer microseconds: what a compact schema would store.
COMPACT_COLUMNS = COLUMNS.replace("id text PRIMARY", "id blob PRIMARY").replace(
    "timestamp text", "timestamp integer").replace("api_key_id text", "api_key_id blob")
# A renamed column in audit_rows.py would otherwise quietly compare the schema with itself.
assert COMPACT_COLUMNS.count("blob") == 2 and "timestamp integer" in COMPACT_COLUMNS


def compact_row(i):
    r = row(i)
    r[0], r[4] = uuid.UUID(r[0]).bytes, uuid.UUID(r[4]).bytes
    r[1] = 1_795_737_600_000_000 + i * 1000
    return r


def index_order(r):
    return (r[3], r[4], r[1], r[0])


def run(label, args, batch, sort=False, page=4096, staging_every=0, columns=COLUMNS, make_row=row,
        indexes=INDEXES, table_options=""):
    with tempfile.TemporaryDirectory() as d:
        c = sqlite3.connect(os.path.join(d, "audit.db"), isolation_level=None)
        c.execute(f"PRAGMA page_size={page}")
        for pragma in ("journal_mode=wal", "synchronous=normal", "cache_size=-32768"):
            c.execute(f"PRAGMA {pragma}")
        c.execute(f"PRAGMA wal_autocheckpoint={10000 * 4096 // page}")
        c.execute("CREATE TABLE audit_events " + columns + table_options)
        c.execute("CREATE TABLE staging " + columns)
        for b in range(0, args.prefill, 20000):
            # In id order, which a WITHOUT ROWID table needs to fill as an append.
            insert_values(c, [make_row(i) for i in range(b, min(b + 20000, args.prefill))])
        for name, cols in indexes:
            c.execute(f"CREATE INDEX {name} ON audit_events ({cols})")
        c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        rows = [make_row(i) for i in range(args.prefill, args.prefill + args.rows)]
        start, staged = time.process_time(), 0
        for b in range(0, args.rows, batch):
            chunk = sorted(rows[b : b + batch], key=index_order) if sort else rows[b : b + batch]
            if not staging_every:
                insert_values(c, chunk)
                continue
            insert_values(c, chunk, "staging")
            staged += len(chunk)
            if staged >= staging_every or b + batch >= args.rows:
                c.execute("BEGIN")
                c.execute("INSERT INTO audit_events SELECT * FROM staging ORDER BY merchant_id, api_key_id, timestamp, id")
                c.execute("DELETE FROM staging")
                c.execute("COMMIT")
                staged = 0
        cpu = time.process_time() - start
        size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.startswith("audit.db"))
        print(f"| {label} | {cpu / args.rows * 1e6:.1f} | {size / 1e6:.0f} MB |", flush=True)
        c.close()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--prefill", type=int, default=2_000_000)
    p.add_argument("--rows", type=int, default=200_000)
    args = p.parse_args()
    print(f"SQLite {sqlite3.sqlite_version}: {args.rows} rows into a table of {args.prefill}, 1000 keys\n")
    print("| variant | CPU µs per row | file size at the end |\n|---|---:|---:|")
    run("arrival order, 4000 per batch (keywarden until 2026-11-28)", args, 4000)
    run("arrival order, 16000 per batch", args, 16000)
    run("index order, 4000 per batch", args, 4000, sort=True)
    run("index order, 16000 per batch (keywarden now)", args, 16000, sort=True)
    run("64 KiB pages, arrival order, 4000 per batch", args, 4000, page=65536)
    run("unindexed staging table, moved in index order every 40000 rows", args, 4000, staging_every=40000)
    # Schema variants, all in index order, 16000 per batch.
    now = dict(batch=16000, sort=True)
    run("WITHOUT ROWID (one b-tree fewer)", args, **now, table_options=" WITHOUT ROWID")
    run("indexes without the trailing id", args, **now,
        indexes=[(n, cols.replace(", id", "")) for n, cols in INDEXES])
    run("no by-time index (its price)", args, **now, indexes=[i for i in INDEXES if i[0] != "by_time"])
    run("blob ids, integer microsecond timestamps", args, **now, columns=COMPACT_COLUMNS, make_row=compact_row)


if __name__ == "__main__":
    main()
