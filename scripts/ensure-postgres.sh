#!/usr/bin/env bash
# Makes sure a PostgreSQL server answers on 127.0.0.1:5432 as user postgres without a password:
# starts the installed cluster, or installs Debian's postgresql package first, and allows
# trust authentication on loopback (test machines only).
set -euo pipefail

PGHOST=127.0.0.1
PGPORT=5432

answers() {
  command -v psql >/dev/null 2>&1 &&
    psql -h "$PGHOST" -p "$PGPORT" -U postgres -d postgres -Atqc 'select 1' >/dev/null 2>&1
}

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

# The end-to-end tests run two at a time, each starting proxies, serve and control processes
# with a pool per store: PostgreSQL's default of 100 connections ran out ("too many clients",
# seen by a test as a pool timeout). Raised once; the setting needs a restart.
CONNECTIONS=300
enough_connections() {
  local have
  have=$(psql -h "$PGHOST" -p "$PGPORT" -U postgres -d postgres -Atqc 'show max_connections')
  if [ "$have" -ge "$CONNECTIONS" ]; then
    return 0
  fi
  echo "ensure-postgres: raising max_connections from $have to $CONNECTIONS (restarts PostgreSQL)" >&2
  psql -h "$PGHOST" -p "$PGPORT" -U postgres -d postgres -Atqc "ALTER SYSTEM SET max_connections = $CONNECTIONS" >/dev/null
  local version
  version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)
  if [ -z "$version" ] || ! command -v pg_ctlcluster >/dev/null 2>&1; then
    echo "ensure-postgres: cannot restart this PostgreSQL (not a Debian cluster): restart it to apply max_connections" >&2
    return 0
  fi
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" main restart
  for _ in $(seq 1 60); do
    if answers; then
      return 0
    fi
    sleep 1
  done
  echo "ensure-postgres: PostgreSQL did not come back after the restart" >&2
  return 1
}

if answers; then
  enough_connections
  exit 0
fi

if ! command -v pg_ctlcluster >/dev/null 2>&1; then
  echo "ensure-postgres: installing postgresql from the distribution" >&2
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq postgresql >/dev/null
fi

version=$(ls /etc/postgresql | sort -V | tail -n 1)
if [ -z "$version" ]; then
  as_root pg_createcluster 15 main
  version=15
fi
hba=/etc/postgresql/$version/main/pg_hba.conf
if ! as_root grep -qE '^host\s+all\s+all\s+127\.0\.0\.1/32\s+trust' "$hba"; then
  echo "ensure-postgres: allowing trust authentication on loopback in $hba" >&2
  as_root sed -i -E 's/^(host\s+all\s+all\s+(127\.0\.0\.1\/32|::1\/128)\s+)\S+/\1trust/' "$hba"
  as_root sed -i -E 's/^(local\s+all\s+(postgres|all)\s+)\S+/\1trust/' "$hba"
fi
as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start 2>/dev/null ||
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" main reload 2>/dev/null || true

for _ in $(seq 1 60); do
  if answers; then
    echo "ensure-postgres: PostgreSQL $version is up on $PGHOST:$PGPORT" >&2
    enough_connections
    exit 0
  fi
  sleep 1
done
echo "ensure-postgres: PostgreSQL did not come up on $PGHOST:$PGPORT" >&2
exit 1
