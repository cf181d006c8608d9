// Shared by the cluster tests: the process's place in the job, set up by mpi_test_main.cpp.
#pragma once

#include "cluster/world.h"

namespace sdt {

// This process's World, from the DistributedSession that main holds.
const World& test_world();

// Played by test_cluster itself when FailingRank.* starts it under mpiexec: every rank joins a
// first all-reduce, then rank 1 throws while a second one is in flight and the others wait in
// theirs. Never returns normally.
[[noreturn]] void run_failing_rank_job(const World& world);
// Rank 1 stops itself (SIGSTOP) before a collective with a 3 s timeout; rank 0's watchdog ends the job.
[[noreturn]] void run_stalled_rank_job(const World& world);

}  // namespace sdt
