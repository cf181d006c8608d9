#!/usr/bin/env bash
# ctest wrapper: a LoRA written by sdt, loaded by diffusers' kohya-format LoRA loader into the tiny SD 1.x or SDXL
# pipeline (FAMILY: sd, sdxl or flux).
# Exit 77 (ctest: skipped) when no Python was configured or it cannot import diffusers and peft.
set -euo pipefail
writer="$1"; family="$2"; model="$3"; python="${4:-}"
here="$(cd "$(dirname "$0")" && pwd)"
if [ -z "$python" ] || [ ! -x "$python" ]; then
  echo "SKIPPED: no Python configured (cmake -DSDT_PYTHON=...); the diffusers LoRA check did not run"
  exit 77
fi
if ! "$python" -c "import diffusers, peft" 2>/dev/null; then
  echo "SKIPPED: $python cannot import diffusers and peft (pip install diffusers peft); the diffusers LoRA check did not run"
  exit 77
fi
out="$(mktemp -d)"; trap 'rm -rf "$out"' EXIT
"$writer" "$family" "$model" "$out"
exec "$python" "$here/check_lora_with_diffusers.py" "$family" "$model" "$out/lora.safetensors" "$out/ours.safetensors"
