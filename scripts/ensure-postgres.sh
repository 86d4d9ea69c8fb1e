#!/usr/bin/env bash
# Makes sure the PostgreSQL server the tests use answers: $KREST_TEST_POSTGRES (default
# postgres://postgres@127.0.0.1:5432/postgres; the tests create and drop their own krest_test_*
# databases through it). When it does not: installs Debian's postgresql (apt-get) if missing,
# creates and starts the cluster, and lets local TCP connections in without a password (trust,
# for tests on this machine). Idempotent: does nothing when the server already answers.
set -euo pipefail
url="${KREST_TEST_POSTGRES:-postgres://postgres@127.0.0.1:5432/postgres}"
answers() { psql "$url" -Atqc 'SELECT 1' >/dev/null 2>&1; }
if command -v psql >/dev/null 2>&1 && answers; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "error: PostgreSQL does not answer at $url, and installing it needs root and apt-get." >&2
  echo "       Start a server (apt-get install postgresql; pg_ctlcluster 15 main start) or set KREST_TEST_POSTGRES." >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
if ! command -v pg_ctlcluster >/dev/null 2>&1 || ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
  echo "installing postgresql (apt-get)" >&2
  apt-get install -y -qq postgresql >/dev/null \
    || { apt-get update -qq >/dev/null && apt-get install -y -qq postgresql >/dev/null; }
fi
version=$(ls /usr/lib/postgresql | sort -V | tail -1)
if [ -z "$(pg_lsclusters -h 2>/dev/null)" ]; then
  pg_createcluster "$version" main >/dev/null
fi
pg_lsclusters -h | while read -r ver name _port status _rest; do
  if [ "$status" != online ]; then
    echo "starting PostgreSQL cluster $ver/$name" >&2
    pg_ctlcluster "$ver" "$name" start
  fi
done
if ! answers; then
  # Let the tests' local TCP connections in without a password.
  hba=$(runuser -u postgres -- psql -Atqc 'SHOW hba_file')
  if ! grep -q '^host all all 127.0.0.1/32 trust' "$hba"; then
    echo "allowing local TCP connections (trust) in $hba" >&2
    sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
    runuser -u postgres -- psql -Atqc 'SELECT pg_reload_conf()' >/dev/null
  fi
fi
for _ in $(seq 1 30); do
  answers && exit 0
  sleep 1
done
echo "error: PostgreSQL still does not answer at $url (see /var/log/postgresql/)" >&2
exit 1
