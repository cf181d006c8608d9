# src/dist/: distributed training engines above cluster/ (issue #8).
#
#   sdt_dist  BlockStack (per-block full sharding and block swap of a stack of identical blocks),
#             its memory plan and CPU tensor meter, checkpoints that reshard to any rank count;
#             ZeroShards (ZeRO-1/2 sharding of any trained tensors) and ShardedUnits (full sharding of a
#             model's unlike blocks, the U-Net's), used by the trainer
#
# and their tests (tests/dist/), run as one process and as mpiexec jobs of 2 and 3 ranks; the 2-rank
# job writes a checkpoint that the 3-rank job and the one-process run resume from.
add_library(sdt_dist STATIC
  src/dist/flat_layout.cpp
  src/dist/block_stack.cpp
  src/dist/memory_plan.cpp
  src/dist/stack_checkpoint.cpp
  src/dist/zero_shards.cpp
  src/dist/sharded_units.cpp
)
target_link_libraries(sdt_dist PUBLIC sdt_cluster_comm sdt_models)
target_precompile_headers(sdt_dist REUSE_FROM sdt_torch)

# ---------------------------------------------------------------- tests
add_executable(test_dist
  tests/dist/dist_test_main.cpp
  tests/dist/tiny_stack.cpp
  tests/dist/test_swap_schedule.cpp
  tests/dist/test_block_stack.cpp
  tests/dist/test_memory_plan.cpp
  tests/dist/test_stack_checkpoint.cpp
)
target_link_libraries(test_dist PRIVATE sdt_dist sdt_train_optim GTest::gtest)
set(sdt_dist_checkpoint_dir ${CMAKE_CURRENT_BINARY_DIR}/dist_checkpoints)
target_compile_definitions(test_dist PRIVATE SDT_DIST_CHECKPOINT_DIR="${sdt_dist_checkpoint_dir}")
target_precompile_headers(test_dist REUSE_FROM sdt_torch)

# As cluster/targets.cmake: root may run mpiexec only when told so, and 3 ranks on 2 cores need
# oversubscription.
set(sdt_dist_test_environment
  OMP_NUM_THREADS=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1)
add_test(NAME dist_single_process COMMAND test_dist)
set(sdt_dist_tests dist_single_process)
foreach(ranks 2 3)
  add_test(NAME dist_mpi_np${ranks}
           COMMAND ${MPIEXEC_EXECUTABLE} ${MPIEXEC_NUMPROC_FLAG} ${ranks} ${MPIEXEC_PREFLAGS}
                   $<TARGET_FILE:test_dist> ${MPIEXEC_POSTFLAGS})
  list(APPEND sdt_dist_tests dist_mpi_np${ranks})
endforeach()
set_tests_properties(${sdt_dist_tests} PROPERTIES
  ENVIRONMENT "${sdt_dist_test_environment}" TIMEOUT 300 PROCESSORS 2)
# The 2-rank job saves the checkpoint that the others resume at their rank counts.
set_tests_properties(dist_mpi_np2 PROPERTIES FIXTURES_SETUP dist_checkpoint_from_two_ranks)
set_tests_properties(dist_single_process dist_mpi_np3 PROPERTIES FIXTURES_REQUIRED dist_checkpoint_from_two_ranks)

# ---------------------------------------------------------------- benchmark (not run by ctest)
add_executable(bench_sharding bench/bench_sharding.cpp)
target_link_libraries(bench_sharding PRIVATE sdt_dist sdt_train_optim)
target_precompile_headers(bench_sharding REUSE_FROM sdt_torch)
