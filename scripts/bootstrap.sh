#!/usr/bin/env bash
# Create (or reuse) the project's virtualenv and install the package with the given extras.
# Usage: scripts/bootstrap.sh [EXTRAS]    e.g. scripts/bootstrap.sh tests
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${DICOM_DEID_VENV:-.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip setuptools wheel
fi
EXTRAS="${1:-}"
STAMP="$VENV/.installed-$(cat setup.py | sha256sum | cut -c1-16)${EXTRAS:+-$EXTRAS}"
if [ ! -f "$STAMP" ]; then
  if [ -n "$EXTRAS" ]; then
    "$VENV/bin/python" -m pip install --quiet -e ".[$EXTRAS]"
  else
    "$VENV/bin/python" -m pip install --quiet -e .
  fi
  touch "$STAMP"
fi
echo "$VENV"
