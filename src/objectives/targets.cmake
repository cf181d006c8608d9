# ---------------------------------------------------------------- training objectives
# The TrainingObjective interface (objective.h); DDPM (noise schedule, noise variants, timesteps, targets, loss types
# and SNR weights of SD 1.x/2.x and SDXL) and flow matching (FLUX.1, Chroma and the other transformer families).
add_library(sdt_objectives STATIC src/objectives/ddpm.cpp src/objectives/flow_matching.cpp)
target_link_libraries(sdt_objectives PUBLIC sdt_torch)
target_precompile_headers(sdt_objectives REUSE_FROM sdt_torch)

# Against kohya's own functions run on fixed seeds (tests/fixtures/train/gen_diffusion_fixtures.py,
# tests/fixtures/objectives/gen_flow_matching_fixtures.py).
add_executable(test_objectives tests/objectives/test_ddpm.cpp tests/objectives/test_flow_matching.cpp)
target_link_libraries(test_objectives PRIVATE sdt_objectives GTest::gtest_main)
target_compile_definitions(test_objectives PRIVATE SDT_FIXTURES="${CMAKE_SOURCE_DIR}/tests/fixtures")
target_precompile_headers(test_objectives REUSE_FROM sdt_torch)
# One thread: tiny tensors, and OpenMP workers on a busy 2-core machine cost more than the work.
gtest_discover_tests(test_objectives DISCOVERY_TIMEOUT 60 PROPERTIES ENVIRONMENT "OMP_NUM_THREADS=1")
