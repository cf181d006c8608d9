#!/usr/bin/env bash
# Builds the safetensors header fuzzer with clang (libFuzzer + AddressSanitizer + UBSan) and runs
# it for a bounded time. Prints the seconds it ran without a crash; exits non-zero on a crash
# (the input is kept as tests/fuzz/crash-*).
#   tests/fuzz/run_fuzz.sh [SECONDS=60]
set -euo pipefail
seconds="${1:-60}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
if ! command -v clang++-14 >/dev/null || ! ls /usr/lib/llvm-14/lib/clang/*/lib/linux/libclang_rt.fuzzer-x86_64.a >/dev/null 2>&1; then
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -q && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends clang-14 libclang-rt-14-dev
fi
out="$root/build-fuzz"; mkdir -p "$out"
clang++-14 -std=c++20 -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -I"$root" \
  tests/fuzz/fuzz_safetensors_header.cpp src/core/safetensors.cpp src/core/error.cpp src/core/text.cpp \
  -lfmt -o "$out/fuzz_safetensors_header"

# Seed corpus: real files (ours and the Python package's), inputs that once crashed it
# (tests/fuzz/regressions/), and small hand-made headers.
corpus="$root/tests/fuzz/corpus"; mkdir -p "$corpus"
cp tests/fixtures/safetensors/*.safetensors tests/fuzz/regressions/* "$corpus/"
python3 - "$corpus" <<'PY'
import struct, sys, pathlib
d = pathlib.Path(sys.argv[1])
def f(name, header, data=b""):
    h = header.encode()
    (d / name).write_bytes(struct.pack("<Q", len(h)) + h + data)
f("seed_meta", '{"__metadata__":{"a":"b"},"x":{"dtype":"F16","shape":[2,2],"data_offsets":[0,8]}}', bytes(8))
f("seed_two", '{"a":{"dtype":"BF16","shape":[1],"data_offsets":[0,2]},"b":{"dtype":"BOOL","shape":[3],"data_offsets":[2,5]}}', bytes(5))
f("seed_empty", '{}')
PY
start=$(date +%s)
set +e
(cd "$out" && ./fuzz_safetensors_header -max_total_time="$seconds" -max_len=4096 -timeout=5 \
  -artifact_prefix="$root/tests/fuzz/" "$corpus" 2>&1 | tail -n 15)
rc=${PIPESTATUS[0]}
set -e
elapsed=$(( $(date +%s) - start ))
if [ "$rc" -eq 0 ]; then
  echo "fuzz_safetensors_header: ${elapsed} s without a crash"
else
  echo "fuzz_safetensors_header: CRASH after ${elapsed} s (see tests/fuzz/crash-*)"
  exit 1
fi
