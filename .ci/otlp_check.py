#!/usr/bin/env python3
"""Exports spans to a real OTLP receiver (rotel) and checks what arrives: a
keywarden.verify span carrying the audit fields, joined to the caller's
traceparent, with service.name and service.version on its resource, and the
same trace id in the stored audit row."""

import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
BINARY = ROOT / "target" / "debug" / "keywarden"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"nothing listening on {port}")


def grpcurl(*args, data=None, headers=()):
    cmd = ["grpcurl", "-plaintext"]
    for h in headers:
        cmd += ["-H", h]
    if data is not None:
        cmd += ["-d", json.dumps(data)]
    result = subprocess.run(cmd + list(args), capture_output=True, text=True, check=True)
    return json.loads(result.stdout) if result.stdout.strip() else {}


def main():
    rotel = shutil.which("rotel-agent") or str(
        next(pathlib.Path(sys.prefix).glob("lib/python*/site-packages/rotel/rotel-agent"))
    )
    work = pathlib.Path(tempfile.mkdtemp())
    otlp, http, grpc, metrics = free_port(), free_port(), free_port(), free_port()
    receiver_log = open(work / "rotel.out", "w")
    receiver = subprocess.Popen(
        [rotel, "start", "--otlp-grpc-endpoint", f"127.0.0.1:{otlp}", "--otlp-http-endpoint", f"127.0.0.1:{http}",
         "--exporter", "blackhole", "--debug-log", "traces", "--debug-log-verbosity", "detailed"],
        stdout=receiver_log, stderr=subprocess.STDOUT,
    )
    wait_port(otlp)
    env = dict(os.environ, OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{otlp}",
               OTEL_RESOURCE_ATTRIBUTES="deployment.environment=ci",
               KEYWARDEN_LISTEN_ADDR=f"127.0.0.1:{grpc}", KEYWARDEN_METRICS_ADDR=f"127.0.0.1:{metrics}")
    server = subprocess.Popen([BINARY, "serve"], cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=open(work / "kw.out", "w"))
    try:
        wait_port(grpc)
        addr = f"127.0.0.1:{grpc}"
        token = (work / "keywarden-data" / "admin-token").read_text().strip()
        auth = f"authorization: Bearer {token}"
        created = grpcurl(addr, "keywarden.v1.KeyAdmin/CreateKey", headers=[auth],
                          data={"merchant_id": "m_otel", "name": "OTLP check", "scopes": ["invoice:write"]})
        verdict = grpcurl(addr, "keywarden.v1.KeyVerify/Verify", headers=[f"traceparent: 00-{TRACE_ID}-{PARENT}-01"],
                          data={"key": created["plaintextKey"], "ip": "192.168.1.100", "required_scope": "invoice:write",
                                "endpoint": "/public/api/v1/invoices", "method": "POST"})
        assert verdict["decision"] == "DECISION_ALLOW", verdict
        audit_id = verdict["auditEventId"]
        time.sleep(1.5)
        events = grpcurl(addr, "keywarden.v1.KeyAdmin/ListAuditEvents", headers=[auth], data={"merchant_id": "m_otel"})["events"]
        row = next(e for e in events if e["id"] == audit_id)
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)
    time.sleep(1.0)
    receiver.send_signal(signal.SIGTERM)
    receiver.wait(timeout=30)
    received = (work / "rotel.out").read_text()
    assert code == 0, f"keywarden exited {code}"

    spans = re.split(r"\n\s*Span #\d+\n", received)
    verify = [s for s in spans if f"keywarden.audit_event_id: Str({audit_id})" in s]
    assert verify, f"no keywarden.verify span for {audit_id} reached the receiver:\n{received[:3000]}"
    span = verify[0]
    checks = {
        "span name": "Name           : keywarden.verify" in span,
        "joins the caller's trace": f"Trace ID       : {TRACE_ID}" in span,
        "parent is the caller's span": f"Parent ID      : {PARENT}" in span,
        "api_key_id": f"keywarden.api_key_id: Str({row['apiKeyId']})" in span,
        "api_key_name": "keywarden.api_key_name: Str(OTLP check)" in span,
        "merchant_id": "keywarden.merchant_id: Str(m_otel)" in span,
        "endpoint": "keywarden.endpoint: Str(/public/api/v1/invoices)" in span,
        "method": "keywarden.method: Str(POST)" in span,
        "ip": "keywarden.ip: Str(192.168.1.100)" in span,
        "decision": "keywarden.decision: Str(ALLOW)" in span,
        "timestamp": "keywarden.timestamp: Str(" in span,
        "resource service.name": "service.name: Str(keywarden)" in received,
        "resource service.version": "service.version: Str(" in received,
        "resource attributes from OTEL_RESOURCE_ATTRIBUTES": "deployment.environment: Str(ci)" in received,
        "audit row names the same trace": row.get("traceId") == TRACE_ID,
        "no plaintext key in any span": created["plaintextKey"][16:] not in received,
    }
    failed = [name for name, ok in checks.items() if not ok]
    for name, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
    if failed:
        print(span)
        sys.exit(1)
    print("OTLP: spans reached a real receiver with the audit fields and the caller's trace")


if __name__ == "__main__":
    main()
