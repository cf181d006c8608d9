#!/usr/bin/env bash
# `cmake --install` into a fresh prefix: the installed sdt runs from there (its LibTorch found), and its data is where
# it looks (PREFIX/share/sdt, ClipTokenizer::bundled_vocab_gz), with its licence.
set -uo pipefail
build="$1"
prefix="$(mktemp -d)"; trap 'rm -rf "$prefix"' EXIT
cmake --install "$build" --prefix "$prefix" > /dev/null || { echo "FAIL: cmake --install"; exit 1; }
"$prefix/bin/sdt" --version | grep -q "^sdt " || { echo "FAIL: the installed sdt does not run"; exit 1; }
[ -f "$prefix/share/sdt/tokenizers/clip/bpe_simple_vocab_16e6.txt.gz" ] || { echo "FAIL: no vocabulary in share/sdt"; exit 1; }
[ -f "$prefix/share/sdt/tokenizers/clip/LICENSE" ] || { echo "FAIL: no licence beside the vocabulary"; exit 1; }
echo "ok: the installed sdt runs; its data is in $prefix/share/sdt"
