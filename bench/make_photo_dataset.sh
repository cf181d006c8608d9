#!/usr/bin/env bash
# Builds a DreamBooth-style folder of real photos of mixed sizes from Debian packages that ship
# sample images (opencv-doc, python3-skimage, pysiogame), with a caption file per image, for
# bench_data. Downloads the .deb files only (no installation).
#   bench/make_photo_dataset.sh OUT_DIR
set -euo pipefail
out="${1:?usage: make_photo_dataset.sh OUT_DIR}"
work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT
mkdir -p "$out"
(cd "$work" && apt-get download -q opencv-doc python3-skimage pysiogame >/dev/null)
for deb in "$work"/*.deb; do dpkg-deb -x "$deb" "$work/x"; done
n=0
while IFS= read -r -d '' f; do
  name="img$(printf %04d "$n")_$(basename "${f%.*}" | tr -c 'a-zA-Z0-9\n' '_')"
  ext="${f##*.}"; ext="${ext,,}"
  cp "$f" "$out/$name.$ext"
  echo "$(basename "${f%.*}" | tr '_-' '  '), photo, sample image" > "$out/$name.txt"
  n=$((n + 1))
done < <(find "$work/x" -type f \( -iname '*.jpg' -o -iname '*.jpeg' -o -iname '*.png' \) -size +8k -print0 | sort -z)
echo "$n images in $out"
