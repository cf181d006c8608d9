# ---------------------------------------------------------------- DDPM training math (issue #5)
# Noise schedule, noise variants, timesteps, targets, loss types and SNR weights of SD 1.x/2.x and SDXL.
add_library(sdt_train_diffusion STATIC src/train/diffusion.cpp)
target_link_libraries(sdt_train_diffusion PUBLIC sdt_torch)
target_precompile_headers(sdt_train_diffusion REUSE_FROM sdt_torch)

# Against kohya's own functions run on fixed seeds (tests/fixtures/train/gen_diffusion_fixtures.py).
add_executable(test_train_diffusion tests/train/test_diffusion.cpp)
target_link_libraries(test_train_diffusion PRIVATE sdt_train_diffusion GTest::gtest_main)
target_compile_definitions(test_train_diffusion PRIVATE SDT_FIXTURES="${CMAKE_SOURCE_DIR}/tests/fixtures")
target_precompile_headers(test_train_diffusion REUSE_FROM sdt_torch)
# One thread: tiny tensors, and OpenMP workers on a busy 2-core machine cost more than the work.
gtest_discover_tests(test_train_diffusion DISCOVERY_TIMEOUT 60 PROPERTIES ENVIRONMENT "OMP_NUM_THREADS=1")
