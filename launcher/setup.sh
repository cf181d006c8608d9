#!/usr/bin/env bash
# sdt set-up: installs what the build needs, configures, builds, and then runs one action.
#
#   launcher/setup.sh            install + configure + build
#   launcher/setup.sh test       ... then run the whole test suite (ctest + the Python format check)
#   launcher/setup.sh demo       ... then run the demo job
#   launcher/setup.sh install PREFIX  ... then install PREFIX/bin/sdt and its data in PREFIX/share/sdt
#   launcher/setup.sh cuda-check compile the whole project against the CUDA LibTorch (no GPU needed):
#                                torch==2.14.1 (CUDA) in /opt/sdt-cuda/venv, build folder build-cuda
#
# Idempotent: every step checks first and does nothing when it is already done, so a re-run on a
# machine that is set up costs a few seconds (plus whatever the incremental build has to do).
#
# Environment:
#   SDT_BUILD_DIR   build folder (default: build)
#   SDT_CMAKE_ARGS  more CMake arguments for the configure step (e.g. a CUDA LibTorch's -DCMAKE_CUDA_COMPILER=...)
#   Torch_DIR       use your own LibTorch (e.g. a CUDA build on a cluster): the folder holding
#                   TorchConfig.cmake. Then no virtual environment torch is installed for the build.
#   SDT_SKIP_APT=1  do not touch system packages (a machine you do not administer; install them yourself)
#   SDT_BUNDLE      a folder made by `launcher/setup.sh bundle DIR` on a Debian 12 machine: build against its
#                   libraries and nothing else from the system (a GPU node without Debian's packages); needs Torch_DIR
#
#   launcher/setup.sh bundle DIR  pack those libraries into DIR and DIR.tar.xz (launcher/bundle.sh)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
build_dir="${SDT_BUILD_DIR:-build}"
action="${1:-build}"

log() { printf '[setup] %s\n' "$*"; }

# Debian packages, one line per reason (README "Libraries" explains each).
apt_packages=(
  cmake ninja-build ccache g++ pkg-config python3-venv      # toolchain
  libopenmpi-dev openmpi-bin                                # process launch + CPU collectives
  slurm-wlm munge                                           # Slurm daemons and clients for the slurm/ job scripts' test
  libhdf5-dev hdf5-tools                                    # latent / text-encoder caches (h5dump to inspect)
  libzip-dev                                                # kohya's .npz caches (zip archives of .npy arrays)
  libtoml11-dev libcli11-dev libspdlog-dev nlohmann-json3-dev  # config, command line, logging, JSON headers
  libgtest-dev libgmock-dev                                 # tests
  libopencv-imgcodecs-dev libopencv-imgproc-dev libwebp-dev libpng-dev libjpeg-dev  # image decoding / resizing
  libopenblas0-pthread                                      # fast fp32 BLAS for CPU runs
  libicu-dev zlib1g-dev                                     # CLIP tokenizer: Unicode classes, case, NFC; its .txt.gz vocabulary
  libsentencepiece-dev                                      # T5 tokenizer (FLUX, Chroma, SD3): T5's SentencePiece model
  libssl-dev                                                # SHA-256 (libcrypto) for the sshs_* hashes kohya writes into LoRA files
)

install_apt() {
  [ "${SDT_SKIP_APT:-0}" = 1 ] && { log "SDT_SKIP_APT=1: not checking system packages"; return; }
  [ -n "${SDT_BUNDLE:-}" ] && { log "SDT_BUNDLE=$SDT_BUNDLE: building against the bundle, not system packages"; return; }
  local missing=()
  for p in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if [ ${#missing[@]} -eq 0 ]; then log "system packages: all present"; return; fi
  log "installing system packages: ${missing[*]}"
  local sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
}

# LibTorch from PyPI's torch wheel, in a project-local virtual environment (.venv). The same
# environment carries the Python packages the format checks use to read what sdt writes:
# safetensors, tensorboard (event files) and diffusers + transformers + peft (LoRA files).
check_packages=(safetensors numpy tensorboard diffusers transformers peft)
venv="$root/.venv"
torch_version="2.13.0"
install_venv() {
  if [ ! -x "$venv/bin/python" ]; then
    log "creating $venv"
    python3 -m venv "$venv"
  fi
  if ! "$venv/bin/python" - "$torch_version" "${check_packages[@]}" <<'PY' 2>/dev/null
import sys, importlib.metadata as md
assert md.version("torch").split("+")[0] == sys.argv[1]
for package in sys.argv[2:]:
    md.version(package)
PY
  then
    log "installing torch==$torch_version (CPU build) ${check_packages[*]} into $venv"
    "$venv/bin/pip" install -q "torch==$torch_version" "${check_packages[@]}"
  else
    log "virtual environment: torch $torch_version, ${check_packages[*]} present"
  fi
}

configure() {
  local torch_dir="${Torch_DIR:-}"
  if [ -z "$torch_dir" ]; then
    torch_dir="$("$venv/bin/python" -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')/Torch"
  fi
  if [ -f "$build_dir/build.ninja" ] && grep -q "^Torch_DIR:[A-Z]*=$torch_dir\$" "$build_dir/CMakeCache.txt" 2>/dev/null; then
    log "build folder $build_dir already configured"
    return
  fi
  log "configuring $build_dir (Torch_DIR=$torch_dir)"
  cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=Release -DTorch_DIR="$torch_dir" \
        -DSDT_PYTHON="$venv/bin/python" "${bundle_flags[@]}" ${SDT_CMAKE_ARGS:-}
}

# A build bundle: its folders first for every package, and Open MPI by its files (its compiler wrappers are not in it).
bundle_flags=()
if [ -n "${SDT_BUNDLE:-}" ]; then
  [ -n "${Torch_DIR:-}" ] || { echo "SDT_BUNDLE needs Torch_DIR (the LibTorch of the machine)" >&2; exit 2; }
  bundle_lib="$SDT_BUNDLE/lib/x86_64-linux-gnu"
  bundle_flags=(-DCMAKE_PREFIX_PATH="$SDT_BUNDLE" -DCMAKE_LIBRARY_PATH="$bundle_lib"
                -DMPI_SKIP_COMPILER_WRAPPER=ON -DMPI_CXX_SKIP_MPICXX=ON
                -DMPI_CXX_HEADER_DIR="$bundle_lib/openmpi/include"
                -DMPI_CXX_LIB_NAMES=mpi -DMPI_mpi_LIBRARY="$bundle_lib/libmpi.so.40")
  # The bundle's libraries find each other here at run time (test discovery runs the test binaries while building).
  export LD_LIBRARY_PATH="$bundle_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  # pkg-config, where there is one, looks in the bundle only (it has no .pc files): FindMPI and FindOpenSSL ask it
  # first and would find the system's own packages.
  export PKG_CONFIG_LIBDIR="$SDT_BUNDLE/lib/pkgconfig" PKG_CONFIG_PATH=""
fi

# The CUDA build of LibTorch from PyPI's torch wheel, in a virtual environment outside the clone
# (5.5 GB), and a build of the whole project against it (the NCCL backend included). Torch's CMake
# config enables the CUDA language, so it needs nvcc (the toolkit at $cuda_root) although nothing
# here is CUDA code; the toolkit there lacks NVRTC, which the wheel's nvidia-cuda-nvrtc provides.
# CMake 3.25 knows no C++20 dialect for nvcc, hence CUDA 17 for Torch's compiler probe.
cuda_venv="/opt/sdt-cuda/venv"
cuda_torch_version="2.14.1"
cuda_root="${CUDA_ROOT:-/usr/local/cuda-13.0}"
cuda_check() {
  if [ ! -x "$cuda_venv/bin/python" ]; then
    log "creating $cuda_venv"
    python3 -m venv "$cuda_venv"
  fi
  if ! "$cuda_venv/bin/python" -c 'import sys, importlib.metadata as md; sys.exit(md.version("torch").split("+")[0] != sys.argv[1])' \
       "$cuda_torch_version" 2>/dev/null; then
    log "installing torch==$cuda_torch_version (CUDA build) into $cuda_venv"
    "$cuda_venv/bin/pip" install -q "torch==$cuda_torch_version"
  fi
  local site torch_dir
  site="$("$cuda_venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  torch_dir="$site/torch/share/cmake/Torch"
  if [ -f build-cuda/build.ninja ] && grep -q "^Torch_DIR:[A-Z]*=$torch_dir\$" build-cuda/CMakeCache.txt 2>/dev/null; then
    log "build folder build-cuda already configured"
  else
    log "configuring build-cuda (Torch_DIR=$torch_dir)"
    cmake -S . -B build-cuda -G Ninja -DCMAKE_BUILD_TYPE=Release -DTorch_DIR="$torch_dir" \
          -DCUDAToolkit_ROOT="$cuda_root" -DCUDA_TOOLKIT_ROOT_DIR="$cuda_root" -DCMAKE_CUDA_COMPILER="$cuda_root/bin/nvcc" \
          -DCMAKE_CUDA_STANDARD=17 -DTORCH_CUDA_ARCH_LIST=9.0 -DCUDA_nvrtc_LIBRARY="$site/nvidia/cu13/lib/libnvrtc.so.13" \
          -DSDT_CUDA=ON
  fi
  log "building the whole project (libraries, sdt, tests, benchmarks) against the CUDA LibTorch"
  cmake --build build-cuda
}

if [ "$action" = bundle ]; then
  install_apt
  exec bash "$root/launcher/bundle.sh" "${2:?usage: launcher/setup.sh bundle DIR}"
fi
install_apt
if [ "$action" = cuda-check ]; then
  cuda_check
  exit 0
fi
[ -n "${Torch_DIR:-}" ] || install_venv
configure
log "building"
cmake --build "$build_dir"

case "$action" in
  build) ;;
  test)
    log "running the test suite"
    ctest --test-dir "$build_dir" --output-on-failure -j2
    ;;
  demo)
    log "running the demo"
    bash "$root/launcher/demo.sh" "$build_dir"
    ;;
  install)
    prefix="${2:?usage: launcher/setup.sh install PREFIX}"
    log "installing into $prefix"
    cmake --install "$build_dir" --prefix "$prefix"
    ;;
  *) echo "unknown action '$action' (build | test | demo | install PREFIX | cuda-check | bundle DIR)" >&2; exit 2 ;;
esac
