#!/usr/bin/env bash
# Install promtool (shipped by Debian's `prometheus` package) if it is not on PATH.
#
# Idempotent: does nothing when promtool is already available.
# The Debian package normally starts a prometheus server (port 9090) from its
# maintainer scripts; we install a temporary policy-rc.d that denies service
# starts, remove it afterwards, and stop any prometheus that got started anyway.
set -euo pipefail

if command -v promtool >/dev/null 2>&1; then
    echo "promtool already installed: $(command -v promtool)"
    promtool --version 2>&1 | head -n 1 || true
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "promtool not found and not running as root." >&2
    echo "Install it with: sudo apt-get install --no-install-recommends prometheus" >&2
    exit 1
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "promtool not found and apt-get is unavailable; install Prometheus' promtool manually." >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive

# Only refresh the package lists when apt does not know the package yet.
if ! apt-cache show prometheus >/dev/null 2>&1; then
    apt-get update -qq
fi

POLICY=/usr/sbin/policy-rc.d
POLICY_BACKUP=""
POLICY_INSTALLED=0
restore_policy() {
    if [ "$POLICY_INSTALLED" -eq 1 ]; then
        rm -f "$POLICY"
        if [ -n "$POLICY_BACKUP" ] && [ -e "$POLICY_BACKUP" ]; then
            mv -f "$POLICY_BACKUP" "$POLICY"
        fi
        POLICY_INSTALLED=0
    fi
}
trap restore_policy EXIT

# Deny every service start for the duration of the install (exit 101 = "action
# forbidden by policy", honoured by invoke-rc.d and deb-systemd-invoke).
# A pre-existing policy-rc.d is kept aside and put back afterwards.
if [ -e "$POLICY" ]; then
    POLICY_BACKUP="$(mktemp /usr/sbin/policy-rc.d.dovecote-backup.XXXXXX)"
    cp -p "$POLICY" "$POLICY_BACKUP"
fi
POLICY_INSTALLED=1
printf '#!/bin/sh\nexit 101\n' > "$POLICY"
chmod 0755 "$POLICY"

if ! apt-get install -y --no-install-recommends prometheus; then
    # Package lists may be stale (apt-cache knew the name but the file is gone): refresh once.
    apt-get update -qq
    apt-get install -y --no-install-recommends prometheus
fi

restore_policy

# Belt and braces: make sure no prometheus server was left running by the install.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    systemctl stop prometheus >/dev/null 2>&1 || true
    systemctl disable prometheus >/dev/null 2>&1 || true
fi
if [ -f /run/prometheus/prometheus.pid ]; then
    pid="$(cat /run/prometheus/prometheus.pid 2>/dev/null || true)"
    if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null || true)" = "prometheus" ]; then
        kill "$pid" 2>/dev/null || true
    fi
fi

if ! command -v promtool >/dev/null 2>&1; then
    echo "prometheus package installed but promtool is still not on PATH" >&2
    exit 1
fi

echo "promtool installed: $(command -v promtool)"
promtool --version 2>&1 | head -n 1 || true
