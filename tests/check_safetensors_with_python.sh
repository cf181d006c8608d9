#!/usr/bin/env bash
# ctest wrapper: write a file with sdt's writer, read it with the Python reference package.
# Exit 77 (ctest: skipped) when no Python with torch + safetensors was configured.
set -euo pipefail
writer="$1"; python="${2:-}"
here="$(cd "$(dirname "$0")" && pwd)"
if [ -z "$python" ] || [ ! -x "$python" ]; then
  echo "SKIPPED: no Python configured (cmake -DSDT_PYTHON=...); the reference check did not run"
  exit 77
fi
out="$(mktemp -d)"; trap 'rm -rf "$out"' EXIT
"$writer" "$out/ours.safetensors"
exec "$python" "$here/check_safetensors_with_python.py" "$out/ours.safetensors"
