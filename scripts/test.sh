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
# The run-query benchmark (benches run only by `cargo bench`) at a tiny size, unoptimized: it
# keeps compiling, and its answers are checked against its generator on both backends.
KREST_BENCH_N=1000 cargo test --quiet -p krest --bench queries
