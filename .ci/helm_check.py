#!/usr/bin/env python3
"""Lints and renders helm/keywarden with real Helm (the Helm SDK), then
validates every rendered manifest strictly against the Kubernetes schemas,
for the default values and for ci/production-values.yaml. Also checks what
the chart promises (security context, probes, hooks, no secret in the
ConfigMap) and that values.schema.json rejects bad values."""

import json
import pathlib
import subprocess
import sys
import tempfile
import tomllib

import yaml
from helm_python import Chart, lint
from helm_python.errors import HelmError

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "keywarden"
KUBE = "1.30.0"
failures = []


def check(ok, message):
    if not ok:
        failures.append(message)
        print(f"FAIL: {message}")


def render(values, label):
    report = lint(str(CHART), values, strict=True, kube_version=f"v{KUBE}")
    problems = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2] + report.get("errors", [])
    check(not problems, f"{label}: helm lint --strict: {problems}")
    manifests = Chart.load(CHART).render(values, name="keywarden", namespace="payments", is_install=True)
    docs = []
    for path, text in sorted(manifests.items()):
        if not path.endswith(".yaml"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                docs.append(doc)
    notes = next((t for p, t in manifests.items() if p.endswith("NOTES.txt")), "")
    check("grpcurl" in notes, f"{label}: NOTES.txt tells how to reach it with grpcurl")
    return docs


def validate(docs, label):
    crds = ("monitoring.coreos.com/", "cert-manager.io/")  # no bundled schemas
    builtin = [d for d in docs if not d["apiVersion"].startswith(crds)]
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / f"{label}.yaml"
        path.write_text(yaml.safe_dump_all(builtin))
        result = subprocess.run(
            ["kubernetes-validate", "--strict", "-k", KUBE, str(path)], capture_output=True, text=True
        )
        print(result.stdout.strip())
        check(result.returncode == 0, f"{label}: kubernetes-validate --strict: {result.stdout}{result.stderr}")
    # ServiceMonitor is a CRD without a bundled schema: check its shape here.
    for d in docs:
        if d["kind"] == "ServiceMonitor":
            endpoints = d["spec"]["endpoints"]
            check(endpoints[0]["port"] == "metrics" and endpoints[0]["path"] == "/metrics", f"{label}: ServiceMonitor scrapes /metrics")
            check(set(d["spec"]["selector"]["matchLabels"]) == {"app.kubernetes.io/name", "app.kubernetes.io/instance"},
                  f"{label}: ServiceMonitor selects the release's pods")
        # Certificate is cert-manager's CRD: the fields it requires.
        if d["kind"] == "Certificate":
            spec = d["spec"]
            check(spec["secretName"] and spec["issuerRef"]["name"] and spec["dnsNames"],
                  f"{label}: Certificate has a secret, an issuer and DNS names")
            check(f"keywarden.payments.svc" in spec["dnsNames"], f"{label}: Certificate names the Service")


def by_kind(docs):
    kinds = {}
    for d in docs:
        kinds.setdefault(d["kind"], []).append(d)
    return kinds


def check_promises(docs, label, secrets):
    kinds = by_kind(docs)
    deployment = kinds["Deployment"][0]
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    ctx = container["securityContext"]
    check(pod["securityContext"]["runAsNonRoot"] is True, f"{label}: pod runs as non-root")
    check(ctx["readOnlyRootFilesystem"] is True and ctx["allowPrivilegeEscalation"] is False, f"{label}: read-only root, no escalation")
    check(ctx["capabilities"]["drop"] == ["ALL"], f"{label}: all capabilities dropped")
    check("grpc" in container["readinessProbe"] and "grpc" in container["livenessProbe"], f"{label}: gRPC probes")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    config = kinds["ConfigMap"][0]["data"]
    if "health" in ports:
        check(all(container[p]["grpc"]["port"] == ports["health"] for p in ("readinessProbe", "livenessProbe", "startupProbe")),
              f"{label}: probes use the plaintext health port")
        check(config["KEYWARDEN_HEALTH_LISTEN_ADDR"].endswith(f":{ports['health']}"), f"{label}: the health listener is configured")
    tls = "KEYWARDEN_TLS_CERT_FILE" in config
    mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}
    if tls:
        check(config["KEYWARDEN_TLS_CERT_FILE"].startswith(mounts.get("tls", "-")), f"{label}: the certificate is mounted")
        check("KEYWARDEN_ALLOW_PLAINTEXT" not in config, f"{label}: TLS without a plaintext opt-in")
        check("health" in ports, f"{label}: TLS comes with the plaintext health port for probes")
    else:
        check(config.get("KEYWARDEN_ALLOW_PLAINTEXT") == "true", f"{label}: plaintext is asked for explicitly")
    if "KEYWARDEN_TLS_CLIENT_CA_FILE" in config:
        check(config["KEYWARDEN_TLS_CLIENT_CA_FILE"].startswith(mounts.get("client-ca", "-")), f"{label}: the client CA is mounted")
    if "KEYWARDEN_OPERATOR_IDENTITIES" in config:
        parsed = tomllib.loads("v = " + config["KEYWARDEN_OPERATOR_IDENTITIES"])["v"]
        check(all({"identity", "role", "merchant_ids"} == set(g) for g in parsed), f"{label}: operator identities are TOML the server reads")
    check(container["lifecycle"]["preStop"]["sleep"]["seconds"] >= 1, f"{label}: preStop pause")
    drain = (int(config["KEYWARDEN_SHUTDOWN_GRACE_MS"]) + int(config["KEYWARDEN_FLUSH_TIMEOUT_MS"])) / 1000
    check(pod["terminationGracePeriodSeconds"] > drain + container["lifecycle"]["preStop"]["sleep"]["seconds"],
          f"{label}: terminationGracePeriodSeconds exceeds preStop + drain + flush")
    check(config["KEYWARDEN_MIGRATE_ON_START"] == "false", f"{label}: replicas do not migrate")
    job = kinds["Job"][0]
    check(job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade", f"{label}: migration is a pre-install,pre-upgrade hook")
    check(job["spec"]["template"]["spec"]["containers"][0]["args"] == ["migrate"], f"{label}: the hook runs keywarden migrate")
    for key in ("PEPPER", "PEPPERS", "ADMIN_TOKEN", "ADMIN_TOKENS", "DATABASE_URL"):
        check(f"KEYWARDEN_{key}" not in config, f"{label}: {key} is not in the ConfigMap")
    for value in secrets:
        check(all(value not in str(v) for v in config.values()), f"{label}: no secret value in the ConfigMap")
    secret_refs = {e["valueFrom"]["secretKeyRef"]["key"] for e in container["env"] if "valueFrom" in e and "secretKeyRef" in e["valueFrom"]}
    check({"database-url", "pepper", "admin-token"} <= secret_refs, f"{label}: secrets come from a Secret")
    policy = kinds["NetworkPolicy"][0]["spec"]["ingress"]
    check(any(p["ports"][0]["port"] == "grpc" and p["from"][0].get("namespaceSelector") for p in policy),
          f"{label}: only labelled namespaces reach the gRPC port")
    if "admin" in ports:
        admin_rules = [p for p in policy if p["ports"][0]["port"] == "admin"]
        check(len(admin_rules) == 1 and admin_rules[0]["from"][0]["namespaceSelector"]["matchLabels"]
              != policy[0]["from"][0]["namespaceSelector"]["matchLabels"],
              f"{label}: the admin port has its own NetworkPolicy rule, from other namespaces than verify callers")
        check(config["KEYWARDEN_ADMIN_LISTEN_ADDR"].endswith(f":{ports['admin']}"), f"{label}: KeyAdmin has its own listener")
    return kinds


# What a replica's memory is made of (docs/deployment.md, "Memory"): an
# idle server, the verification cache, scrypt workers, the audit queue.
IDLE_MIB = 40            # idle RSS (BENCHMARKS.md), rounded up
CACHE_MIB_PER_KEY = 0.6 / 1024   # 100k cached keys (BENCHMARKS.md), rounded up
SCRYPT_MIB = 32          # N=2^15, r=8: 128 * r * N bytes per hash in progress
AUDIT_ROW_MIB = 3 / 1024 # bound for one queued row: fields at their validated maxima
ROLLUP_MIB = 5           # at most 10,000 open rollup groups of ~0.5 KiB


def mebibytes(quantity):
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return float(quantity[: -len(suffix)]) * factor
    raise ValueError(f"unexpected memory quantity {quantity}")


def memory_fits(kinds, label):
    """Whether the replica's memory parts fit 90% of its limit, and why."""
    config = kinds["ConfigMap"][0]["data"]
    container = kinds["Deployment"][0]["spec"]["template"]["spec"]["containers"][0]
    workers = int(config["KEYWARDEN_HASH_WORKERS"])
    cpu_limit = container["resources"].get("limits", {}).get("cpu")
    check(workers > 0 or cpu_limit is not None,
          f"{label}: hashWorkers 0 means one per node CPU, unbounded without a CPU limit")
    limit = mebibytes(container["resources"]["limits"]["memory"])
    parts = {
        "idle": IDLE_MIB,
        "cache": int(config["KEYWARDEN_CACHE_MAX_KEYS"]) * CACHE_MIB_PER_KEY,
        # The Verify pool, plus KeyAdmin's own thread.
        "scrypt": (max(workers, 1) + 1) * SCRYPT_MIB,
        "audit rollups": ROLLUP_MIB,
        "audit queue": int(config["KEYWARDEN_AUDIT_QUEUE_CAPACITY"]) * AUDIT_ROW_MIB,
    }
    need = sum(parts.values())
    shown = ", ".join(f"{k} {v:.0f}" for k, v in parts.items())
    print(f"{label}: memory {need:.0f} MiB of {limit:.0f} MiB ({shown})")
    return need <= 0.9 * limit, f"{label}: {need:.0f} MiB ({shown}) against 90% of the {limit:.0f} MiB limit"


def merged(base, extra):
    out = dict(base)
    for k, v in extra.items():
        out[k] = merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# The chart never generates a secret: the default values alone (no
# existingSecret, no pepper) do not render, and say what to set.
try:
    Chart.load(CHART).render(None, name="keywarden", namespace="payments", is_install=True)
    check(False, "default values rendered without a pepper or existingSecret")
except HelmError as e:
    check("existingSecret" in str(e) and "pepper" in str(e), f"default values: the refusal names existingSecret: {e}")

# Plaintext is opt-in: the default values with their secrets but no TLS
# material do not render, and say each way out.
secrets_only = {"secrets": {"pepper": "B" * 44, "adminToken": "trial-admin-token-0123"}}
try:
    Chart.load(CHART).render(secrets_only, name="keywarden", namespace="payments", is_install=True)
    check(False, "default values rendered plaintext without allowPlaintext")
except HelmError as e:
    for named in ("tls.existingSecret", "tls.certManager.issuerRef", "allowPlaintext"):
        check(named in str(e), f"no TLS: the refusal names {named}: {e}")

# Default values plus what a trial install must give: the two secrets, and
# plaintext asked for explicitly (as behind a mesh).
trial = {**secrets_only, "allowPlaintext": True}
docs = render(trial, "default")
validate(docs, "default")
kinds = check_promises(docs, "default", ["B" * 44])
check(*memory_fits(kinds, "default"))
check("Secret" in kinds and "HorizontalPodAutoscaler" not in kinds and "ServiceMonitor" not in kinds,
      "default: chart-managed Secret, no HPA, no ServiceMonitor")
check(kinds["Deployment"][0]["spec"]["replicas"] == 2, "default: 2 replicas")
# The audit spool: its own volume (emptyDir by default, a claim as an
# option), mounted where the data directory is, and bounded below its size.
def spool_of(kinds):
    pod = kinds["Deployment"][0]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    volume = next(v for v in pod["volumes"] if v["name"] == "spool")
    mount = next(m for m in container["volumeMounts"] if m["name"] == "spool")
    env = {e["name"]: e.get("value") for e in container["env"]}
    return volume, mount, env


volume, mount, env = spool_of(kinds)
check(mount["mountPath"] == env["KEYWARDEN_DATA_DIR"], "default: the spool volume is the data directory")
check("emptyDir" in volume and int(env["KEYWARDEN_AUDIT_SPOOL_MAX_BYTES"]) < mebibytes(volume["emptyDir"]["sizeLimit"]) * 2**20,
      f"default: an emptyDir spool, bounded below its size limit: {volume} {env}")
volume, _, _ = spool_of(by_kind(render(merged(trial, {"spool": {"existingClaim": "keywarden-spool"}}), "spool-claim")))
check(volume.get("persistentVolumeClaim", {}).get("claimName") == "keywarden-spool", "spool.existingClaim mounts the claim")

# Rendering again (as `helm template` does on every Argo CD sync) gives the
# same Secret: nothing in it is generated.
again = by_kind(render(trial, "default, rendered again"))
check(again["Secret"][0]["stringData"] == kinds["Secret"][0]["stringData"],
      "default: a second render keeps the Secret's pepper and admin token")

# Explicit secrets must land in the Secret only.
explicit = {"secrets": {"databaseUrl": "postgres://kw:s3cret-pw@db:5432/kw", "pepper": "A" * 44, "adminToken": "token-" + "x" * 20},
            "allowPlaintext": True}
docs = render(explicit, "explicit-secrets")
kinds = check_promises(docs, "explicit-secrets", ["s3cret-pw", "A" * 44, "x" * 20])
check(kinds["Secret"][0]["stringData"]["pepper"] == "A" * 44, "explicit-secrets: the pepper is in the Secret")

# A rotation in progress: generation 2 current, generation 1 kept; then
# generation 1 retired, which the chart renders without a `pepper` key.
rotating = {"allowPlaintext": True, "secrets": {"pepper": "A" * 44, "peppers": '{2="' + "C" * 44 + '"}', "adminToken": "token-" + "x" * 20},
            "config": {"pepperCurrent": "2"}}
docs = render(rotating, "rotating")
kinds = check_promises(docs, "rotating", ["A" * 44, "C" * 44, "x" * 20])
check(kinds["ConfigMap"][0]["data"].get("KEYWARDEN_PEPPER_CURRENT") == "2", "rotating: the current pepper is in the ConfigMap")
check(kinds["Secret"][0]["stringData"]["peppers"] == '{2="' + "C" * 44 + '"}', "rotating: later peppers are in the Secret")
container = kinds["Deployment"][0]["spec"]["template"]["spec"]["containers"][0]
refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "secretKeyRef" in e.get("valueFrom", {})}
check(refs["KEYWARDEN_PEPPERS"]["key"] == "peppers" and refs["KEYWARDEN_PEPPERS"]["optional"]
      and refs["KEYWARDEN_PEPPER"]["optional"], "rotating: either pepper key may be absent from the Secret")
retired = {"allowPlaintext": True, "secrets": {"pepper": "", "peppers": '{2="' + "C" * 44 + '"}', "adminToken": "token-" + "x" * 20},
           "config": {"pepperCurrent": "2"}}
kinds = check_promises(render(retired, "retired"), "retired", ["C" * 44])
check("pepper" not in kinds["Secret"][0]["stringData"], "retired: generation 1 is gone from the Secret")

# Gateway mode, with the values docs/gateway.md shows: the route table
# becomes a ConfigMap mounted as a directory, named by KEYWARDEN_ROUTES_FILE,
# and it is the route table the docs (and so the tests) use.
guide = (ROOT / "docs" / "gateway.md").read_text()
documented_routes = guide.split("```toml\n", 1)[1].split("```", 1)[0]
helm_block = guide.split("## 5. Helm", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
gateway = dict(trial, **yaml.safe_load(helm_block))
kinds = check_promises(render(gateway, "gateway"), "gateway", ["B" * 44])
routes_map = [c for c in kinds["ConfigMap"] if c["metadata"]["name"].endswith("-routes")]
check(len(routes_map) == 1 and routes_map[0]["data"]["routes.toml"].strip() == documented_routes.strip(),
      "gateway: the documented Helm values carry the documented route table")
config = next(c for c in kinds["ConfigMap"] if not c["metadata"]["name"].endswith("-routes"))["data"]
check(config.get("KEYWARDEN_ROUTES_FILE") == "/etc/keywarden/routes/routes.toml"
      and config.get("KEYWARDEN_TRUSTED_PROXY_HOPS") == "1", "gateway: the route file and trusted hops are configured")
pod = kinds["Deployment"][0]["spec"]["template"]["spec"]
mount = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "routes"]
volume = [v for v in pod["volumes"] if v["name"] == "routes"]
check(mount and mount[0]["mountPath"] == "/etc/keywarden/routes" and "subPath" not in mount[0]
      and volume and volume[0]["configMap"]["name"] == routes_map[0]["metadata"]["name"],
      "gateway: the routes ConfigMap is mounted as a directory, so edits reach running pods")

# Leak reports: the listener's port on the pod, the Service and (from the
# ingress controller only) the NetworkPolicy; GitHub's keys from the
# endpoint and from a ConfigMap mounted as a directory.
leaky = merged(trial, {"leakReports": {"enabled": True, "keysConfigMap": "github-keys"},
                       "networkPolicy": {"enabled": True}})
docs = render(leaky, "leak-reports")
validate(docs, "leak-reports")
kinds = check_promises(docs, "leak-reports", ["B" * 44])
config = kinds["ConfigMap"][0]["data"]
check(config.get("KEYWARDEN_LEAK_REPORT_LISTEN_ADDR") == "0.0.0.0:8443"
      and config.get("KEYWARDEN_LEAK_REPORT_KEYS_URL") == "https://api.github.com/meta/public_keys/secret_scanning"
      and config.get("KEYWARDEN_LEAK_REPORT_KEYS_FILE") == "/etc/keywarden/leak-keys/github-keys.json",
      "leak-reports: the listener and both key sources are configured")
pod = kinds["Deployment"][0]["spec"]["template"]["spec"]
ports = {p["name"]: p["containerPort"] for p in pod["containers"][0]["ports"]}
mount = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "leak-keys"]
volume = [v for v in pod["volumes"] if v["name"] == "leak-keys"]
check(ports.get("leak-reports") == 8443 and mount and "subPath" not in mount[0]
      and volume and volume[0]["configMap"]["name"] == "github-keys",
      "leak-reports: the port is open and the keys ConfigMap is mounted as a directory")
service_ports = {p["name"] for p in kinds["Service"][0]["spec"]["ports"]}
rules = kinds["NetworkPolicy"][0]["spec"]["ingress"]
leak_rules = [r for r in rules if any(p["port"] == "leak-reports" for p in r["ports"])]
check("leak-reports" in service_ports and len(leak_rules) == 1
      and leak_rules[0]["from"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "ingress-nginx"},
      "leak-reports: served by the Service, reachable only from the ingress controller's namespace")
config = by_kind(render(trial, "no-leak-reports"))["ConfigMap"][0]["data"]
check("KEYWARDEN_LEAK_REPORT_LISTEN_ADDR" not in config, "default: no leak-report listener")

# The fleet tier: an external Redis, its password and the fleet secret
# from the Secret, nothing secret in the ConfigMap or the URL.
fleet_secret = "F" * 40
fleet = merged(trial, {"redis": {"url": "rediss://redis.payments:6380", "cluster": True, "onRedisFailure": "closed",
                                 "caSecret": "redis-ca"},
                       "secrets": {"fleetSecret": fleet_secret, "redisPassword": "redis-pass-0123456789"}})
docs = render(fleet, "fleet")
validate(docs, "fleet")
kinds = check_promises(docs, "fleet", ["B" * 44, fleet_secret, "redis-pass-0123456789"])
env = {e["name"]: e for e in kinds["Deployment"][0]["spec"]["template"]["spec"]["containers"][0]["env"]}
check(env.get("KEYWARDEN_REDIS_URL", {}).get("value") == "rediss://redis.payments:6380"
      and env.get("KEYWARDEN_REDIS_CLUSTER", {}).get("value") == "true", "fleet: the Redis URL and cluster mode are set")
check(env.get("KEYWARDEN_RATE_LIMIT_MODE", {}).get("value") == "redis"
      and env.get("KEYWARDEN_RATE_LIMIT_ON_REDIS_FAILURE", {}).get("value") == "closed",
      "fleet: rate limits are fleet-wide, with the chosen failure mode")
check(env["KEYWARDEN_FLEET_SECRET"]["valueFrom"]["secretKeyRef"]["key"] == "fleet-secret"
      and env["KEYWARDEN_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "redis-password",
      "fleet: the fleet secret and the Redis password come from the Secret")
pod = kinds["Deployment"][0]["spec"]["template"]["spec"]
mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
volumes = {v["name"]: v for v in pod["volumes"]}
check(env.get("KEYWARDEN_REDIS_CA_FILE", {}).get("value") == "/etc/keywarden/redis-ca/ca.crt"
      and mounts.get("redis-ca") == "/etc/keywarden/redis-ca"
      and volumes.get("redis-ca", {}).get("secret", {}).get("secretName") == "redis-ca",
      "fleet: a private Redis CA is mounted from its Secret and named by KEYWARDEN_REDIS_CA_FILE")
stored = kinds["Secret"][0]["stringData"]
check(stored.get("fleet-secret") == fleet_secret and stored.get("redis-password") == "redis-pass-0123456789",
      "fleet: the chart's Secret holds the fleet secret and the password")
env = {e["name"] for e in by_kind(render(trial, "no-redis"))["Deployment"][0]["spec"]["template"]["spec"]["containers"][0]["env"]}
check(not {"KEYWARDEN_REDIS_URL", "KEYWARDEN_FLEET_SECRET"} & env, "default: Redis stays optional and off")

# Production-like values.
production = yaml.safe_load((CHART / "ci" / "production-values.yaml").read_text())
docs = render(production, "production")
validate(docs, "production")
kinds = check_promises(docs, "production", [])
check(*memory_fits(kinds, "production"))
check("Secret" not in kinds, "production: existingSecret means no chart-managed Secret")
check("HorizontalPodAutoscaler" in kinds and "ServiceMonitor" in kinds, "production: HPA and ServiceMonitor rendered")
# The alerts and the dashboard are the chart's files, unchanged.
alerts = yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())
check("PrometheusRule" in kinds and kinds["PrometheusRule"][0]["spec"]["groups"] == alerts["groups"],
      "production: the PrometheusRule carries files/alerts.yaml")
check(kinds["PrometheusRule"][0]["metadata"]["labels"].get("release") == "kube-prometheus-stack",
      "production: the PrometheusRule has the labels Prometheus selects on")
dashboards = [d for d in kinds["ConfigMap"] if d["metadata"]["name"].endswith("-dashboard")]
check(len(dashboards) == 1 and dashboards[0]["metadata"]["labels"].get("grafana_dashboard") == "1",
      "production: the dashboard ConfigMap has the sidecar's label")
check(json.loads(dashboards[0]["data"]["keywarden.json"]) == json.loads((CHART / "files" / "dashboard.json").read_text()),
      "production: the dashboard ConfigMap carries files/dashboard.json")
check("replicas" not in kinds["Deployment"][0]["spec"], "production: the HPA owns the replica count")
env = {e["name"] for e in kinds["Deployment"][0]["spec"]["template"]["spec"]["containers"][0]["env"]}
config = kinds["ConfigMap"][0]["data"]
check("Certificate" in kinds and kinds["Certificate"][0]["spec"]["issuerRef"]["name"] == "platform-internal-ca",
      "production: cert-manager issues the serving certificate")
check("KEYWARDEN_TLS_CLIENT_CA_FILE" in config and "spiffe://cluster.local/ns/billing/sa/invoice" in config["KEYWARDEN_VERIFY_CALLERS"],
      "production: mTLS with allowed verify callers")
check(config.get("KEYWARDEN_OUTCOME_REPORTERS") == "spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway",
      "production: only the gateway reports outcomes")
pod = kinds["Deployment"][0]["spec"]["template"]["spec"]
crl_mounts = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "client-crl"]
check(config.get("KEYWARDEN_TLS_CLIENT_CRL_FILE") == "/etc/keywarden/client-crl/ca.crl"
      and crl_mounts and crl_mounts[0]["mountPath"] == "/etc/keywarden/client-crl"
      and any(v["name"] == "client-crl" and v["secret"]["secretName"] == "platform-internal-ca-crl" for v in pod["volumes"]),
      "production: the client CRL is mounted where KEYWARDEN_TLS_CLIENT_CRL_FILE points")
check("db-ca" in {v["name"] for v in kinds["Deployment"][0]["spec"]["template"]["spec"]["volumes"]},
      "production: the database CA is mounted for sslmode=verify-full")
check(kinds["ConfigMap"][0]["data"]["OTEL_EXPORTER_OTLP_ENDPOINT"].startswith("http://otel-collector"), "production: OTLP endpoint configured")
check("deployment.environment=production" in kinds["ConfigMap"][0]["data"]["OTEL_RESOURCE_ATTRIBUTES"], "production: resource attributes")

# The memory check itself rejects a budget that cannot fit.
fits, why = memory_fits(by_kind(render(merged(trial, {"config": {"cacheMaxKeys": 1_000_000}}), "oversized-cache")), "oversized-cache")
check(not fits, f"the memory check accepts 1M cached keys in 512 MiB: {why}")

# Bad values fail at install time (values.schema.json).
for bad, why in [
    ({"replicaCount": "three"}, "replicaCount must be an integer"),
    ({"replicasCount": 3}, "unknown keys are rejected"),
    ({"config": {"auditOverflow": "sometimes"}}, "auditOverflow is an enum"),
    ({"secrets": {"databaseUrl": "mysql://db"}}, "the database must be PostgreSQL"),
    ({"service": {"grpcPort": 70000}}, "ports are bounded"),
    ({"config": {"cacheMaxKeys": 0}}, "the cache holds at least one key"),
    ({"allowPlaintext": False}, "no TLS needs an explicit plaintext opt-in"),
    ({"tls": {"clientCa": {"existingSecret": "ca"}}}, "mTLS needs a server certificate"),
    ({"tls": {"existingSecret": "tls"}, "service": {"healthPort": 0}}, "TLS needs the plaintext health port for probes"),
    ({"tls": {"existingSecret": "tls", "clientCa": {"existingSecret": "ca"}}, "operatorIdentities": [{"identity": "x", "role": "root"}]},
     "operator roles are an enum"),
    ({"tls": {"certManager": {"enabled": True}}}, "cert-manager needs an issuer"),
    ({"tls": {"existingSecret": "tls", "clientCrl": {"existingSecret": "crl"}}}, "a CRL needs mTLS"),
    ({"tls": {"existingSecret": "tls", "outcomeReporters": ["spiffe://x"]}}, "outcome reporters need mTLS"),
    ({"secrets": {"pepper": ""}}, "no pepper and no existingSecret"),
    ({"secrets": {"adminToken": ""}}, "no admin token and no existingSecret"),
    ({"redis": {"url": "redis://redis:6379"}}, "Redis without a fleet secret"),
    ({"redis": {"url": "redis://:hunter2@redis:6379"}, "secrets": {"fleetSecret": "F" * 40}},
     "a password in the Redis URL (it belongs in a Secret)"),
    ({"secrets": {"fleetSecret": "short"}}, "a fleet secret under 32 bytes"),
    ({"redis": {"onRedisFailure": "ignore"}}, "an unknown rate-limit failure mode"),
]:
    try:
        # On top of a trial's secrets, so that only the bad value is wrong.
        Chart.load(CHART).render(merged(trial, bad), name="keywarden", namespace="payments", is_install=True)
        check(False, f"schema accepted bad values: {why}")
    except HelmError as e:
        print(f"rejected as expected ({why}): {str(e).splitlines()[0][:120]}")

if failures:
    print(f"\n{len(failures)} chart check(s) failed")
    sys.exit(1)
print("\nchart: lint, render, strict schema validation and promises all pass")
