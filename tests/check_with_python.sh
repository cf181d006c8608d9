#!/usr/bin/env bash
# ctest wrapper for the format checks: WRITER (one of our programs) writes to OUTPUT, then a Python
# check that uses the reference package reads OUTPUT. Exit 77 (ctest: skipped, and said plainly)
# when no Python was configured; the check script itself exits 77 when its package is missing.
#   check_with_python.sh PYTHON CHECK_SCRIPT WRITER
set -euo pipefail
python="$1"; check="$2"; writer="$3"
if [ -z "$python" ] || [ ! -x "$python" ]; then
  echo "SKIPPED: no Python configured (cmake -DSDT_PYTHON=...); $(basename "$check") did not run"
  exit 77
fi
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
"$writer" "$tmp/output"
exec "$python" "$check" "$tmp/output"
