#!/usr/bin/env bash
# The demo, until training lands (issue #5): resolve a kohya training config with a command-line
# override, inspect a safetensors file, and show what training would see of a small dataset.
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
echo "== sdt inspect dataset: buckets, steps per epoch on 2 ranks, processed captions, first 4 images as PNG"
demo_data="$root/$build_dir/demo_dataset"
mkdir -p "$demo_data/10_sks"
for f in plain.png lossless.webp plain.bmp exif_rotate6.jpg cmyk.jpg; do cp "$root/tests/fixtures/data/images/$f" "$demo_data/10_sks/"; done
echo "sks, red, green, blue" > "$demo_data/10_sks/plain.txt"
cat > "$demo_data/dataset.toml" <<TOML
[general]
enable_bucket = true
min_bucket_reso = 16
max_bucket_reso = 64
bucket_reso_steps = 8
caption_extension = ".txt"
shuffle_caption = true
keep_tokens = 1
flip_aug = true
[[datasets]]
resolution = 32
batch_size = 2
  [[datasets.subsets]]
  image_dir = "$demo_data/10_sks"
  class_tokens = "sks"
  num_repeats = 10
TOML
"$sdt" inspect dataset --dataset_config "$demo_data/dataset.toml" --world_size 2 --seed 1 --dump 4 --dump_dir "$demo_data/dump"
echo
echo "== sdt train (validates the configuration; the training loop is issue #5)"
"$sdt" train --dataset_config "$demo_data/dataset.toml" || true
