// main of test_dist. The same binary runs as a plain process (the single backend) and as every rank of
// an mpiexec job (the MPI backend): each rank runs every test, rank 0 prints the usual report, the
// other ranks print only their failures, and the exit status is the worst rank's (as test_cluster).
// The CPU tensor meter goes in first, so the memory tests see every tensor.
#include <gtest/gtest.h>
#include <mpi.h>

#include <fmt/format.h>

#include "cluster/world.h"
#include "src/dist/memory_plan.h"
#include "tests/dist/tiny_stack.h"

namespace sdt {
namespace {

Communicator* the_communicator = nullptr;

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

Communicator& test_communicator() { return *the_communicator; }

}  // namespace sdt

int main(int argc, char** argv) {
  sdt::CpuTensorMeter::install();
  sdt::DistributedSession session;
  const std::unique_ptr<sdt::Communicator> communicator = sdt::make_communicator(session.world(), at::kCPU);
  sdt::the_communicator = communicator.get();

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
