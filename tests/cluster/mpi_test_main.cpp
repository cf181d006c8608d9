// main of test_cluster. The same binary runs as a plain process (the single backend) and as every
// rank of an mpiexec job (the MPI backend): each rank runs every test, rank 0 prints the usual
// report, the other ranks print only their failures, and the exit status is the worst rank's.
#include <gtest/gtest.h>
#include <mpi.h>

#include <cstring>

#include <fmt/format.h>

#include "cluster/world.h"
#include "tests/cluster/cluster_test.h"

namespace sdt {
namespace {

const World* the_world = nullptr;

// The report of a rank other than 0: its failed assertions, tagged with the rank.
class FailurePrinter final : public ::testing::EmptyTestEventListener {
 public:
  explicit FailurePrinter(int rank) : rank_(rank) {}
  void OnTestPartResult(const ::testing::TestPartResult& result) override {
    if (!result.failed()) return;
    fmt::print(stderr, "[rank {}] {}:{}: failure\n{}\n", rank_, result.file_name() ? result.file_name() : "?",
               result.line_number(), result.message());
  }

 private:
  int rank_;
};

}  // namespace

const World& test_world() { return *the_world; }

}  // namespace sdt

int main(int argc, char** argv) {
  sdt::DistributedSession session;
  sdt::the_world = &session.world();
  if (argc > 1 && std::strcmp(argv[1], "--failing-rank-job") == 0) sdt::run_failing_rank_job(session.world());

  ::testing::InitGoogleTest(&argc, argv);
  const int rank = session.world().rank;
  if (rank != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new sdt::FailurePrinter(rank));
  }
  int failed = RUN_ALL_TESTS();
  if (session.uses_mpi()) MPI_Allreduce(MPI_IN_PLACE, &failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  return failed;
}
