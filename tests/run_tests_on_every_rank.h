// The main of a test binary that runs as a plain process and as every rank of an mpiexec job: each
// rank runs every test, rank 0 prints the usual report, the other ranks print only their failures
// (tagged with the rank), and the exit status is the worst rank's. Used by test_cluster, test_parallel
// and test_trainer_distributed.
#pragma once

#include <gtest/gtest.h>
#include <mpi.h>

#include <fmt/format.h>

#include "cluster/world.h"

namespace sdt {

// The report of a rank other than 0: its failed assertions, tagged with the rank.
class RankFailurePrinter final : public ::testing::EmptyTestEventListener {
 public:
  explicit RankFailurePrinter(int rank) : rank_(rank) {}
  void OnTestPartResult(const ::testing::TestPartResult& result) override {
    if (!result.failed()) return;
    fmt::print(stderr, "[rank {}] {}:{}: failure\n{}\n", rank_, result.file_name() ? result.file_name() : "?",
               result.line_number(), result.message());
  }

 private:
  int rank_;
};

// After InitGoogleTest: runs the tests and returns the worst rank's RUN_ALL_TESTS() status.
inline int run_tests_on_every_rank(const DistributedSession& session) {
  const int rank = session.world().rank;
  if (rank != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new RankFailurePrinter(rank));
  }
  int failed = RUN_ALL_TESTS();
  if (session.uses_mpi()) MPI_Allreduce(MPI_IN_PLACE, &failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  return failed;
}

}  // namespace sdt
