"""The audit row the SQLite scripts insert, shaped like the Verify
benchmark's: one merchant, 1000 keys, time-ordered ids, one row per
millisecond."""


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
