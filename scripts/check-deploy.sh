#!/usr/bin/env bash
# Validates the deployment files that cannot run here (no container engine): docker-compose.yml
# with `docker-compose config` (Debian's docker-compose, installed when missing) and the
# schedulers' shared, health-gated Postgres, and the Kubernetes example's YAML (parsed, with the
# probes and settings a scheduler needs, the database URL from a Secret).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v docker-compose >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing docker-compose (apt-get)" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null \
      || { apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null; }
  fi
fi
if command -v docker-compose >/dev/null 2>&1; then
  docker-compose -f docker-compose.yml config -q
  echo "docker-compose.yml: valid" >&2
else
  echo "error: docker-compose is missing and cannot be installed (needs root and apt-get)" >&2
  exit 1
fi
python3 - <<'PY'
import sys, yaml
compose = yaml.safe_load(open("docker-compose.yml"))["services"]
pg = compose["postgres"]
assert "pg_isready" in pg["healthcheck"]["test"], "postgres health check"
for name in ("scheduler-1", "scheduler-2"):
    s = compose[name]
    assert s["environment"]["KREST_DB"].startswith("postgres://"), (name, "KREST_DB")
    assert "@postgres:" in s["environment"]["KREST_DB"], (name, "KREST_DB host")
    assert s["depends_on"]["postgres"]["condition"] == "service_healthy", (name, "health-gated")
print("docker-compose.yml: schedulers share the health-gated postgres", file=sys.stderr)
docs = [d for d in yaml.safe_load_all(open("examples/kubernetes/krest.yaml")) if d]
kinds = {(d["kind"], d["metadata"]["name"]): d for d in docs}
sched = kinds[("Deployment", "krest-scheduler")]["spec"]["template"]["spec"]
c = sched["containers"][0]
assert c["livenessProbe"]["httpGet"]["path"] == "/healthz", "liveness probe"
assert c["readinessProbe"]["httpGet"]["path"] == "/readyz", "readiness probe"
env = {e["name"] for e in c["env"]}
assert {"NATS_URL", "KREST_NODE", "KREST_DB", "KREST_HTTP"} <= env, env
db = next(e for e in c["env"] if e["name"] == "KREST_DB")
assert db["valueFrom"]["secretKeyRef"]["key"] == "KREST_DB", "KREST_DB from a Secret"
assert sched["securityContext"]["runAsNonRoot"] is True
assert ("Deployment", "krest-demo-worker") in kinds
print("examples/kubernetes/krest.yaml: valid", file=sys.stderr)
PY
