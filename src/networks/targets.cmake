# ---------------------------------------------------------------- LoRA networks and merging (issue #5)
# kohya's networks/lora.py (modules, names, file format, metadata and hashes) and networks/merge_lora.py.
find_package(OpenSSL REQUIRED COMPONENTS Crypto)  # libcrypto's SHA-256 for the sshs_* hashes
add_library(sdt_networks STATIC
  src/networks/lora.cpp
  src/networks/lora_metadata.cpp
  src/networks/merge.cpp
)
target_link_libraries(sdt_networks PUBLIC sdt_models OpenSSL::Crypto)
target_precompile_headers(sdt_networks REUSE_FROM sdt_torch)

# Against kohya's own code run on the same tiny diffusers models (fixtures from
# tests/fixtures/networks/gen_lora_fixtures.py).
add_executable(test_networks
  tests/networks/test_lora.cpp
  tests/networks/test_lora_dropout.cpp
  tests/networks/test_lora_ggpo.cpp
  tests/networks/test_lora_file.cpp
  tests/networks/test_merge.cpp
)
target_link_libraries(test_networks PRIVATE sdt_networks sdt_families GTest::gtest_main)
target_compile_definitions(test_networks PRIVATE SDT_FIXTURES="${CMAKE_SOURCE_DIR}/tests/fixtures")
target_precompile_headers(test_networks REUSE_FROM sdt_torch)
# One thread: the models are tiny, and OpenMP workers on a busy 2-core machine cost ten times the work.
gtest_discover_tests(test_networks DISCOVERY_TIMEOUT 60 PROPERTIES ENVIRONMENT "OMP_NUM_THREADS=1")

# A LoRA our code writes, loaded by diffusers' kohya-format loader (pipe.load_lora_weights) into the tiny SD 1.x and
# SDXL pipelines: their U-Net and text encoder outputs must equal ours with the adapters applied. Skipped (exit 77) when
# the configured Python cannot import diffusers and peft.
add_executable(write_lora_check_files tests/networks/write_lora_check_files.cpp)
target_link_libraries(write_lora_check_files PRIVATE sdt_networks sdt_families)
target_precompile_headers(write_lora_check_files REUSE_FROM sdt_torch)
add_test(NAME lora_diffusers_loads_ours
  COMMAND bash ${CMAKE_SOURCE_DIR}/tests/check_lora_with_diffusers.sh $<TARGET_FILE:write_lora_check_files>
          sd ${CMAKE_SOURCE_DIR}/tests/fixtures/sd/sd1 "${SDT_PYTHON}")
add_test(NAME lora_diffusers_loads_ours_sdxl
  COMMAND bash ${CMAKE_SOURCE_DIR}/tests/check_lora_with_diffusers.sh $<TARGET_FILE:write_lora_check_files>
          sdxl ${CMAKE_SOURCE_DIR}/tests/fixtures/sdxl/sdxl_a "${SDT_PYTHON}")
add_test(NAME lora_diffusers_loads_ours_flux
  COMMAND bash ${CMAKE_SOURCE_DIR}/tests/check_lora_with_diffusers.sh $<TARGET_FILE:write_lora_check_files>
          flux ${CMAKE_SOURCE_DIR}/tests/fixtures/flux/tiny "${SDT_PYTHON}")
set_tests_properties(lora_diffusers_loads_ours lora_diffusers_loads_ours_sdxl lora_diffusers_loads_ours_flux PROPERTIES SKIP_RETURN_CODE 77
                     ENVIRONMENT "OMP_NUM_THREADS=1")
