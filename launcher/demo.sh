#!/usr/bin/env bash
# The demo, until training lands (issue #5): resolve a kohya training config with a command-line
# override, validate its dataset config, and inspect a safetensors file.
set -euo pipefail
build_dir="${1:-build}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
sdt="$root/$build_dir/sdt"
cd "$root"
echo "== sdt train --config_file configs/sd15_lora_example.toml --learning_rate 2e-4 --output_config"
"$sdt" train --config_file configs/sd15_lora_example.toml --learning_rate 2e-4 --output_config
echo
echo "== sdt inspect tests/fixtures/safetensors/python_all_dtypes.safetensors"
"$sdt" inspect tests/fixtures/safetensors/python_all_dtypes.safetensors
echo
echo "== sdt train --dataset_config configs/dataset_example.toml (validates; the training loop is issue #5)"
"$sdt" train --dataset_config configs/dataset_example.toml --resolution 512 || true
