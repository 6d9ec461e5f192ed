#!/usr/bin/env python3
"""Instructions per call, by thread, for each closed-loop scenario of the
Verify benchmark: a noise-free companion to its timings.

Runs the benchmark binary under `valgrind --tool=callgrind` twice per
scenario (`--profile <scenario>` for a short and a long window) and divides
the difference in instructions by the difference in calls, so that set-up
(key creation, migrations, scrypt) cancels out. Threads are grouped by what
they run: the server runtime, the load generator's runtime, SQLite's
connection threads (per audit row written) and the scrypt pool.

Instruction counts are repeatable whatever else the machine is doing, which
the timings on this 2-vCPU VM are not; they leave out the kernel (TCP
loopback, SQLite's WAL writes) and memory stalls, so the ratio they give is
an upper bound for the timed one. Valgrind hides SHA-NI, so SHA-256 runs its
portable code here: its share is reported apart ("of it SHA-256").
Under valgrind the writer sees much shorter batches than at full speed.

    cargo bench --bench verify --no-run
    python3 benches/callgrind_per_call.py [--keys 4] [--short 10] [--long 40]
        [--scenarios baseline,allow,deny-scope,malformed] [-- <benchmark args>]

Needs valgrind (on the machine) and ~10 minutes for the default scenarios.
"""

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import tempfile


def newest_bench_binary():
    candidates = [
        p
        for p in glob.glob("target/release/deps/verify-*")
        if os.access(p, os.X_OK) and not p.endswith(".d")
    ]
    if not candidates:
        sys.exit("no benchmark binary: run `cargo bench --bench verify --no-run` first")
    return max(candidates, key=os.path.getmtime)


def group_of(text):
    if "scrypt" in text:
        return "scrypt"
    if "sqlite3VdbeExec" in text:
        return "sqlite"
    if "h2::server" in text:
        return "server"
    if "h2::client" in text:
        return "client"
    return "other"


def sha_instructions(path):
    """Exclusive instructions in SHA-256's compression functions."""
    out = subprocess.run(
        ["callgrind_annotate", "--threshold=100", path], capture_output=True, text=True, check=True
    ).stdout
    total = 0
    for line in out.splitlines():
        m = re.match(r"\s*([\d,]+)\s+\([\s\d.]+%\)\s+.*sha2::sha256::", line)
        if m:
            total += int(m.group(1).replace(",", ""))
    return total


def run(binary, scenario, seconds, keys, extra):
    with tempfile.TemporaryDirectory() as out:
        cmd = [
            "valgrind",
            "--tool=callgrind",
            "--separate-threads=yes",
            f"--callgrind-out-file={out}/cg.%p",
            binary,
            "--bench",
            "--keys",
            str(keys),
            "--profile",
            scenario,
            "--duration",
            str(seconds),
            # Pool waits are wall-clock bounds; callgrind runs ~50x slower.
            "--db-acquire-timeout-ms",
            "120000",
            *extra,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        calls = re.search(r": (\d+) calls,", proc.stdout)
        rows = re.search(r"audit rows written in the window: (\d+)", proc.stdout)
        if not calls:
            sys.exit(f"no call count in the benchmark's output:\n{proc.stdout}")
        groups, sha = {}, {}
        for path in glob.glob(f"{out}/cg.*-*"):
            with open(path, errors="replace") as f:
                text = f.read()
            total = int(re.search(r"^summary: (\d+)", text, re.M).group(1))
            g = group_of(text)
            groups[g] = groups.get(g, 0) + total
            if g in ("server", "client"):
                sha[g] = sha.get(g, 0) + sha_instructions(path)
        return {
            "calls": int(calls.group(1)),
            "rows": int(rows.group(1)) if rows else 0,
            "groups": groups,
            "sha": sha,
        }


def main():
    argv = sys.argv[1:]
    extra = []
    if "--" in argv:
        extra = argv[argv.index("--") + 1 :]
        argv = argv[: argv.index("--")]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--binary", default=None)
    p.add_argument("--keys", type=int, default=4)
    p.add_argument("--short", type=float, default=10)
    p.add_argument("--long", type=float, default=40)
    p.add_argument("--scenarios", default="baseline,allow,deny-scope,malformed")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args(argv)
    binary = args.binary or newest_bench_binary()
    print(f"binary: {binary}; {args.keys} keys; windows {args.short}s and {args.long}s under callgrind")

    results = {}
    for scenario in args.scenarios.split(","):
        short = run(binary, scenario, args.short, args.keys, extra)
        long = run(binary, scenario, args.long, args.keys, extra)
        calls = long["calls"] - short["calls"]
        rows = long["rows"] - short["rows"]
        if calls <= 0:
            sys.exit(f"{scenario}: the long window made no more calls than the short one")

        def per(kind, group, n):
            d = long[kind].get(group, 0) - short[kind].get(group, 0)
            return d / n if n > 0 else 0.0

        r = {
            "calls": calls,
            "rows": rows,
            "server": per("groups", "server", calls),
            "server_sha": per("sha", "server", calls),
            "client": per("groups", "client", calls),
            "client_sha": per("sha", "client", calls),
            # Each Verify writes one row; a baseline call none.
            "sqlite_per_row": per("groups", "sqlite", rows) if rows > calls // 2 else 0.0,
        }
        results[scenario] = r
        print(f"  {scenario}: {calls} calls, {rows} audit rows in the difference", flush=True)

    print()
    print("| scenario | server | of it SHA-256 | client | SQLite per row | total | baseline ÷ total |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    base = results.get("baseline")
    for scenario, r in results.items():
        total = r["server"] + r["client"] + r["sqlite_per_row"]
        ratio = f"{(base['server'] + base['client']) / total:.2f}" if base else "-"
        print(
            f"| {scenario} | {r['server']:,.0f} | {r['server_sha']:,.0f} | {r['client']:,.0f} "
            f"| {r['sqlite_per_row']:,.0f} | {total:,.0f} | {ratio} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
