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
PORT="${CONCLAVE_PG_PORT:-54329}"
DSN="postgresql://conclave@127.0.0.1:$PORT/postgres"
# A second run (or a developer's earlier one) finds the cluster already up: reuse it rather than
# failing on the busy port.
if "$BIN/pg_isready" -q -h 127.0.0.1 -p "$PORT"; then
    echo "export CONCLAVE_PG_DSN=$DSN" > postgres.env
    exit 0
fi
PGDATA="$(mktemp -d)/pgdata"
mkdir -p "$PGDATA"
# PostgreSQL refuses to run as root: as root, run it as the postgres user the package created.
as_db_user() {
    if [ "$(id -u)" = 0 ]; then su postgres -c "$1"; else sh -c "$1"; fi
}
if [ "$(id -u)" = 0 ]; then chown postgres:postgres "$(dirname "$PGDATA")" "$PGDATA"; fi
as_db_user "$BIN/initdb -D $PGDATA -A trust -U conclave >/dev/null"
as_db_user "$BIN/pg_ctl -D $PGDATA -o '-h 127.0.0.1 -p $PORT -k /tmp' -l $PGDATA/log -w start >/dev/null"
echo "export CONCLAVE_PG_DSN=$DSN" > postgres.env
