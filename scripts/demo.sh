#!/usr/bin/env bash
# The main job: a private NATS server, one Krest scheduler (SQLite), two demo workers with
# weights 2 and 1, the seed's two demo jobs applied; then follows runs until ctrl-c and stops
# everything it started.
#
# Environment: KREST_DEMO_PORT (NATS port, default 4333), KREST_DEMO_DIR (state, default .demo).
set -euo pipefail
cd "$(dirname "$0")/.."
PORT="${KREST_DEMO_PORT:-4333}"
DIR="${KREST_DEMO_DIR:-.demo}"
export PATH="$PATH:/usr/sbin"

scripts/ensure-nats-server.sh
echo "building (the first build takes a few minutes)..." >&2
cargo build --bins --quiet

rm -rf "$DIR"
mkdir -p "$DIR"
# Services run in their own sessions so a ctrl-c reaches only the foreground `runs watch`;
# this script then stops them in order: workers (finishing their runs), scheduler, NATS.
pids=()
cleanup() {
  trap - EXIT INT TERM
  echo >&2
  echo "stopping workers, scheduler and NATS..." >&2
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    kill -TERM "${pids[i]}" 2>/dev/null || true
    wait "${pids[i]}" 2>/dev/null || true
  done
  echo "stopped; logs and the SQLite database are in $DIR/" >&2
}
trap cleanup EXIT INT TERM

setsid nats-server -a 127.0.0.1 -p "$PORT" -js -sd "$DIR/nats" >"$DIR/nats.log" 2>&1 &
pids+=($!)
export NATS_URL="nats://127.0.0.1:$PORT"
for _ in $(seq 1 100); do
  (echo >"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
  sleep 0.1
done

setsid target/debug/krest scheduler --db "sqlite://$DIR/krest.db" --node demo-scheduler >"$DIR/scheduler.log" 2>&1 &
pids+=($!)
setsid target/debug/krest-demo-worker --weight 2 --instance demo-worker-1 >"$DIR/worker-1.log" 2>&1 &
pids+=($!)
setsid target/debug/krest-demo-worker --weight 1 --instance demo-worker-2 >"$DIR/worker-2.log" 2>&1 &
pids+=($!)

for _ in $(seq 1 100); do
  target/debug/krest cluster status >/dev/null 2>&1 && break
  sleep 0.2
done
target/debug/krest job apply -f examples/jobs/demo-job2-sharding.json -f examples/jobs/demo-job3-post.json

cat >&2 <<TIPS

Krest is running: NATS on $NATS_URL, scheduler + 2 workers, logs in $DIR/.
In another terminal (NATS_URL=$NATS_URL):
  target/debug/krest job list          target/debug/krest runs list
  target/debug/krest workers list      target/debug/krest cluster status
  target/debug/krest runs get RUN_ID   target/debug/krest job trigger demo-job3 --args '"hi"'
Following runs as they happen; ctrl-c stops everything.

TIPS
target/debug/krest runs watch || true
