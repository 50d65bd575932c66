#!/usr/bin/env bash
# The tests on the lowest versions pyproject.toml allows: a separate venv (.venv-lowest) whose
# direct dependencies are resolved with `uv pip install --resolution lowest-direct`, a check
# that each one landed exactly on its declared floor (else the floor is not true), then the
# unit, integration, client and interop tests on it. Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.venv-lowest
stamp=$VENV/.installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)

if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade 'uv>=0.5'
    "$VENV/bin/uv" pip install -q --python "$VENV/bin/python" --resolution lowest-direct \
        -e '.[dev]'
    echo "$want" > "$stamp"
fi
"$VENV/bin/python" scripts/check_floors.py
# shellcheck disable=SC1091
. ./.test-env 2>/dev/null || true
# LOWEST_TESTS narrows the folders (default: unit, integration, client, interop).
# shellcheck disable=SC2086
exec "$VENV/bin/python" -m pytest -q -rfEs -p no:cacheprovider \
    ${LOWEST_TESTS:-tests/unit tests/integration tests/client tests/interop} "$@"
