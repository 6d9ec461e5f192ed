"""PostgreSQL's CPU per audit row, by insert method (the figures in
BENCHMARKS.md, "What changed on 2026-11-28 (third session)").

Rows are shaped like the Verify benchmark's: one merchant, 1000 keys
interleaved, sequential UUIDv7-like ids, 4000-row batches, on a table with
keywarden's columns and indexes holding 100k rows already. Methods: the
array upsert keywarden used until then (`INSERT … SELECT FROM unnest(…)
ON CONFLICT`, still its retry path), the same without the conflict clause,
and binary `COPY` (what it uses now). The figure that matters is the
server backend's CPU per row, read from /proc for the backend's pid:
Python's own cost of building the batch is not the database's.

    pip install 'psycopg[binary]'
    python3 benches/pg_audit_insert.py [postgresql://postgres@127.0.0.1:5432/test]

It creates and drops its own database, `keywarden_insert_bench`.
"""

import datetime
import sys
import time
import uuid

import psycopg

ADMIN_URL = sys.argv[1] if len(sys.argv) > 1 else "postgresql://postgres@127.0.0.1:5432/test"
DB = "keywarden_insert_bench"
BATCH = 4000
PRELOAD = 100_000
MEASURED = 100_000
ROUNDS = 3
COLUMNS = (
    'id, "timestamp", kind, merchant_id, api_key_id, api_key_name, key_prefix, endpoint, method, ip, '
    "status, decision, deny_reason, actor, trace_id, detail"
)
TYPES = ["text", "timestamptz"] + ["text"] * 8 + ["int4"] + ["text"] * 5
SCHEMA = """
DROP TABLE IF EXISTS audit_events;
CREATE TABLE audit_events (id varchar PRIMARY KEY, "timestamp" timestamptz NOT NULL, kind varchar NOT NULL,
  merchant_id varchar, api_key_id varchar, api_key_name varchar, key_prefix varchar, endpoint text,
  method varchar, ip varchar, status integer, decision varchar, deny_reason varchar, actor varchar,
  trace_id varchar, detail text);
CREATE INDEX idx_audit_events_merchant_ts ON audit_events (merchant_id, "timestamp", id);
CREATE INDEX idx_audit_events_key_ts ON audit_events (api_key_id, "timestamp", id);
CREATE INDEX idx_audit_events_ts ON audit_events ("timestamp");
"""
ARRAYS = ", ".join(f"%s::{t}[]" for t in TYPES)
UPSERT = "ON CONFLICT (id) DO UPDATE SET status = COALESCE(excluded.status, audit_events.status)"


def make_rows(n):
    start = datetime.datetime(2026, 11, 28, tzinfo=datetime.timezone.utc)
    rows = []
    for i in range(n):
        k = (i * 7919) % 1000
        h = f"{i:032x}"
        rows.append(
            [
                f"{h[:8]}-{h[8:12]}-7{h[13:16]}-8{h[17:20]}-{h[20:]}",
                start + datetime.timedelta(microseconds=25 * i),
                "VERIFY",
                "mer_bench",
                f"key_{k:024d}",
                f"bench key {k}",
                f"sntr_{k:011d}",
                "/v1/charges",
                "POST",
                f"10.0.{k % 256}.{k % 200}",
                None,
                "ALLOW",
                None,
                None,
                uuid.uuid4().hex,
                None,
            ]
        )
    return rows


def unnest(cur, batch, conflict):
    columns = [list(c) for c in zip(*batch)]
    sql = f"INSERT INTO audit_events ({COLUMNS}) SELECT * FROM unnest({ARRAYS}) {UPSERT if conflict else ''}"
    cur.execute(sql, columns, binary=True)


def copy(cur, batch, _conflict=None):
    with cur.copy(f"COPY audit_events ({COLUMNS}) FROM STDIN (FORMAT BINARY)") as cp:
        cp.set_types(TYPES)
        for row in batch:
            cp.write_row(row)


METHODS = {
    "unnest + ON CONFLICT": lambda cur, b: unnest(cur, b, True),
    "unnest": lambda cur, b: unnest(cur, b, False),
    "COPY binary": copy,
}


def backend_cpu(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks of 10 ms


def main():
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {DB}")
        admin.execute(f"CREATE DATABASE {DB}")
    url = ADMIN_URL.rsplit("/", 1)[0] + "/" + DB
    rows = make_rows(PRELOAD + MEASURED)
    print(f"{BATCH}-row batches, {MEASURED} rows measured after {PRELOAD} preloaded")
    try:
        for rnd in range(ROUNDS):
            for name, insert in METHODS.items():
                with psycopg.connect(url) as conn:
                    conn.execute(SCHEMA)
                    conn.commit()
                    for i in range(0, PRELOAD, BATCH):
                        copy(conn.cursor(), rows[i : i + BATCH])
                        conn.commit()
                    conn.execute("CHECKPOINT")
                    pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
                    conn.commit()
                    cpu, wall = backend_cpu(pid), time.perf_counter()
                    for i in range(PRELOAD, PRELOAD + MEASURED, BATCH):
                        insert(conn.cursor(), rows[i : i + BATCH])
                        conn.commit()
                    cpu, wall = backend_cpu(pid) - cpu, time.perf_counter() - wall
                    print(
                        f"round {rnd + 1}  {name:22s} backend {cpu / MEASURED * 1e6:5.1f} us/row"
                        f"  ({MEASURED / wall:7.0f} rows/s wall, client included)",
                        flush=True,
                    )
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {DB}")


main()
