#!/usr/bin/env bash
# The README's first command: set up, make sample data with fake identifiers, de-identify it
# with the local runner into ./demo-output, and show where everything went.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="$(scripts/bootstrap.sh)"
exec "$VENV/bin/dicom-deid" demo "$@"
