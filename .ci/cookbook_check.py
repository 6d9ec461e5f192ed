#!/usr/bin/env python3
"""Runs the grpcurl cookbook (docs/cookbook.md), as written, against a real
server started as it shows: a first run (embedded SQLite, generated secrets)
serving mutual TLS with the certificates its first block makes, using only
server reflection. Only the port is swapped for a free one."""

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
BINARY = ROOT / "target" / "debug" / "keywarden"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    cookbook = (ROOT / "docs" / "cookbook.md").read_text()
    section = cookbook.split("## grpcurl", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    assert len(blocks) >= 8, f"expected the cookbook's shell blocks, found {len(blocks)}"
    port = free_port()
    certificates, calls = blocks[0], blocks[1:]
    assert "openssl" in certificates, "the first block makes the certificates"
    script = "set -euo pipefail\n" + "\n".join(calls).replace("127.0.0.1:50051", f"127.0.0.1:{port}")
    work = pathlib.Path(tempfile.mkdtemp())
    subprocess.run(["bash", "-c", "set -euo pipefail\n" + certificates], cwd=work, check=True)
    # The server command the cookbook shows, with the binary CI built.
    shown = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    tls_env = dict(re.findall(r"(KEYWARDEN_TLS_\w+)=(\S+)", shown))
    assert set(tls_env) == {"KEYWARDEN_TLS_CERT_FILE", "KEYWARDEN_TLS_KEY_FILE", "KEYWARDEN_TLS_CLIENT_CA_FILE"}, shown
    env = dict(os.environ, KEYWARDEN_LISTEN_ADDR=f"127.0.0.1:{port}", KEYWARDEN_METRICS_ADDR="127.0.0.1:0", **tls_env)
    server = subprocess.Popen([BINARY, "serve"], cwd=work, env=env, stdout=subprocess.DEVNULL,
                              stderr=open(work / "server.log", "w"))
    try:
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        tls = ["-cacert", "ca.pem", "-cert", "client.pem", "-key", "client.key"]
        described = subprocess.run(["grpcurl", *tls, f"127.0.0.1:{port}", "describe", "keywarden.v1.KeyVerify"],
                                   cwd=work, capture_output=True, text=True, check=True).stdout
        # Envoy's Check, known to grpcurl only through reflection; no route
        # file, so every request is refused as unrouted.
        envoy_request = {"attributes": {"request": {"http": {"method": "GET", "path": "/public/api/v1/sales",
                                                             "headers": {"x-api-key": "sntr_x"}}}}}
        checked = subprocess.run(["grpcurl", *tls, "-d", json.dumps(envoy_request), f"127.0.0.1:{port}",
                                  "envoy.service.auth.v3.Authorization/Check"],
                                 cwd=work, capture_output=True, text=True)
        plaintext = subprocess.run(["grpcurl", "-plaintext", f"127.0.0.1:{port}", "list"],
                                   cwd=work, capture_output=True, text=True)
        no_client_cert = subprocess.run(["grpcurl", "-cacert", "ca.pem", f"127.0.0.1:{port}", "list"],
                                        cwd=work, capture_output=True, text=True)
        run = subprocess.run(["bash", "-c", script], cwd=work, capture_output=True, text=True, timeout=300)
        output = run.stdout + run.stderr
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)
    print(output[-4000:])
    print(checked.stdout[-2000:], checked.stderr[-2000:])
    expected = {
        "describe via reflection, over mTLS": "rpc Verify ( .keywarden.v1.VerifyRequest )" in described,
        "Envoy's Check through reflection": checked.returncode == 0 and "DENY_REASON_NO_ROUTE" in checked.stdout
        and '"code": "Forbidden"' in checked.stdout,
        "plaintext refused": plaintext.returncode != 0,
        "no client certificate refused": no_client_cert.returncode != 0,
        "operator token issued": '"plaintextToken": "kwop_' in output and '"role": "OPERATOR_ROLE_KEY_MANAGER"' in output,
        "keys created by the operator": '"createdBy": "portal"' in output,
        "outside the merchants: denied": "Code: PermissionDenied" in output,
        "the script ran to the end": run.returncode == 0,
        "list shows both services": "keywarden.v1.KeyAdmin" in output and "keywarden.v1.KeyVerify" in output,
        "health": '"status": "SERVING"' in output,
        "scopes and presets": '"name": "openclaw_skill"' in output,
        "created with a plaintext key": '"plaintextKey": "sntr_' in output,
        "verified": '"decision": "DECISION_ALLOW"' in output,
        "outcome recorded": '"updated": 1' in output,
        "denial is an answer": '"denyReason": "DENY_REASON_MALFORMED"' in output,
        "audit row with status 201": '"status": 201' in output,
        "usage counted": '"requestCount": "1"' in output,
        "IP limits updated": '"192.168.1.0/24"' in output,
        "rotation with grace": '"status": "KEY_STATUS_ROTATING"' in output,
        "disabled, then enabled": '"status": "KEY_STATUS_DISABLED"' in output
        and '"disabledReason": "under review"' in output,
        "revoked": '"status": "KEY_STATUS_REVOKED"' in output,
        "its lifecycle event listed": '"type": "key.revoked"' in output and '"reason": "integration retired"' in output,
        "bad input names the field": "Code: InvalidArgument" in output and '"field":"scopes"' in output,
        "server stopped cleanly": code == 0,
        "first run said where the secrets went": "generated one into" in (work / "server.log").read_text(),
    }
    for name, ok in expected.items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
    if not all(expected.values()):
        sys.exit(1)
    print("cookbook: every documented call answered as documented")


if __name__ == "__main__":
    main()
