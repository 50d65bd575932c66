#!/bin/sh
# Install Veramo 7 (the DIDComm v2 comparison mediator, bench/peer/veramo/server.mjs) into
# bench/peer/veramo/node_modules from the committed package-lock.json. Needs node >= 20
# and npm; make bench goes on without the peer if this fails.
set -eu
here=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)/veramo
command -v node >/dev/null || { echo "Veramo peer: node not found (Node.js >= 20 needed)"; exit 1; }
command -v npm >/dev/null || { echo "Veramo peer: npm not found"; exit 1; }
stamp="$here/node_modules/.installed-lock"
if [ -f "$stamp" ] && cmp -s "$stamp" "$here/package-lock.json"; then
  echo "Veramo already installed in $here/node_modules"; exit 0
fi
(cd "$here" && npm ci --omit=dev --no-audit --no-fund --loglevel=error)
cp "$here/package-lock.json" "$stamp"
node -e "console.log('Veramo did-comm', require('$here/node_modules/@veramo/did-comm/package.json').version)"
