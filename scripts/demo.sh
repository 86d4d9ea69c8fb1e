#!/usr/bin/env bash
# The main job: a private NATS server, one Krest scheduler (SQLite), two demo workers with
# weights 2 and 1, the seed's two demo jobs plus a flaky and a broken one (retries and failures
# to look at); then follows runs until ctrl-c and stops everything it started.
#
# State (NATS store, SQLite database, logs) stays in the state directory between runs, so
# history accumulates; `scripts/demo.sh --fresh` starts from nothing.
#
# Environment: KREST_DEMO_PORT (NATS port, default 4333; the next free one if taken),
# KREST_DEMO_HTTP_PORT (the scheduler's health port, default 8722; likewise),
# KREST_DEMO_DIR (state, default .demo).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${KREST_DEMO_DIR:-.demo}"
export PATH="$PATH:/usr/sbin"

fresh=0
for arg in "$@"; do
  case "$arg" in
    --fresh) fresh=1 ;;
    -h | --help)
      sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
      exit 0
      ;;
    *)
      echo "unknown argument: $arg (use --fresh to start from an empty state)" >&2
      exit 2
      ;;
  esac
done

# The first port from $1 on that nothing listens on.
free_port() {
  local port=$1
  while (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
    port=$((port + 1))
  done
  echo "$port"
}

scripts/ensure-nats-server.sh
echo "building (the first build takes a few minutes)..." >&2
cargo build --bins --quiet

if [[ $fresh == 1 ]]; then
  rm -rf "$DIR"
fi
mkdir -p "$DIR"
PORT=$(free_port "${KREST_DEMO_PORT:-4333}")
HTTP_PORT=$(free_port "${KREST_DEMO_HTTP_PORT:-8722}")
[[ $PORT == "${KREST_DEMO_PORT:-4333}" ]] || echo "port ${KREST_DEMO_PORT:-4333} is taken: NATS listens on $PORT" >&2
[[ $HTTP_PORT == "${KREST_DEMO_HTTP_PORT:-8722}" ]] || echo "port ${KREST_DEMO_HTTP_PORT:-8722} is taken: the scheduler's health endpoint listens on $HTTP_PORT" >&2

# Services run in their own sessions so a ctrl-c reaches only this script; it then stops them
# in order: workers (finishing their runs), scheduler, NATS.
pids=()
names=()
watch_pid=""
watchdog_pid=""
cleanup() {
  trap - EXIT INT TERM
  [[ -n $watchdog_pid ]] && kill "$watchdog_pid" 2>/dev/null
  [[ -n $watch_pid ]] && kill "$watch_pid" 2>/dev/null
  echo >&2
  echo "stopping workers, scheduler and NATS..." >&2
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    kill -TERM "${pids[i]}" 2>/dev/null || true
    wait "${pids[i]}" 2>/dev/null || true
  done
  echo "stopped; logs and the SQLite database are in $DIR/ (kept for the next start; --fresh wipes them)" >&2
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start NAME COMMAND...: runs COMMAND in the background, its output in $DIR/NAME.log.
start() {
  local name=$1
  shift
  setsid "$@" >"$DIR/$name.log" 2>&1 &
  pids+=($!)
  names+=("$name")
}

# True, after printing the end of its log, when a service is no longer running.
service_stopped() {
  for i in "${!pids[@]}"; do
    if ! kill -0 "${pids[i]}" 2>/dev/null; then
      echo >&2
      echo "error: ${names[i]} stopped; the end of $DIR/${names[i]}.log:" >&2
      tail -n 15 "$DIR/${names[i]}.log" | sed 's/^/  | /' >&2
      return 0
    fi
  done
  return 1
}

# Exits (stopping the rest) when a service stopped.
check_alive() {
  if service_stopped; then
    exit 1
  fi
}

start nats nats-server -a 127.0.0.1 -p "$PORT" -js -sd "$DIR/nats"
export NATS_URL="nats://127.0.0.1:$PORT"
for _ in $(seq 1 100); do
  (echo >"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
  check_alive
  sleep 0.1
done

# The console's login token: kept with the state, so a restarted demo keeps it.
if [[ ! -s "$DIR/api-token" ]]; then
  head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$DIR/api-token"
fi
export KREST_API_TOKEN="${KREST_API_TOKEN:-$(cat "$DIR/api-token")}"
start scheduler target/debug/krest scheduler --db "sqlite://$DIR/krest.db" --node demo-scheduler --http "127.0.0.1:$HTTP_PORT"
start worker-1 target/debug/krest-demo-worker --weight 2 --instance demo-worker-1
start worker-2 target/debug/krest-demo-worker --weight 1 --instance demo-worker-2

ready=0
for _ in $(seq 1 150); do
  check_alive
  if target/debug/krest cluster status >/dev/null 2>&1; then
    ready=1
    break
  fi
  sleep 0.2
done
if [[ $ready == 0 ]]; then
  echo "error: the scheduler did not answer within 30 s; see $DIR/scheduler.log" >&2
  exit 1
fi
target/debug/krest job apply -f examples/jobs/demo-job2-sharding.json -f examples/jobs/demo-job3-post.json \
  -f examples/demo/flaky.json -f examples/demo/broken.json

cat >&2 <<TIPS

Krest is running: NATS on $NATS_URL, scheduler + 2 workers, logs in $DIR/.
Web console: http://127.0.0.1:$HTTP_PORT/ (log in with the token $KREST_API_TOKEN)
In another terminal:
  export NATS_URL=$NATS_URL PATH="$PWD/target/debug:\$PATH"
  krest job list           krest runs list           krest runs list --status FAILED
  krest workers list       krest cluster status      krest runs get RUN_ID
  krest job trigger demo-job3 --args '"hi"' --wait   krest job delete demo-broken
Following runs as they happen; ctrl-c stops everything.

TIPS
target/debug/krest runs watch &
watch_pid=$!
# A service that stops ends the demo with its log on this terminal.
(
  until service_stopped 2>/dev/null; do
    sleep 1
  done
  kill "$watch_pid" 2>/dev/null
) &
watchdog_pid=$!
wait "$watch_pid" || true
watch_pid=""
check_alive
