#!/bin/sh
# Render deploy/nginx/{nginx.conf,dovecote.conf} into OUTDIR, replacing their placeholders.
#
#   DOVECOTE_UPSTREAMS="10.0.1.11:8080 10.0.1.12:8080" \
#   SERVER_NAME=relay.example.com \
#   TLS_CERT=/etc/letsencrypt/live/relay.example.com/fullchain.pem \
#   TLS_KEY=/etc/letsencrypt/live/relay.example.com/privkey.pem \
#   deploy/nginx/render.sh /etc/nginx/dovecote
#
# Variables (defaults in brackets):
#   DOVECOTE_UPSTREAMS  instances as HOST:PORT, separated by spaces or commas (required)
#   MAX_FAILS [3], FAIL_TIMEOUT [10s]   passive health check per instance
#   LISTEN_PORT [443]   HTTPS port          HTTP_PORT [80]  redirect-only port
#   SERVER_NAME [_]     server_name         LISTEN_IPV6 [1] 0 drops the [::] listen lines
#   TLS_CERT, TLS_KEY   [/etc/ssl/dovecote/fullchain.pem, /etc/ssl/dovecote/privkey.pem]
#   PREFIX [OUTDIR]     pid, error log, temp files (nginx.conf)
#   LOG_DIR [PREFIX/logs]  access log (dovecote.conf)
#
# OUTDIR gets nginx.conf (standalone, includes dovecote.conf) and dovecote.conf (include it
# from an existing http {} block instead if you have one), plus PREFIX/logs and PREFIX/tmp.
# Check and run:
#   nginx -t -p "$PREFIX" -c OUTDIR/nginx.conf -e "$PREFIX/logs/error.log"
#   nginx    -p "$PREFIX" -c OUTDIR/nginx.conf -e "$PREFIX/logs/error.log" -g 'daemon off;'
set -eu

usage() { echo "usage: DOVECOTE_UPSTREAMS='host:port ...' $0 OUTDIR" >&2; exit 2; }
[ $# -eq 1 ] || usage
out=$1
: "${DOVECOTE_UPSTREAMS:?set DOVECOTE_UPSTREAMS to the instances, e.g. '10.0.1.11:8080 10.0.1.12:8080'}"

here=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)
mkdir -p "$out"
out=$(CDPATH= cd -- "$out" && pwd)
PREFIX=${PREFIX:-$out}
LOG_DIR=${LOG_DIR:-$PREFIX/logs}
LISTEN_PORT=${LISTEN_PORT:-443}
HTTP_PORT=${HTTP_PORT:-80}
SERVER_NAME=${SERVER_NAME:-_}
TLS_CERT=${TLS_CERT:-/etc/ssl/dovecote/fullchain.pem}
TLS_KEY=${TLS_KEY:-/etc/ssl/dovecote/privkey.pem}
MAX_FAILS=${MAX_FAILS:-3}
FAIL_TIMEOUT=${FAIL_TIMEOUT:-10s}
LISTEN_IPV6=${LISTEN_IPV6:-1}

for value in "$PREFIX" "$LOG_DIR" "$TLS_CERT" "$TLS_KEY" "$SERVER_NAME"; do
    case $value in
        *'|'*|*'&'*|*'\'*) echo "$0: '|', '&' and '\\' are not allowed in paths or names: $value" >&2; exit 2 ;;
    esac
done

# One "server HOST:PORT max_fails=N fail_timeout=T;" per instance, joined with sed's
# escaped newline so it replaces the single __UPSTREAMS__ line.
upstreams=""
for hostport in $(echo "$DOVECOTE_UPSTREAMS" | tr ',' ' '); do
    case $hostport in
        *:*) ;;
        *) echo "$0: upstream '$hostport' is not HOST:PORT" >&2; exit 2 ;;
    esac
    line="server $hostport max_fails=$MAX_FAILS fail_timeout=$FAIL_TIMEOUT;"
    if [ -z "$upstreams" ]; then upstreams=$line; else upstreams="$upstreams\\
    $line"; fi
done
[ -n "$upstreams" ] || { echo "$0: DOVECOTE_UPSTREAMS is empty" >&2; exit 2; }

ipv6_filter='b'   # sed no-op
if [ "$LISTEN_IPV6" = 0 ]; then ipv6_filter='/listen \[::\]/d'; fi

# Substitute on non-comment lines only: the comments name the placeholders.
nc='/^[[:space:]]*#/!'
sed -e "${nc}s|__PREFIX__|$PREFIX|g" "$here/nginx.conf" > "$out/nginx.conf.tmp"
sed -e "${nc}s|^[[:space:]]*__UPSTREAMS__[[:space:]]*\$|    $upstreams|" \
    -e "${nc}s|__LISTEN_PORT__|$LISTEN_PORT|g" \
    -e "${nc}s|__HTTP_PORT__|$HTTP_PORT|g" \
    -e "${nc}s|__SERVER_NAME__|$SERVER_NAME|g" \
    -e "${nc}s|__TLS_CERT__|$TLS_CERT|g" \
    -e "${nc}s|__TLS_KEY__|$TLS_KEY|g" \
    -e "${nc}s|__LOG_DIR__|$LOG_DIR|g" \
    "$here/dovecote.conf" | sed -e "$ipv6_filter" > "$out/dovecote.conf.tmp"

# Placeholders are only __UPPER_CASE__ words outside comments; a leftover one is a bug.
if grep -v '^[[:space:]]*#' "$out/nginx.conf.tmp" "$out/dovecote.conf.tmp" | grep -q '__[A-Z0-9_]*__'; then
    echo "$0: unreplaced placeholders:" >&2
    grep -n '__[A-Z0-9_]*__' "$out/nginx.conf.tmp" "$out/dovecote.conf.tmp" | grep -v ':[[:space:]]*#' >&2
    exit 1
fi
mv "$out/nginx.conf.tmp" "$out/nginx.conf"
mv "$out/dovecote.conf.tmp" "$out/dovecote.conf"
mkdir -p "$PREFIX/logs" "$PREFIX/tmp" "$LOG_DIR"
echo "rendered $out/nginx.conf and $out/dovecote.conf (prefix $PREFIX)"
