#!/usr/bin/env bash
# Install Debian's chromium for the console's browser tests (tests/console/).
#
# Idempotent. Playwright drives this system browser (executable_path=/usr/bin/chromium);
# it never downloads one of its own (PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD is set by `make test`).
set -euo pipefail

if [ -x /usr/bin/chromium ]; then
    echo "chromium already installed: $(/usr/bin/chromium --version 2>/dev/null || echo /usr/bin/chromium)"
    exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "chromium not found; install it with: sudo apt-get install chromium" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-cache show chromium >/dev/null 2>&1 || apt-get update -qq
apt-get install -y --no-install-recommends chromium fonts-dejavu-core \
    || { apt-get update -qq && apt-get install -y --no-install-recommends chromium fonts-dejavu-core; }
echo "chromium installed: $(/usr/bin/chromium --version 2>/dev/null || echo /usr/bin/chromium)"
