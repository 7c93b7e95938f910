#!/usr/bin/env bash
# The README's second command: set up and run the whole test suite, slowest tests listed.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/system-deps.sh
VENV="$(scripts/bootstrap.sh tests)"
exec "$VENV/bin/python" -m pytest -p no:cacheprovider --durations=15 "$@" tests
