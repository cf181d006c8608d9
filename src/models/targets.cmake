# ---------------------------------------------------------------- the U-Net families' models (SD 1.x / 2.x, SDXL)
# CLIP text encoder, VAE, U-Net and their checkpoint formats. Few translation units: each LibTorch one costs
# ~20 s and ~1.3 GB to compile.
add_library(sdt_models STATIC
  src/models/layers.cpp
  src/models/clip_text.cpp
  src/models/vae.cpp
  src/models/unet.cpp
  src/models/sd_checkpoint.cpp
  src/models/sdxl_checkpoint.cpp
  src/models/flux.cpp
  src/models/t5.cpp
  src/models/flux_checkpoint.cpp
  src/models/fp8.cpp
)
target_link_libraries(sdt_models PUBLIC sdt_torch)
target_precompile_headers(sdt_models REUSE_FROM sdt_torch)

# Conformance against diffusers / transformers (fixtures from tests/fixtures/sd/gen_sd_fixtures.py and
# tests/fixtures/sdxl/gen_sdxl_fixtures.py), checkpoint
# loading and saving, gradient checkpointing.
add_executable(test_models
  tests/models/test_conformance.cpp
  tests/models/test_checkpoint_io.cpp
  tests/models/test_gradient_checkpointing.cpp
  tests/models/test_sdxl_models.cpp
  tests/models/test_flux_models.cpp
)
target_link_libraries(test_models PRIVATE sdt_models GTest::gtest_main)
target_compile_definitions(test_models PRIVATE SDT_FIXTURES="${CMAKE_SOURCE_DIR}/tests/fixtures")
target_precompile_headers(test_models REUSE_FROM sdt_torch)
# One thread: the models are tiny, and OpenMP workers on a busy 2-core machine cost ten times the work.
gtest_discover_tests(test_models DISCOVERY_TIMEOUT 60 PROPERTIES ENVIRONMENT "OMP_NUM_THREADS=1")
