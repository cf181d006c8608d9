# ---------------------------------------------------------------- latent and text-encoder output caches (issue #6)
# HDF5 part files written by serial libhdf5, one series per rank (docs/cache_format.md); kohya's .npz caches read
# through libzip.
# Serial HDF5 by its Debian name (libhdf5_serial, headers in hdf5/serial): each rank writes its own files, and the
# bare name "hdf5" points to the MPI build once libhdf5-openmpi-dev is installed too. Debian's libzip CMake config
# names tools the package does not ship. Both are found by file, which also works in a build bundle (no pkg-config).
find_path(HDF5_SERIAL_INCLUDE_DIR hdf5.h PATH_SUFFIXES hdf5/serial REQUIRED)
find_library(HDF5_SERIAL_LIBRARY hdf5_serial REQUIRED)
add_library(sdt_hdf5 INTERFACE)
target_include_directories(sdt_hdf5 SYSTEM INTERFACE ${HDF5_SERIAL_INCLUDE_DIR})
target_link_libraries(sdt_hdf5 INTERFACE ${HDF5_SERIAL_LIBRARY})
find_path(LIBZIP_INCLUDE_DIR zip.h REQUIRED)
find_library(LIBZIP_LIBRARY zip REQUIRED)
add_library(sdt_libzip INTERFACE)
target_include_directories(sdt_libzip SYSTEM INTERFACE ${LIBZIP_INCLUDE_DIR})
target_link_libraries(sdt_libzip INTERFACE ${LIBZIP_LIBRARY})
find_package(OpenSSL REQUIRED COMPONENTS Crypto)  # SHA-256 of the encoder weights a cache was made with

# The HDF5 layer and the folder format, without LibTorch (fast to compile).
add_library(sdt_cache_format STATIC
  src/cache/h5.cpp
  src/cache/cache_format.cpp
)
target_link_libraries(sdt_cache_format PUBLIC sdt_core sdt_hdf5)

add_library(sdt_cache STATIC
  src/cache/latent_cache.cpp
  src/cache/text_encoder_cache.cpp
  src/cache/npz.cpp
  src/cache/build_cache.cpp
)
target_link_libraries(sdt_cache PUBLIC sdt_cache_format sdt_families sdt_data sdt_libzip OpenSSL::Crypto)
target_precompile_headers(sdt_cache REUSE_FROM sdt_torch)

# Round trips, kill-and-resume, refusals, two ranks against one, kohya's .npz files (fixtures from
# tests/fixtures/cache/gen_npz_fixtures.py), on the tiny SD 1.x model.
add_executable(test_cache
  tests/cache/test_cache_files.cpp
  tests/cache/test_build_cache.cpp
  tests/cache/test_npz.cpp
)
target_link_libraries(test_cache PRIVATE sdt_cache GTest::gtest_main)
target_compile_definitions(test_cache PRIVATE
  SDT_FIXTURES="${CMAKE_SOURCE_DIR}/tests/fixtures"
  SDT_BINARY="$<TARGET_FILE:sdt>")
target_precompile_headers(test_cache REUSE_FROM sdt_torch)
add_dependencies(test_cache sdt)
# One thread: the models are tiny, and OpenMP workers on a busy 2-core machine cost ten times the work.
gtest_discover_tests(test_cache DISCOVERY_TIMEOUT 60 PROPERTIES ENVIRONMENT "OMP_NUM_THREADS=1")

# Read throughput of the cache against raw HDF5 and against one .npz file per item; build rate with 1 and 2 ranks.
add_executable(bench_cache bench/bench_cache.cpp)
target_link_libraries(bench_cache PRIVATE sdt_cache)
target_compile_definitions(bench_cache PRIVATE SDT_FIXTURES="${CMAKE_SOURCE_DIR}/tests/fixtures" SDT_BINARY="$<TARGET_FILE:sdt>")
target_precompile_headers(bench_cache REUSE_FROM sdt_torch)
add_dependencies(bench_cache sdt)
