# The Slurm job scripts (slurm/) on a one-node cluster the test brings up and stops itself: the cache pre-pass and
# the training job that depends on it, 2 ranks each (srun --mpi=pmix), and requeue after SIGUSR1. Skipped (77)
# without slurm-wlm and munge. RUN_SERIAL: the cluster's node is the whole machine. The test bounds its own waits
# (under 8 minutes in all) so that it always stops the daemons before TIMEOUT would kill it.
add_test(NAME slurm_end_to_end
         COMMAND bash ${CMAKE_SOURCE_DIR}/tests/slurm/slurm_end_to_end.sh $<TARGET_FILE:sdt> ${CMAKE_SOURCE_DIR})
set_tests_properties(slurm_end_to_end PROPERTIES
  SKIP_RETURN_CODE 77 TIMEOUT 600 RUN_SERIAL TRUE PROCESSORS 2 ENVIRONMENT "OMP_NUM_THREADS=1")
