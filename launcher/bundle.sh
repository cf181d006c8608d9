#!/usr/bin/env bash
# launcher/setup.sh bundle DIR: everything sdt builds against besides LibTorch and the toolchain, packed from this
# Debian machine into DIR (and DIR.tar.xz beside it), for a GPU node you do not administer: no root, no package
# manager, no network, its own CUDA LibTorch. There:
#
#   tar xJf sdt-bundle.tar.xz && SDT_BUNDLE=$PWD/sdt-bundle Torch_DIR=... bash launcher/setup.sh build
#
# DIR mirrors Debian's /usr layout (include/, lib/x86_64-linux-gnu/, share/cmake/), so the packages' own CMake
# configs find their files relative to themselves. What goes in:
#   - the headers, CMake configs and libraries of toml11, CLI11, spdlog/fmt, nlohmann-json, GoogleTest, serial HDF5,
#     Open MPI, libzip, ICU (uc), OpenSSL (libcrypto) and zlib, from their Debian packages;
#   - OpenCV's core, imgproc and imgcodecs (PNG, JPEG, WebP, BMP), built here as static libraries from the OpenCV
#     4.10 sources of PyPI's opencv-python-headless: Debian's imgcodecs alone needs 140 libraries (GDAL and more);
#   - every shared library those need at run time that a glibc system lacks (ldd, transitively).
# Debian 12's glibc is 2.36, so the libraries load on systems with glibc 2.36 or newer.
set -euo pipefail

out="${1:?usage: launcher/setup.sh bundle DIR}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
arch_lib=lib/x86_64-linux-gnu
work="${SDT_BUNDLE_WORK:-/tmp/sdt-bundle-work}"
log() { printf '[bundle] %s\n' "$*"; }

opencv_version=4.10.0.84
opencv_url="https://files.pythonhosted.org/packages/2f/7e/d20f68a5f1487adf19d74378d349932a386b1ece3be9be9915e5986db468/opencv-python-headless-${opencv_version}.tar.gz"
opencv_sha256=f2017c6101d7c2ef8d7bc3b414c37ff7f54d64413a1847d89970b6b7069b4e1a

rm -rf "$out"
mkdir -p "$out/include" "$out/$arch_lib" "$out/share/cmake" "$work"

# ---- files of Debian's -dev packages, kept at their place under /usr
copy_from_usr() {  # paths under /usr (files, folders or globs)
  local p
  for p in "$@"; do
    for f in /usr/$p; do
      [ -e "$f" ] || { echo "bundle: $f is missing (run launcher/setup.sh first)" >&2; exit 1; }
      mkdir -p "$out/$(dirname "${f#/usr/}")"
      cp -a "$f" "$out/$(dirname "${f#/usr/}")/"
    done
  done
}
log "headers, CMake configs and libraries of the Debian packages"
copy_from_usr include/toml include/toml.hpp share/cmake/toml11
copy_from_usr include/CLI share/cmake/CLI11
copy_from_usr include/nlohmann share/cmake/nlohmann_json
copy_from_usr include/spdlog "$arch_lib/cmake/spdlog" "$arch_lib/libspdlog.so*"
copy_from_usr include/fmt "$arch_lib/cmake/fmt" "$arch_lib/libfmt.so*"
copy_from_usr include/gtest include/gmock "$arch_lib/cmake/GTest" "$arch_lib/libgtest*.a" "$arch_lib/libgmock*.a"
copy_from_usr include/hdf5/serial "$arch_lib/libhdf5_serial.so*"
# Open MPI's headers and libraries: enough to build, and to run one process per node (which never starts MPI). Its
# plugins and mpirun are not in it: several ranks on a node start under the node's own launcher and MPI.
copy_from_usr "$arch_lib/openmpi/include" "$arch_lib/libmpi.so*" "$arch_lib/libmpi_cxx.so*" "$arch_lib/libopen-pal.so*" \
              "$arch_lib/libopen-rte.so*"
copy_from_usr include/zip.h include/zipconf.h "$arch_lib/libzip.so*"
copy_from_usr include/unicode "$arch_lib/libicuuc.so*" "$arch_lib/libicudata.so*"
copy_from_usr include/openssl include/x86_64-linux-gnu/openssl "$arch_lib/libcrypto.so*"
copy_from_usr include/zlib.h include/zconf.h "$arch_lib/libz.so*"
copy_from_usr include/sentencepiece_processor.h include/sentencepiece_trainer.h "$arch_lib/libsentencepiece.so*"
# Links that point into the system (Debian's alternatives, /lib) point to the same file inside the bundle instead.
while read -r link; do
  target="$(readlink -f "/usr/${link#"$out"/}")"
  if [ -e "$(dirname "$link")/$(basename "$target")" ]; then
    ln -sfn "$(basename "$target")" "$link"
  else
    rm "$link" && cp "$target" "$link"
  fi
done < <(find "$out" -type l -lname '/*')
# The multiarch headers (OpenSSL's configuration.h) join the plain include folder: a compiler elsewhere
# searches its own multiarch folder, not the bundle's.
cp -a "$out/include/x86_64-linux-gnu/." "$out/include/"
rm -rf "$out/include/x86_64-linux-gnu"

# ---- OpenCV, static, three modules
opencv_prefix="$work/opencv-install"
if [ ! -f "$opencv_prefix/lib/cmake/opencv4/OpenCVConfig.cmake" ]; then
  log "building OpenCV $opencv_version (core, imgproc, imgcodecs; static) in $work"
  if [ ! -f "$work/opencv.tar.gz" ] || ! echo "$opencv_sha256  $work/opencv.tar.gz" | sha256sum -c --quiet; then
    curl -fsSL -o "$work/opencv.tar.gz" "$opencv_url"
    echo "$opencv_sha256  $work/opencv.tar.gz" | sha256sum -c --quiet
  fi
  rm -rf "$work/opencv-src" "$work/opencv-build"
  mkdir -p "$work/opencv-src"
  tar xzf "$work/opencv.tar.gz" -C "$work/opencv-src" --strip-components=2 "opencv-python-headless-$opencv_version/opencv"
  cmake -S "$work/opencv-src" -B "$work/opencv-build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_INSTALL_PREFIX="$opencv_prefix" -DBUILD_LIST=core,imgproc,imgcodecs -DBUILD_SHARED_LIBS=OFF \
    -DCMAKE_POSITION_INDEPENDENT_CODE=ON -DBUILD_TESTS=OFF -DBUILD_PERF_TESTS=OFF -DBUILD_EXAMPLES=OFF -DBUILD_DOCS=OFF \
    -DBUILD_opencv_apps=OFF -DBUILD_JAVA=OFF -DBUILD_opencv_python3=OFF \
    -DWITH_IPP=OFF -DWITH_ITT=OFF -DWITH_OPENCL=OFF -DWITH_VA=OFF -DWITH_CUDA=OFF -DWITH_EIGEN=OFF -DWITH_LAPACK=OFF \
    -DWITH_OPENEXR=OFF -DWITH_TIFF=OFF -DWITH_OPENJPEG=OFF -DWITH_JASPER=OFF -DWITH_GDAL=OFF -DWITH_GDCM=OFF \
    -DWITH_IMGCODEC_HDR=OFF -DWITH_IMGCODEC_SUNRASTER=OFF -DWITH_IMGCODEC_PXM=OFF -DWITH_IMGCODEC_PFM=OFF \
    -DWITH_AVIF=OFF -DWITH_PROTOBUF=OFF -DWITH_FFMPEG=OFF -DWITH_GSTREAMER=OFF -DWITH_V4L=OFF -DWITH_GTK=OFF \
    -DWITH_QT=OFF -DWITH_TBB=OFF -DWITH_OPENMP=OFF -DWITH_KLEIDICV=OFF -DWITH_SPNG=OFF \
    -DWITH_PNG=ON -DBUILD_PNG=ON -DWITH_JPEG=ON -DBUILD_JPEG=ON -DWITH_WEBP=ON -DBUILD_WEBP=ON -DBUILD_ZLIB=ON \
    -DCPU_BASELINE=SSE3 -DCPU_DISPATCH=SSE4_1,SSE4_2,AVX,FP16,AVX2,AVX512_SKX >"$work/opencv-configure.log"
  cmake --build "$work/opencv-build" --target install >"$work/opencv-build.log"
fi
log "OpenCV from $opencv_prefix"
cp -a "$opencv_prefix/include/." "$out/include/"
mkdir -p "$out/lib"
cp -a "$opencv_prefix/lib/." "$out/lib/"
mkdir -p "$out/share/licenses"
cp -a "$opencv_prefix/share/licenses/opencv4" "$out/share/licenses/"

# ---- the shared libraries those need, transitively, that a glibc system does not have
is_base() {  # the C runtime every Linux has (and the GPU nodes' toolchain brings libstdc++ and libgcc_s)
  case "$1" in
    linux-vdso.so*|ld-linux*|libc.so*|libm.so*|libdl.so*|libpthread.so*|librt.so*|libresolv.so*|libutil.so*) return 0 ;;
    libstdc++.so*|libgcc_s.so*) return 0 ;;
  esac
  return 1
}
log "shared libraries they need"
changed=1
while [ "$changed" = 1 ]; do
  changed=0
  while read -r lib; do
    while read -r name path; do
      is_base "$name" && continue
      [ -e "$out/$arch_lib/$name" ] || [ -e "$out/$arch_lib/openmpi/lib/$name" ] || [ -e "$out/$arch_lib/hdf5/serial/$name" ] && continue
      cp -L "$path" "$out/$arch_lib/$name"
      changed=1
    done < <(ldd "$lib" | awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}')
  done < <(find "$out/$arch_lib" -name '*.so*' -type f)
done

# ---- their licences, as Debian ships them
for lib in $(find "$out/$arch_lib" -maxdepth 1 \( -name '*.so*' -o -name '*.a' \)); do
  package="$(dpkg -S "$(readlink -f "/usr/$arch_lib/$(basename "$lib")")" 2>/dev/null | head -1 | cut -d: -f1)" || true
  [ -n "$package" ] && [ -f "/usr/share/doc/$package/copyright" ] || continue
  mkdir -p "$out/share/doc/$package"
  cp "/usr/share/doc/$package/copyright" "$out/share/doc/$package/"
done

# ---- what is in it
cat >"$out/README" <<EOF
sdt's build dependencies besides LibTorch, packed by launcher/setup.sh bundle on $(. /etc/os-release; echo "$PRETTY_NAME")
(glibc $(ldd --version | head -1 | awk '{print $NF}')) from commit $(git -C "$root" rev-parse --short=12 HEAD 2>/dev/null || echo unknown).
OpenCV $opencv_version (core, imgproc, imgcodecs) is built from source; the rest are Debian's packages:
$(dpkg-query -W -f='  ${Package} ${Version}\n' libtoml11-dev libcli11-dev libspdlog-dev libfmt-dev nlohmann-json3-dev \
    libgtest-dev libhdf5-dev libopenmpi-dev libzip-dev libicu-dev libssl-dev zlib1g-dev libsentencepiece-dev 2>/dev/null)
Licences: each library's own, in share/doc/<package>/copyright (Debian's) and share/licenses/opencv4 (OpenCV, Apache-2.0,
and the image libraries it builds).
Use: SDT_BUNDLE=\$PWD/$(basename "$out") Torch_DIR=... bash launcher/setup.sh build
EOF
log "packing $out.tar.xz"
tar cJf "$out.tar.xz" -C "$(dirname "$out")" "$(basename "$out")"
log "$(du -sh "$out" | cut -f1) unpacked, $(du -h "$out.tar.xz" | cut -f1) packed"
