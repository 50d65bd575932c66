#!/usr/bin/env bash
# Make a PostgreSQL server available for the tests and write .test-env in the repo root:
#   export DOVECOTE_TEST_POSTGRES=postgresql://postgres@127.0.0.1:<port>/postgres
#
# 1. A server on 127.0.0.1:5432 that lets user postgres in without a password: use it.
# 2. Otherwise a throwaway cluster (initdb, trust auth, 127.0.0.1 only) on a free port in
#    $DOVECOTE_PG_DIR, run as a non-root user; PostgreSQL is installed with apt-get when
#    we are root and it is missing. Running this again reuses (or restarts) that cluster.
#
#   bash scripts/ensure-postgres.sh         ensure and write .test-env
#   bash scripts/ensure-postgres.sh stop    stop the throwaway cluster (if any)
#
# Overrides: PGHOST_CHECK / PGPORT_CHECK (the server to try first, default
# 127.0.0.1:5432), DOVECOTE_PG_DIR (throwaway cluster home), DOVECOTE_PG_USER (OS user
# that runs it when we are root, default postgres).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ENV_FILE="$ROOT/.test-env"
CHECK_HOST="${PGHOST_CHECK:-127.0.0.1}"
CHECK_PORT="${PGPORT_CHECK:-5432}"
PG_DIR="${DOVECOTE_PG_DIR:-${TMPDIR:-/tmp}/dovecote-test-postgres}"
RUN_USER="${DOVECOTE_PG_USER:-postgres}"

say() { echo "ensure-postgres: $*" >&2; }

pg_bin() {
    # Newest installed server binaries (Debian layout), else whatever is on PATH.
    local dir
    dir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
    if [ -n "$dir" ] && [ -x "$dir/$1" ]; then
        echo "$dir/$1"
    elif command -v "$1" >/dev/null 2>&1; then
        command -v "$1"
    fi
}

answers() {  # host port: accepting connections and user postgres gets in without password
    local isready psql
    isready="$(pg_bin pg_isready)"
    psql="$(pg_bin psql)"
    [ -n "$isready" ] && [ -n "$psql" ] || return 1
    "$isready" -q -h "$1" -p "$2" -t 3 || return 1
    PGPASSWORD= PGCONNECT_TIMEOUT=3 "$psql" -X -q -w -h "$1" -p "$2" -U postgres -d postgres \
        -c 'SELECT 1' >/dev/null 2>&1
}

write_env() {  # host port
    local url="postgresql://postgres@$1:$2/postgres"
    printf 'export DOVECOTE_TEST_POSTGRES=%s\n' "$url" >"$ENV_FILE.tmp"
    mv "$ENV_FILE.tmp" "$ENV_FILE"
    say "using $url (written to $ENV_FILE)"
}

as_owner() {  # run a command as the cluster's owner (never root: initdb refuses it)
    if [ "$(id -u)" -eq 0 ]; then
        (cd "$PG_DIR" && runuser -u "$RUN_USER" -- "$@")
    else
        "$@"
    fi
}

free_port() {
    python3 - <<'EOF'
import socket
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    print(s.getsockname()[1])
EOF
}

install_postgres() {
    if [ -n "$(pg_bin initdb)" ]; then
        return
    fi
    if [ "$(id -u)" -ne 0 ]; then
        say "no PostgreSQL server binaries and not root: install the 'postgresql' package"
        exit 1
    fi
    say "installing postgresql with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q postgresql >/dev/null
    [ -n "$(pg_bin initdb)" ] || { say "initdb still missing after install"; exit 1; }
}

ensure_user() {
    [ "$(id -u)" -eq 0 ] || return 0
    if ! id -u "$RUN_USER" >/dev/null 2>&1; then
        say "creating system user $RUN_USER"
        useradd --system --home-dir "$PG_DIR" --shell /usr/sbin/nologin "$RUN_USER"
    fi
}

stop_cluster() {
    local pg_ctl
    pg_ctl="$(pg_bin pg_ctl)"
    if [ -n "$pg_ctl" ] && [ -f "$PG_DIR/data/postmaster.pid" ]; then
        as_owner "$pg_ctl" -D "$PG_DIR/data" -m fast -w stop >/dev/null
        say "stopped the throwaway cluster in $PG_DIR"
    fi
}

start_cluster() {
    install_postgres
    ensure_user
    local initdb pg_ctl port
    initdb="$(pg_bin initdb)"
    pg_ctl="$(pg_bin pg_ctl)"
    mkdir -p "$PG_DIR"
    if [ "$(id -u)" -eq 0 ]; then
        chown "$RUN_USER" "$PG_DIR"
    fi
    chmod 700 "$PG_DIR"

    if [ ! -f "$PG_DIR/data/PG_VERSION" ]; then
        rm -rf "$PG_DIR/data"
        say "initdb in $PG_DIR/data"
        as_owner "$initdb" -D "$PG_DIR/data" -U postgres --auth=trust -E UTF8 \
            --locale=C >"$PG_DIR/initdb.log" 2>&1 \
            || { cat "$PG_DIR/initdb.log" >&2; exit 1; }
    fi

    port="$(cat "$PG_DIR/port" 2>/dev/null || true)"
    if [ -n "$port" ] && answers 127.0.0.1 "$port"; then
        write_env 127.0.0.1 "$port"
        return
    fi
    # Not running (or its port was taken meanwhile): start on a free port.
    if as_owner "$pg_ctl" -D "$PG_DIR/data" status >/dev/null 2>&1; then
        as_owner "$pg_ctl" -D "$PG_DIR/data" -m fast -w stop >/dev/null || true
    fi
    port="$(free_port)"
    echo "$port" >"$PG_DIR/port"
    say "starting a throwaway cluster on 127.0.0.1:$port"
    as_owner "$pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/server.log" -w -t 60 \
        -o "-p $port -c listen_addresses=127.0.0.1 -k $PG_DIR -c max_connections=200" \
        start >/dev/null || { tail -n 30 "$PG_DIR/server.log" >&2; exit 1; }
    answers 127.0.0.1 "$port" || { say "cluster started but does not answer"; exit 1; }
    write_env 127.0.0.1 "$port"
}

case "${1:-ensure}" in
    stop)
        stop_cluster
        ;;
    ensure)
        if answers "$CHECK_HOST" "$CHECK_PORT"; then
            write_env "$CHECK_HOST" "$CHECK_PORT"
        else
            say "nothing usable on $CHECK_HOST:$CHECK_PORT"
            start_cluster
        fi
        ;;
    *)
        echo "usage: $0 [ensure|stop]" >&2
        exit 2
        ;;
esac
