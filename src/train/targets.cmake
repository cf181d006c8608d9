# ---------------------------------------------------------------- optimizers and lr schedules (issue #5)
# AdamW, AdamW8bit, Lion, SGDNesterov, Adafactor, Prodigy with kohya's --optimizer_type/--optimizer_args,
# the lr schedules of --lr_scheduler, and optimizer state to and from safetensors for an exact resume.
add_library(sdt_train_optim STATIC
  src/train/optimizers.cpp
  src/train/make_optimizer.cpp
  src/train/fused_steps.cpp
  src/train/lr_schedule.cpp
)
target_link_libraries(sdt_train_optim PUBLIC sdt_torch)
target_precompile_headers(sdt_train_optim REUSE_FROM sdt_torch)

# Every optimizer step for step against its reference package, every schedule against transformers /
# diffusers (fixtures from tests/fixtures/train/gen_optimizer_fixtures.py), the argument parser, resume.
add_executable(test_train_optim tests/train/test_optimizers.cpp tests/train/test_lr_schedule.cpp)
target_link_libraries(test_train_optim PRIVATE sdt_train_optim GTest::gtest_main)
target_compile_definitions(test_train_optim PRIVATE SDT_FIXTURES="${CMAKE_SOURCE_DIR}/tests/fixtures")
target_precompile_headers(test_train_optim REUSE_FROM sdt_torch)
# One thread: tiny tensors, and OpenMP workers on a busy 2-core machine cost more than the work.
gtest_discover_tests(test_train_optim DISCOVERY_TIMEOUT 60 PROPERTIES ENVIRONMENT "OMP_NUM_THREADS=1")

# kohya's optimizer steps inside backward through DataParallel's gradient callback, against sdxl_train.py's hooks
# (fixture from tests/fixtures/train/gen_fused_step_fixtures.py).
add_executable(test_fused_steps tests/train/test_fused_steps.cpp)
target_link_libraries(test_fused_steps PRIVATE sdt_parallel sdt_train_optim GTest::gtest_main)
target_compile_definitions(test_fused_steps PRIVATE SDT_FIXTURES="${CMAKE_SOURCE_DIR}/tests/fixtures")
target_precompile_headers(test_fused_steps REUSE_FROM sdt_torch)
gtest_discover_tests(test_fused_steps DISCOVERY_TIMEOUT 60 PROPERTIES ENVIRONMENT "OMP_NUM_THREADS=1")
