#!/usr/bin/env bash
# `sdt cache-latents` on a disk that fills up mid-part (a 48 KiB tmpfs): a named error with the file and "No space left
# on device", exit 1 (not a crash in HDF5's exit handler), and no temporary left. Needs root to mount the tmpfs;
# skipped (77) where mounting is not allowed.
set -uo pipefail
sdt="$1"; src="$2"
work="$(mktemp -d)"; disk="$work/disk"
mkdir -p "$disk" "$work/train/2_toy"
cleanup() { umount "$disk" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
mount -t tmpfs -o size=48k tmpfs "$disk" 2>/dev/null || { echo "skipped: cannot mount a tmpfs here"; exit 77; }
python3 - "$work/train/2_toy/0.png" <<'PY'
import struct, sys, zlib
w = h = 32
raw = b"".join(b"\x00" + bytes((x * 7 + y * 3) % 256 for x in range(w * 3)) for y in range(h))
chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
open(sys.argv[1], "wb").write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                              + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
PY
for i in $(seq 1 39); do cp "$work/train/2_toy/0.png" "$work/train/2_toy/$i.png"; done
out="$("$sdt" cache-latents --pretrained_model_name_or_path "$src/tests/fixtures/sd/sd1" \
  --tokenizer "$src/tests/fixtures/sd/sampling/tokenizer" --train_data_dir "$work/train" --resolution 32 \
  --cache_dir "$disk/cache" 2>&1)"; rc=$?
if [ "$rc" != 1 ] || ! grep -q "latents.r0000-of-0001.p00000.h5.tmp.*No space left on device" <<<"$out"; then
  echo "FAIL: exit $rc"; echo "$out" | tail -5; exit 1
fi
if [ -n "$(ls -A "$disk/cache")" ]; then echo "FAIL: left behind: $(ls "$disk/cache")"; exit 1; fi
echo "ok: a full disk while caching is a named error, exit 1, nothing left behind"
