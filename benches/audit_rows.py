"""What the SQLite audit scripts share: the audit table as keywarden
creates it, its indexes, the insert keywarden makes (multi-row VALUES of
up to 512 rows, one transaction per batch), and a row shaped like the
Verify benchmark's: one merchant, 1000 keys, time-ordered ids, one row per
millisecond."""

COLUMNS = (
    "(id text PRIMARY KEY NOT NULL, timestamp text NOT NULL, kind text NOT NULL, merchant_id text,"
    " api_key_id text, api_key_name text, key_prefix text, endpoint text, method text, ip text,"
    " status integer, decision text, deny_reason text, actor text, trace_id text, detail text)"
)
INDEXES = [
    ("by_merchant", "merchant_id, timestamp, id"),
    ("by_key", "api_key_id, timestamp, id"),
    ("by_time", "timestamp"),
]
ROW = "(" + ", ".join("?" * 16) + ")"


def insert_values(c, batch, table="audit_events"):
    c.execute("BEGIN")
    for b in range(0, len(batch), 512):
        chunk = batch[b : b + 512]
        c.execute(f"INSERT INTO {table} VALUES " + ", ".join([ROW] * len(chunk)), [v for r in chunk for v in r])
    c.execute("COMMIT")


def row(i):
    return [
        f"01a21f28-4ad8-7{i >> 12 & 0xfff:03x}-8000-{i:012x}",
        f"2026-11-{27 + i // 86400000:02d}T{i // 3600000 % 24:02d}:{i // 60000 % 60:02d}:"
        f"{i // 1000 % 60:02d}.{i % 1000 * 1000:06d}+00:00",
        "VERIFY",
        "cmm3zkkx000006ogg8arp52qb",
        f"01a21f28-4ad8-702f-82c2-{i % 1000:012d}",
        f"key {i % 1000}",
        "sntr_vvWl5MakDFt",
        "/v1/sales",
        "GET",
        "10.1.2.3",
        None,
        "ALLOW",
        None,
        None,
        None,
        None,
    ]
