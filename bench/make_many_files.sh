#!/usr/bin/env bash
# A DreamBooth folder of N small PNG images with N caption files, to time how long indexing a huge
# folder takes (bench_data IMAGE_DIR 512 0 runs only the index).
#   bench/make_many_files.sh OUT_DIR [N=100000]
set -euo pipefail
out="${1:?usage: make_many_files.sh OUT_DIR [N]}"; n="${2:-100000}"
python3 - "$out" "$n" <<'PY'
import os, struct, sys, zlib
out, n = sys.argv[1], int(sys.argv[2])
os.makedirs(out, exist_ok=True)
def png(w, h):
    raw = b"".join(b"\x00" + bytes([(x * 3 + y) % 256 for x in range(w) for _ in range(3)]) for y in range(h))
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
sizes = [png(64 + 16 * (k % 5), 48 + 16 * (k // 5)) for k in range(25)]
for i in range(n):
    base = os.path.join(out, f"img{i:07d}")
    with open(base + ".png", "wb") as f:
        f.write(sizes[i % 25])
    with open(base + ".txt", "w") as f:
        f.write(f"tag{i % 97}, photo\n")
print(f"{n} images in {out}")
PY
