#!/usr/bin/env bash
# Install nginx (Debian's nginx-light) for the multi-instance and proxy tests.
#
# Idempotent. Tests run their own nginx processes from a temp prefix; the package's
# system service is kept from starting (policy-rc.d) and disabled afterwards.
set -euo pipefail

if command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; then
    echo "nginx already installed: $(command -v nginx || echo /usr/sbin/nginx)"
    exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "nginx not found; install it with: sudo apt-get install nginx-light" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
POLICY=/usr/sbin/policy-rc.d
had_policy=0
[ -e "$POLICY" ] && had_policy=1
if [ "$had_policy" -eq 0 ]; then
    printf '#!/bin/sh\nexit 101\n' > "$POLICY"
    chmod 0755 "$POLICY"
    trap 'rm -f "$POLICY"' EXIT
fi
apt-cache show nginx-light >/dev/null 2>&1 || apt-get update -qq
apt-get install -y --no-install-recommends nginx-light \
    || { apt-get update -qq && apt-get install -y --no-install-recommends nginx-light; }
update-rc.d nginx disable >/dev/null 2>&1 || true
if [ -f /run/nginx.pid ]; then
    kill "$(cat /run/nginx.pid)" 2>/dev/null || true
fi
echo "nginx installed: $(command -v nginx || echo /usr/sbin/nginx)"
