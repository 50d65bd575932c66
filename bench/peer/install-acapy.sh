#!/bin/sh
# Install ACA-Py into bench/peer/.venv-acapy, its own venv (its pins must not disturb
# Dovecote's .venv). acapy-agent (>= 1.1) needs Python >= 3.12 and this machine has 3.11,
# so the last release that runs on 3.11 is used: aries-cloudagent 0.12.8 (same project,
# published under its old name). Override with ACAPY_PACKAGE='acapy-agent==1.7.0' and
# PYTHON=python3.13 where a newer Python exists.
set -eu
here=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)
PYTHON=${PYTHON:-python3}
PACKAGE=${ACAPY_PACKAGE:-aries-cloudagent[askar]==0.12.8}
[ -x "$here/.venv-acapy/bin/aca-py" ] && { echo "ACA-Py already installed in $here/.venv-acapy"; exit 0; }
rm -rf "$here/.venv-acapy"
$PYTHON -m venv "$here/.venv-acapy"
"$here/.venv-acapy/bin/pip" install -q --upgrade pip
"$here/.venv-acapy/bin/pip" install -q "$PACKAGE"
"$here/.venv-acapy/bin/aca-py" --version
