#!/usr/bin/env bash
# ctest wrapper: write an event file with sdt's writer, read it with TensorBoard's reader.
# Exit 77 (ctest: skipped) when no Python with tensorboard was configured.
set -euo pipefail
writer="$1"; python="${2:-}"
here="$(cd "$(dirname "$0")" && pwd)"
if [ -z "$python" ] || [ ! -x "$python" ]; then
  echo "SKIPPED: no Python configured (cmake -DSDT_PYTHON=...); the TensorBoard check did not run"
  exit 77
fi
out="$(mktemp -d)"; trap 'rm -rf "$out"' EXIT
"$writer" "$out"
exec "$python" "$here/check_tfevents_with_tensorboard.py" "$out"
