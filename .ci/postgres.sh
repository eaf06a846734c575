#!/usr/bin/env bash
# Installs PostgreSQL from Debian's packages and starts a throwaway cluster on 127.0.0.1.
# Writes the DSN to .ci/postgres.env as CONCLAVE_PG_DSN.
set -euo pipefail
cd "$(dirname "$0")"
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq postgresql >/dev/null
fi
BIN="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"
PGDATA="$(mktemp -d)/pgdata"
PORT="${CONCLAVE_PG_PORT:-54329}"
mkdir -p "$PGDATA"
chown postgres:postgres "$(dirname "$PGDATA")" "$PGDATA"
su postgres -c "$BIN/initdb -D $PGDATA -A trust -U conclave >/dev/null"
su postgres -c "$BIN/pg_ctl -D $PGDATA -o '-h 127.0.0.1 -p $PORT -k /tmp' -l $PGDATA/log -w start >/dev/null"
echo "export CONCLAVE_PG_DSN=postgresql://conclave@127.0.0.1:$PORT/postgres" > postgres.env
