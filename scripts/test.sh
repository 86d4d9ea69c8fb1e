#!/usr/bin/env bash
# The test suite: formatting, lints, then every test of the workspace. Tests start their own
# nats-server processes (free ports, temporary stores) and create their own databases on the
# PostgreSQL server that scripts/ensure-postgres.sh makes sure runs.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/sbin"
scripts/ensure-nats-server.sh
scripts/ensure-postgres.sh
scripts/ensure-chromium.sh
scripts/check-deploy.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo test --workspace --quiet
# Every benchmark once at a tiny size, so its code cannot rot (the figures are in
# BENCHMARKS.md, from release builds at full size).
KREST_BENCH_TINY=1 cargo test -p krest --benches --quiet
# The Python worker SDK: mypy --strict, unit tests, and end-to-end tests against the `krest`
# binary the workspace tests just built (a venv with nats-py and pytest from PyPI).
worker-sdk/python/tests/run.sh
