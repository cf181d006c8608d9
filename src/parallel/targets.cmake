# src/parallel/: data parallelism above cluster/'s transport.
#
#   sdt_parallel  DataParallel (what the trainer sees, by --sharding) over its engines: GradientReducer (DDP),
#                 ZeroShards (ZeRO-1/2 of any trained tensors), BlockEngine (per-block full sharding and block
#                 swap of a model's blocks, a BlockRunner), the block memory plan and CPU tensor meter,
#                 checkpoints of blocks that reshard to any rank count
#
# and their tests (tests/parallel/), run as one process and as mpiexec jobs of 2 and 3 ranks; the 2-rank
# job writes a checkpoint that the 3-rank job and the one-process run resume from.
add_library(sdt_parallel STATIC
  src/parallel/sharding.cpp
  src/parallel/flat_layout.cpp
  src/parallel/gradient_reducer.cpp
  src/parallel/zero_shards.cpp
  src/parallel/block_engine.cpp
  src/parallel/memory_plan.cpp
  src/parallel/stack_checkpoint.cpp
  src/parallel/data_parallel.cpp
)
target_link_libraries(sdt_parallel PUBLIC sdt_cluster_comm sdt_models sdt_train_optim)
target_precompile_headers(sdt_parallel REUSE_FROM sdt_torch)

# ---------------------------------------------------------------- tests
add_executable(test_parallel
  tests/parallel/parallel_test_main.cpp
  tests/parallel/tiny_stack.cpp
  tests/parallel/test_swap_schedule.cpp
  tests/parallel/test_block_engine.cpp
  tests/parallel/test_memory_plan.cpp
  tests/parallel/test_stack_checkpoint.cpp
)
target_link_libraries(test_parallel PRIVATE sdt_parallel GTest::gtest)
set(sdt_parallel_checkpoint_dir ${CMAKE_CURRENT_BINARY_DIR}/parallel_checkpoints)
target_compile_definitions(test_parallel PRIVATE SDT_PARALLEL_CHECKPOINT_DIR="${sdt_parallel_checkpoint_dir}")
target_precompile_headers(test_parallel REUSE_FROM sdt_torch)

# As cluster/targets.cmake: root may run mpiexec only when told so, and 3 ranks on 2 cores need
# oversubscription.
set(sdt_parallel_test_environment
  OMP_NUM_THREADS=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1)
add_test(NAME parallel_single_process COMMAND test_parallel)
set(sdt_parallel_tests parallel_single_process)
foreach(ranks 2 3)
  add_test(NAME parallel_mpi_np${ranks}
           COMMAND ${MPIEXEC_EXECUTABLE} ${MPIEXEC_NUMPROC_FLAG} ${ranks} ${MPIEXEC_PREFLAGS}
                   $<TARGET_FILE:test_parallel> ${MPIEXEC_POSTFLAGS})
  list(APPEND sdt_parallel_tests parallel_mpi_np${ranks})
endforeach()
set_tests_properties(${sdt_parallel_tests} PROPERTIES
  ENVIRONMENT "${sdt_parallel_test_environment}" TIMEOUT 300 PROCESSORS 2)
# The 2-rank job saves the checkpoint that the others resume at their rank counts.
set_tests_properties(parallel_mpi_np2 PROPERTIES FIXTURES_SETUP parallel_checkpoint_from_two_ranks)
set_tests_properties(parallel_single_process parallel_mpi_np3 PROPERTIES FIXTURES_REQUIRED parallel_checkpoint_from_two_ranks)

# ---------------------------------------------------------------- benchmark (not run by ctest)
add_executable(bench_sharding bench/bench_sharding.cpp)
target_link_libraries(bench_sharding PRIVATE sdt_parallel)
target_precompile_headers(bench_sharding REUSE_FROM sdt_torch)
