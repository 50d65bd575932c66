#!/usr/bin/env bash
# Install what the high-availability suite (tests/ha, `make ha`) needs:
#   - etcd (Debian's etcd-server: the `etcd` binary, v3 API), the DCS for Patroni;
#   - HAProxy (Debian's haproxy), the leader-aware proxy of deploy/haproxy/;
#   - Patroni 4 from PyPI in its own venv (.venv-ha): Debian ships Patroni 3.0, which has
#     no `synchronous_mode: quorum`; its own venv because its pins are not ours.
# PostgreSQL server binaries come from scripts/ensure-postgres.sh (Debian's postgresql).
#
# Idempotent; the packages' system services are kept from starting (policy-rc.d) and
# disabled, because the tests run their own processes on free loopback ports.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DOVECOTE_HA_VENV:-$ROOT/.venv-ha}"
# Patroni runs as the postgres user: its venv needs an interpreter that user can reach
# (not one under /root, as pyenv's is), so the system python3 when there is one.
PYTHON="${HA_PYTHON:-$( [ -x /usr/bin/python3 ] && echo /usr/bin/python3 || command -v python3)}"
PATRONI_SPEC="${PATRONI_SPEC:-patroni[etcd3]>=4.0,<5}"
PSYCOPG_SPEC="${PSYCOPG_SPEC:-psycopg[binary]>=3.1}"

say() { echo "install-ha: $*" >&2; }

need_apt=()
command -v etcd >/dev/null 2>&1 || need_apt+=(etcd-server)
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || need_apt+=(haproxy)

if [ "${#need_apt[@]}" -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        say "missing ${need_apt[*]}; install with: sudo apt-get install ${need_apt[*]}"
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    POLICY=/usr/sbin/policy-rc.d
    if [ ! -e "$POLICY" ]; then
        printf '#!/bin/sh\nexit 101\n' > "$POLICY"
        chmod 0755 "$POLICY"
        trap 'rm -f "$POLICY"' EXIT
    fi
    apt-cache show "${need_apt[@]}" >/dev/null 2>&1 || apt-get update -qq
    apt-get install -y --no-install-recommends "${need_apt[@]}" \
        || { apt-get update -qq && apt-get install -y --no-install-recommends "${need_apt[@]}"; }
    for svc in etcd haproxy; do
        update-rc.d "$svc" disable >/dev/null 2>&1 || true
    done
fi
# A package's service may have started before policy-rc.d existed (or on an older
# install): the tests never use it, and etcd's would hold 2379.
for pidfile in /run/haproxy.pid; do
    [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
done

if [ ! -x "$VENV/bin/patroni" ] || ! "$VENV/bin/python" -c 'import psycopg' 2>/dev/null \
        || [ "$(readlink -f "$VENV/bin/python")" != "$(readlink -f "$PYTHON")" ]; then
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q "$PATRONI_SPEC" "$PSYCOPG_SPEC"
fi

say "etcd $(etcd --version 2>/dev/null | head -n 1 | awk '{print $3}'), \
$(/usr/sbin/haproxy -v 2>/dev/null | head -n 1 | awk '{print $1, $3}'), \
patroni $("$VENV/bin/patroni" --version 2>/dev/null | awk '{print $2}')"
