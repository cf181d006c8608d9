# The training loop (`sdt train` for networks) on top of the families, networks, optimizers and the
# DDPM math, and its end-to-end test on the tiny SD 1.x fixture model.
add_library(sdt_trainer STATIC src/train/trainer.cpp src/train/trained_model.cpp src/train/train_state.cpp src/train/precision.cpp
                        src/train/sai_model_spec.cpp src/train/dataset_metadata.cpp)
target_link_libraries(sdt_trainer PUBLIC sdt_families sdt_networks sdt_train_optim sdt_objectives sdt_train_metrics
                                         sdt_data_loader sdt_cluster_comm sdt_cache sdt_parallel)
target_precompile_headers(sdt_trainer REUSE_FROM sdt_torch)
target_compile_definitions(sdt_trainer PRIVATE SDT_VERSION="${PROJECT_VERSION}")

add_executable(test_trainer tests/train/test_trainer.cpp tests/train/test_trainer_sdxl.cpp tests/train/test_trainer_flux.cpp tests/train/test_sai_model_spec.cpp
                            tests/train/test_dataset_metadata.cpp)
target_link_libraries(test_trainer PRIVATE sdt_trainer GTest::gtest_main)
target_compile_definitions(test_trainer PRIVATE SDT_SOURCE_DIR="${CMAKE_SOURCE_DIR}" SDT_FIXTURES="${CMAKE_SOURCE_DIR}/tests/fixtures"
                                             SDT_VERSION="${PROJECT_VERSION}")
target_precompile_headers(test_trainer REUSE_FROM sdt_torch)
gtest_discover_tests(test_trainer DISCOVERY_TIMEOUT 60 PROPERTIES ENVIRONMENT "OMP_NUM_THREADS=1")

# The first training step (loss and every LoRA gradient) against kohya's own step on the tiny SD 1.x model
# (tests/fixtures/train/gen_first_step.py). It runs the trainer's pieces, not train_network, so it links just those.
add_executable(test_first_step tests/train/test_first_step.cpp)
target_link_libraries(test_first_step PRIVATE sdt_families sdt_networks sdt_objectives GTest::gtest_main)
target_compile_definitions(test_first_step PRIVATE SDT_FIXTURES="${CMAKE_SOURCE_DIR}/tests/fixtures")
target_precompile_headers(test_first_step REUSE_FROM sdt_torch)
gtest_discover_tests(test_first_step DISCOVERY_TIMEOUT 60 PROPERTIES ENVIRONMENT "OMP_NUM_THREADS=1")

# The step time split of the demo configuration and the trainer's overhead over a bare LibTorch loop (not run by ctest).
add_executable(bench_train_step bench/bench_train_step.cpp)
target_link_libraries(bench_train_step PRIVATE sdt_trainer)
target_precompile_headers(bench_train_step REUSE_FROM sdt_torch)

# One LoRA step of a full-size SD 1.x U-Net from cached latents: step time split and peak memory, beside kohya's
# (bench/bench_lora_step_kohya.py runs the same step with kohya's networks/lora.py). Not run by ctest.
add_executable(bench_lora_step bench/bench_lora_step.cpp)
target_link_libraries(bench_lora_step PRIVATE sdt_trainer)
target_precompile_headers(bench_lora_step REUSE_FROM sdt_torch)

# Memory plan, measured peak and step time per rank in every --sharding mode, one process or under mpiexec (not run by ctest).
add_executable(bench_flux_train bench/bench_flux_train.cpp)
target_link_libraries(bench_flux_train PRIVATE sdt_trainer)
target_precompile_headers(bench_flux_train REUSE_FROM sdt_torch)
add_executable(bench_train_sharding bench/bench_train_sharding.cpp)
target_link_libraries(bench_train_sharding PRIVATE sdt_trainer)
target_precompile_headers(bench_train_sharding REUSE_FROM sdt_torch)

# N ranks train like one process (LoRA and full fine-tuning), only rank 0 writes, a 2-rank state resumes on 3 ranks:
# run as one process and as mpiexec jobs of 2 and 3 ranks (the np3 job resumes what the np2 job saved).
add_executable(test_trainer_distributed tests/train/test_trainer_distributed.cpp tests/families/tiny_dit/tiny_dit.cpp)
target_link_libraries(test_trainer_distributed PRIVATE sdt_trainer GTest::gtest)
target_compile_definitions(test_trainer_distributed PRIVATE SDT_FIXTURES="${CMAKE_SOURCE_DIR}/tests/fixtures"
                                                           SDT_BINARY_DIR="${CMAKE_BINARY_DIR}")
target_precompile_headers(test_trainer_distributed REUSE_FROM sdt_torch)
add_test(NAME trainer_distributed_single_process COMMAND test_trainer_distributed)
foreach(ranks 2 3)
  add_test(NAME trainer_distributed_np${ranks}
           COMMAND ${MPIEXEC_EXECUTABLE} ${MPIEXEC_NUMPROC_FLAG} ${ranks} ${MPIEXEC_PREFLAGS}
                   $<TARGET_FILE:test_trainer_distributed> ${MPIEXEC_POSTFLAGS})
endforeach()
set_tests_properties(trainer_distributed_np2 PROPERTIES FIXTURES_SETUP distributed_resume_state)
set_tests_properties(trainer_distributed_np3 PROPERTIES FIXTURES_REQUIRED distributed_resume_state)
set_tests_properties(trainer_distributed_single_process trainer_distributed_np2 trainer_distributed_np3 PROPERTIES
  ENVIRONMENT "OMP_NUM_THREADS=1;OMPI_ALLOW_RUN_AS_ROOT=1;OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1;OMPI_MCA_rmaps_base_oversubscribe=1"
  TIMEOUT 600 PROCESSORS 2)

# A rank killed with SIGKILL ends the mpiexec job within 60 s and the rerun resumes from the last complete state;
# SIGUSR1 saves the state on every rank at the same step and exits with 75.
add_test(NAME trainer_killed_rank_and_preemption
         COMMAND bash ${CMAKE_SOURCE_DIR}/tests/train/kill_rank_and_resume.sh $<TARGET_FILE:sdt> ${CMAKE_SOURCE_DIR})
set_tests_properties(trainer_killed_rank_and_preemption PROPERTIES TIMEOUT 300 PROCESSORS 2)

# --device: the device selection, and training on a CUDA device against the CPU run (skipped without a CUDA device).
add_executable(test_device tests/train/test_device.cpp tests/train/test_cuda_training.cpp tests/families/tiny_dit/tiny_dit.cpp)
target_link_libraries(test_device PRIVATE sdt_trainer GTest::gtest_main)
target_compile_definitions(test_device PRIVATE SDT_FIXTURES="${CMAKE_SOURCE_DIR}/tests/fixtures")
target_precompile_headers(test_device REUSE_FROM sdt_torch)
gtest_discover_tests(test_device DISCOVERY_TIMEOUT 60 PROPERTIES ENVIRONMENT "OMP_NUM_THREADS=1")
