#!/usr/bin/env bash
# Create (or reuse) the project's virtualenv and install the package with the given extras.
# Usage: scripts/bootstrap.sh [EXTRAS]    e.g. scripts/bootstrap.sh tests
# Prints the virtualenv's path on stdout (callers use it); pip's own output goes to
# $VENV/install.log and is shown only when an install step fails.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${DICOM_DEID_VENV:-.venv}"
PY="${PYTHON:-python3}"
LOG="$VENV/install.log"

LOG_STARTED=""
quietly() {  # run an install step with its output in $LOG; on failure show the log's end
  if [ -z "$LOG_STARTED" ]; then : > "$LOG"; LOG_STARTED=1; fi  # one log per bootstrap that installs
  if ! "$@" >>"$LOG" 2>&1; then
    echo "bootstrap: failed: $*" >&2
    echo "bootstrap: last lines of $LOG:" >&2
    tail -n 40 "$LOG" >&2
    exit 1
  fi
}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  echo "bootstrap: created $VENV; installing (log: $LOG)" >&2
  quietly "$VENV/bin/python" -m pip install --upgrade pip setuptools wheel
fi
EXTRAS="${1:-}"
STAMP="$VENV/.installed-$(cat setup.py | sha256sum | cut -c1-16)${EXTRAS:+-$EXTRAS}"
if [ ! -f "$STAMP" ]; then
  echo "bootstrap: installing dicom-deid${EXTRAS:+[$EXTRAS]} into $VENV (log: $LOG)" >&2
  if [ -n "$EXTRAS" ]; then
    quietly "$VENV/bin/python" -m pip install -e ".[$EXTRAS]"
  else
    quietly "$VENV/bin/python" -m pip install -e .
  fi
  touch "$STAMP"
fi
echo "$VENV"
