#!/usr/bin/env bash
# The GPU check, one call on a lent GPU machine (CUDA, nvcc, CMake, Ninja and PyTorch in python3; no packages, no
# network): build sdt against the machine's own CUDA LibTorch and a build bundle (launcher/setup.sh bundle, made on
# Debian 12 and carried along), run the GPU tests and the rest of the suite, and time SD 1.5's U-Net forward + backward
# beside PyTorch eager on the same card, with MFU; then LoRA steps of a FLUX.1-size transformer with and without block
# swap against kohya's VRAM guide. Logs go to $OUT (or /tmp/sdt-gpu-check).
#
#   bash bench/gpu/check.sh [bundle archive, default .carry/sdt-bundle.tar.xz]
#
# Carried with it (prepare on Debian 12, in the repository; .carry/ is ignored by git):
#   bash launcher/setup.sh bundle .carry/sdt-bundle            # .carry/sdt-bundle.tar.xz, the archive to carry
#   .venv/bin/pip download --no-deps --only-binary=:all: -d .carry/whl diffusers   # PyTorch eager's U-Net (pure Python)
# and run there with carry [".carry/sdt-bundle.tar.xz", ".carry/whl"].
set -uo pipefail
cd "$(dirname "$0")/../.."
archive="${1:-.carry/sdt-bundle.tar.xz}"
out="${OUT:-/tmp/sdt-gpu-check}"
mkdir -p "$out"
section() { printf '\n==== %s\n' "$*"; }

section "card"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
card="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
python3 -c 'import torch; print("python torch", torch.__version__, "CUDA", torch.version.cuda)'

section "build (the bundle and the machine's LibTorch)"
tar xJf "$archive" -C /tmp || exit 1
bundle=/tmp/sdt-bundle
site="$(python3 -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))')"
nvrtc="$(ls "$site"/nvidia/cu13/lib/libnvrtc.so.13 2>/dev/null | head -1)"
nvcc_path="$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)"
export SDT_CMAKE_ARGS="-DCMAKE_CUDA_COMPILER=$nvcc_path -DCMAKE_CUDA_STANDARD=17 -DTORCH_CUDA_ARCH_LIST=9.0 ${nvrtc:+-DCUDA_nvrtc_LIBRARY=$nvrtc}"
start=$(date +%s)
SDT_BUNDLE="$bundle" Torch_DIR="$site/torch/share/cmake/Torch" SDT_BUILD_DIR=build-gpu CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
  bash launcher/setup.sh build >"$out/build.log" 2>&1
status=$?
echo "build exit $status in $(( $(date +%s) - start )) s (log: build.log)"
[ "$status" = 0 ] || { tail -30 "$out/build.log"; exit 1; }
export LD_LIBRARY_PATH="$bundle/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

section "GPU tests"
build-gpu/test_device 2>&1 | tee "$out/test_device.log" | grep -E '^\[|cuda\]'

section "the rest of the suite on this machine"
ctest --test-dir build-gpu -j "$(nproc)" --timeout 300 -E 'Device|CudaTraining' >"$out/ctest.log" 2>&1
grep -E 'tests passed|Failed|\*\*\*' "$out/ctest.log" | head -20

section "SD 1.5 U-Net forward + backward, bf16, 512x512, batch 4 on $card"
if ls .carry/whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .carry/whl/*.whl && export PYTHONPATH=/tmp/site
fi
build-gpu/bench_unet_gpu 10 4 | tee "$out/bench.log"
python3 bench/gpu/bench_unet_gpu.py 10 4 | tee -a "$out/bench.log"
# MFU against the card's dense bf16 peak (H100/H200 SXM: 989 TFLOP/s), from the FLOPs PyTorch counted for the step.
peak=""
case "$card" in *H100*|*H200*) peak=989e12 ;; esac
flops="$(awk '/^flops per step/ {print $4}' "$out/bench.log")"
if [ -n "$peak" ] && [ -n "$flops" ]; then
  awk -v flops="$flops" -v peak="$peak" -v card="$card" '
    / ms \(median/ { for (i = 1; i <= NF; ++i) if ($(i + 1) == "ms") ms = $i;
                    printf "%s on %s: %.2f ms, MFU %.1f %%\n", $1, card, ms, 100 * flops / (ms / 1000) / peak }' "$out/bench.log"
fi

section "FLUX.1-size transformer (19 + 38 blocks, 11.9 G random weights), LoRA dim 16, 512x512, bf16 + fp8 base on $card"
# kohya's VRAM guide for flux_train_network.py is the anchor: 12 GB at --blocks_to_swap 16 (with --fp8_base, bf16 and
# --gradient_checkpointing). The transformer is written once in bf16 (24 GB of disk), then trained 2 steps without
# swap and with 16 blocks swapped; each line ends with the caching allocator's peak on the card.
timeout 480 build-gpu/bench_flux_train . 2 19 38 16 512 bf16+fp8 2>&1 | tee "$out/bench_flux.log"
rm -rf /tmp/sdt_bench_flux_train

