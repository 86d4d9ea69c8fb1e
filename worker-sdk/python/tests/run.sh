#!/usr/bin/env bash
# The Python worker SDK's checks: a venv with nats-py (with its nkeys extra), pytest,
# pytest-asyncio, pytest-timeout and mypy from PyPI and the package installed from this
# directory, then `mypy --strict` on the package and the example, then pytest (end-to-end tests against a real
# nats-server and `krest scheduler`).
#
# The `krest` binary is $KREST_BIN, default $CARGO_TARGET_DIR/debug/krest (built with
# `cargo build -p krest` when missing). The venv is $KREST_PY_VENV, default
# $CARGO_TARGET_DIR/python-venv (kept between runs). Extra arguments go to pytest.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
repo="$(cd "$here/../.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target}"
export KREST_BIN="${KREST_BIN:-$CARGO_TARGET_DIR/debug/krest}"
export PATH="$PATH:/usr/sbin"
venv="${KREST_PY_VENV:-$CARGO_TARGET_DIR/python-venv}"
if [ ! -x "$KREST_BIN" ]; then
  (cd "$repo" && cargo build --quiet -p krest)
fi
if [ ! -x "$venv/bin/python" ]; then
  if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    # Debian splits venv support out of python3.
    echo "python3 cannot make venvs: installing python3-venv with apt-get" >&2
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv >/dev/null
  fi
  python3 -m venv "$venv"
fi
# Through the venv's python, not its pip/mypy scripts: a venv copied to another path keeps
# scripts whose #! names the old one (and would install into it).
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "nats-py[nkeys]" pytest pytest-asyncio pytest-timeout mypy
# A fresh install of the package as users get it (not editable).
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps "$here"
# Python 3.10 is the oldest supported: type-checked against 3.10's standard library (typeshed's
# version markers reject asyncio.TaskGroup, asyncio.timeout, ExceptionGroup, except*,
# typing.Self, datetime.UTC, ... on 3.10), whatever Python runs this; and against this one.
"$venv/bin/python" -m mypy --strict --python-version 3.10 --no-incremental --cache-dir=/dev/null "$here/src/krest_worker" "$repo/examples/python-worker/worker.py"
running="$("$venv/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
"$venv/bin/python" -m mypy --strict --python-version "$running" --no-incremental --cache-dir=/dev/null "$here/src/krest_worker" "$repo/examples/python-worker/worker.py"
cd "$here"
# A test that hangs (a worker that never stops, say) fails its whole pytest process after
# 5 minutes, with every thread's stack, instead of hanging CI: no test takes a minute.
bound=(--timeout 300 --timeout-method thread)
# Two pytest processes at once (each with its own nats-server and scheduler): the tests mostly
# wait on runs, so this halves the wall time.
conformance_log="$(mktemp)"
trap 'rm -f "$conformance_log"' EXIT
"$venv/bin/python" -m pytest -q -p no:cacheprovider "${bound[@]}" "$@" tests/test_conformance.py tests/test_secure.py >"$conformance_log" 2>&1 &
conformance=$!
status=0
"$venv/bin/python" -m pytest -q -p no:cacheprovider "${bound[@]}" "$@" --ignore=tests/test_conformance.py --ignore=tests/test_secure.py tests || status=$?
conformance_status=0
wait "$conformance" || conformance_status=$?
echo "--- the conformance suite and the login tests (tests/test_conformance.py, tests/test_secure.py)"
cat "$conformance_log"
# pytest exits 5 when a -k selects nothing in one of the two.
for s in "$status" "$conformance_status"; do
  if [ "$s" != 0 ] && [ "$s" != 5 ]; then exit "$s"; fi
done
