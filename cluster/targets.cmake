# cluster/: where a process sits in the job and how the ranks talk.
#
#   sdt_cluster       World, the MPI session, abort_job (MPI, no LibTorch: fast to build and link)
#   sdt_cluster_comm  communicators (single, MPI, NCCL) and the gradient reducer (LibTorch)
#
# and their tests (tests/cluster/), run as one process and as mpiexec jobs of 2 and 3 ranks.
find_package(MPI REQUIRED COMPONENTS CXX)

add_library(sdt_cluster STATIC cluster/world.cpp)
target_link_libraries(sdt_cluster PUBLIC sdt_core MPI::MPI_CXX)

# The LibTorch half reuses sdt_torch's precompiled header, and the top-level CMakeLists.txt defines
# sdt_torch after including this file: its targets are made at the end of the top-level file.
function(sdt_cluster_torch_targets)
  # The NCCL backend needs a CUDA build of LibTorch (its CUDA streams, events and allocator), so it
  # is on exactly when the LibTorch found has CUDA, unless switched off.
  if(CAFFE2_USE_CUDA)
    set(sdt_torch_has_cuda ON)
  else()
    set(sdt_torch_has_cuda OFF)
  endif()
  option(SDT_CUDA "Build the NCCL communicator for CUDA tensors (needs a CUDA LibTorch)" ${sdt_torch_has_cuda})
  if(SDT_CUDA AND NOT sdt_torch_has_cuda)
    message(FATAL_ERROR "SDT_CUDA=ON needs a CUDA build of LibTorch; Torch_DIR=${Torch_DIR} has no CUDA")
  endif()

  add_library(sdt_cluster_comm STATIC cluster/communicator.cpp)
  target_link_libraries(sdt_cluster_comm PUBLIC sdt_cluster sdt_torch)
  target_precompile_headers(sdt_cluster_comm REUSE_FROM sdt_torch)

  if(SDT_CUDA)
    # NCCL from the torch wheel (nvidia-nccl-*), the one libtorch_cuda loads, else from the CUDA
    # toolkit; there is no CMake config for it in either place.
    find_path(NCCL_INCLUDE_DIR nccl.h
              HINTS ${TORCH_INSTALL_PREFIX}/../nvidia/nccl/include ${CUDAToolkit_INCLUDE_DIRS} REQUIRED)
    find_library(NCCL_LIBRARY NAMES nccl libnccl.so.2
                 HINTS ${TORCH_INSTALL_PREFIX}/../nvidia/nccl/lib ${CUDAToolkit_LIBRARY_DIR} REQUIRED)
    message(STATUS "NCCL backend: ${NCCL_INCLUDE_DIR}/nccl.h, ${NCCL_LIBRARY}")
    target_sources(sdt_cluster_comm PRIVATE cluster/nccl_communicator.cpp)
    target_compile_definitions(sdt_cluster_comm PUBLIC SDT_CUDA)
    target_include_directories(sdt_cluster_comm SYSTEM PRIVATE ${NCCL_INCLUDE_DIR})
    target_link_libraries(sdt_cluster_comm PUBLIC ${NCCL_LIBRARY})
  endif()

  # ---------------------------------------------------------------- tests
  # One GoogleTest binary, run as a plain process (the single backend) and as every rank of mpiexec
  # jobs (the MPI backend); its main combines the ranks' results. It also plays the failing job
  # that FailingRank.* starts through mpiexec.
  add_executable(test_cluster
    tests/cluster/mpi_test_main.cpp
    tests/cluster/test_communicator.cpp
    tests/cluster/test_gradient_reducer.cpp
  )
  target_link_libraries(test_cluster PRIVATE sdt_parallel GTest::gtest)
  target_compile_definitions(test_cluster PRIVATE SDT_MPIEXEC="${MPIEXEC_EXECUTABLE}")
  target_precompile_headers(test_cluster REUSE_FROM sdt_torch)

  # Root may run mpiexec only when told so; 3 ranks on a 2-core machine need oversubscription
  # (the variable rather than Open MPI's --oversubscribe flag, which other MPIs would refuse).
  set(sdt_cluster_test_environment
    OMP_NUM_THREADS=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1)
  add_test(NAME cluster_single_process COMMAND test_cluster --gtest_filter=-FailingRank.*)
  add_test(NAME cluster_failing_rank_aborts_job COMMAND test_cluster --gtest_filter=FailingRank.*)
  set(sdt_cluster_tests cluster_single_process cluster_failing_rank_aborts_job)
  foreach(ranks 2 3)
    add_test(NAME cluster_mpi_np${ranks}
             COMMAND ${MPIEXEC_EXECUTABLE} ${MPIEXEC_NUMPROC_FLAG} ${ranks} ${MPIEXEC_PREFLAGS}
                     $<TARGET_FILE:test_cluster> ${MPIEXEC_POSTFLAGS} --gtest_filter=-FailingRank.*)
    list(APPEND sdt_cluster_tests cluster_mpi_np${ranks})
  endforeach()
  set_tests_properties(${sdt_cluster_tests} PROPERTIES
    ENVIRONMENT "${sdt_cluster_test_environment}" TIMEOUT 180 PROCESSORS 2)

  # ---------------------------------------------------------------- benchmark (not run by ctest)
  add_executable(bench_allreduce bench/bench_allreduce.cpp)
  target_link_libraries(bench_allreduce PRIVATE sdt_parallel)
  target_precompile_headers(bench_allreduce REUSE_FROM sdt_torch)
endfunction()
cmake_language(DEFER CALL sdt_cluster_torch_targets)
