#!/usr/bin/env bash
# Install the didcomm-rust interop driver's npm packages (didcomm-node, ws) into
# tests/interop/node/node_modules, exactly as locked in tests/interop/node/package-lock.json.
#
# Idempotent: skipped while node_modules matches the lock file (a stamp records its hash).
set -euo pipefail
cd "$(dirname "$0")/../tests/interop/node"

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    echo "node and npm are needed for the didcomm-rust interop tests (Node.js >= 18)" >&2
    exit 1
fi
lock_hash=$(sha256sum package-lock.json | cut -d' ' -f1)
stamp=node_modules/.installed
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$lock_hash" ]; then
    exit 0
fi
npm ci --no-audit --no-fund --loglevel=error
echo "$lock_hash" > "$stamp"
echo "didcomm-node $(node -p 'require("./node_modules/didcomm-node/package.json").version') installed"
