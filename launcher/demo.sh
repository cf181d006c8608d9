#!/usr/bin/env bash
# The demo: resolve a kohya training config, inspect a safetensors file, show what training sees of a
# small dataset, then train a LoRA on Debian's pysiogame clip-art (fetched with apt-get download).
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
echo "== sdt train --config_file configs/demo.toml: a LoRA on Debian's pysiogame clip-art, tiny SD 1.x model, CPU"
images="$root/$build_dir/demo/images/1_clipart"
if [ ! -d "$images" ] || [ -z "$(ls -A "$images" 2>/dev/null)" ]; then
  tmp="$(mktemp -d)"
  (cd "$tmp" && apt-get download -q pysiogame >/dev/null 2>&1) || { echo "cannot download pysiogame (apt-get download)"; exit 1; }
  dpkg-deb -x "$tmp"/pysiogame_*.deb "$tmp/x"
  mkdir -p "$images"
  # The label is in the file name (and its category in the folder): "art4apps/animals/cat.jpg" -> "cat, animals".
  find "$tmp/x" -path '*art4apps*' -name '*.jpg' | sort | while read -r f; do
    label="$(basename "${f%.*}" | tr '_' ' ')"; category="$(basename "$(dirname "$f")")"
    name="${category}_$(basename "$f")"
    cp "$f" "$images/$name"
    echo "$label, $category" > "$images/${name%.*}.txt"
  done
  rm -rf "$tmp"
fi
echo "$(ls "$images"/*.jpg | wc -l) images in $images"
cat > "$root/$build_dir/demo/dataset.toml" <<TOML
[general]
caption_extension = ".txt"
shuffle_caption = true
keep_tokens = 1
flip_aug = true
[[datasets]]
resolution = 64
batch_size = 4
enable_bucket = true
min_bucket_reso = 64
max_bucket_reso = 128
  [[datasets.subsets]]
  image_dir = "$images"
TOML
"$sdt" train --config_file configs/demo.toml --dataset_config "$root/$build_dir/demo/dataset.toml" \
  --output_dir "$root/$build_dir/demo/output"
out="$root/$build_dir/demo/output"
echo "LoRA: $out/demo_lora.safetensors; loss curve: $out/demo_lora_loss.png; samples: $out/sample/; logs: $out/logs/"
python3 - "$out/logs/metrics.jsonl" <<'PY'
import json, sys
losses = [json.loads(line)["loss"] for line in open(sys.argv[1])]
n = max(1, len(losses) // 10)
print(f"mean loss of the first {n} steps {sum(losses[:n]) / n:.4f}, of the last {n} steps {sum(losses[-n:]) / n:.4f}")
PY
