# ---------------------------------------------------------------- model families (issue #4)
# The strategy interfaces and the registry (family.h), SD 1.x / 2.x as the first family, its samplers, SDXL. Few
# translation units: each LibTorch one costs ~20-30 s and ~1.3 GB to compile.
add_library(sdt_families STATIC
  src/families/family.cpp
  src/families/sd/sd_family.cpp
  src/families/sdxl/sdxl_family.cpp
  src/families/flux/flux_family.cpp
  src/families/flux/flux_lora_format.cpp
  src/families/flux/flux_network.cpp
  src/families/sd/sampling.cpp
)
target_link_libraries(sdt_families PUBLIC sdt_models sdt_networks sdt_objectives sdt_tokenizers sdt_data)
target_precompile_headers(sdt_families REUSE_FROM sdt_torch)

# Schedulers against diffusers (fixtures from tests/fixtures/sd/gen_sampling_fixtures.py), the strategies on the tiny
# SD and SDXL models (tests/fixtures/sdxl), the registry, and `sdt sample` end to end.
add_executable(test_families
  tests/families/test_sampling.cpp
  tests/families/test_sd_family.cpp
  tests/families/test_sdxl_family.cpp
  tests/families/test_flux_family.cpp
)
target_link_libraries(test_families PRIVATE sdt_families sdt_networks GTest::gtest_main)
target_compile_definitions(test_families PRIVATE
  SDT_FIXTURES="${CMAKE_SOURCE_DIR}/tests/fixtures"
  SDT_BINARY="$<TARGET_FILE:sdt>")
target_precompile_headers(test_families REUSE_FROM sdt_torch)
add_dependencies(test_families sdt)
# One thread: the models are tiny, and OpenMP workers on a busy 2-core machine cost ten times the work.
gtest_discover_tests(test_families DISCOVERY_TIMEOUT 60 PROPERTIES ENVIRONMENT "OMP_NUM_THREADS=1")

# Forward + backward time of one U-Net in LibTorch; bench/bench_unet_pytorch.py times the same model in PyTorch.
add_executable(bench_unet bench/bench_unet.cpp)
target_link_libraries(bench_unet PRIVATE sdt_models)
target_precompile_headers(bench_unet REUSE_FROM sdt_torch)

# The tiny test-only DiT family (flow matching, several-tensor blocks) trained through `sdt train`: the proof that a
# second family needs nothing outside its folder.
add_executable(test_tiny_dit tests/families/test_tiny_dit.cpp tests/families/tiny_dit/tiny_dit.cpp)
target_link_libraries(test_tiny_dit PRIVATE sdt_trainer GTest::gtest_main)
target_compile_definitions(test_tiny_dit PRIVATE SDT_FIXTURES="${CMAKE_SOURCE_DIR}/tests/fixtures")
target_precompile_headers(test_tiny_dit REUSE_FROM sdt_torch)
gtest_discover_tests(test_tiny_dit DISCOVERY_TIMEOUT 60 PROPERTIES ENVIRONMENT "OMP_NUM_THREADS=1")
