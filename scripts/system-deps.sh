#!/usr/bin/env bash
# Debian packages the test suite uses: dicom3tools (dciodvfy, the DICOM validator).
# Installed when missing and we may (root with apt-get); otherwise the tests that need them
# say they were skipped and why.
set -uo pipefail
need=()
command -v dciodvfy >/dev/null 2>&1 || need+=(dicom3tools)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Debian packages: ${need[*]}" >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}") >/dev/null 2>&1 \
    || echo "warning: could not install ${need[*]}; validator tests will be skipped" >&2
else
  echo "note: ${need[*]} missing and not root: validator tests will be skipped" >&2
fi
exit 0
