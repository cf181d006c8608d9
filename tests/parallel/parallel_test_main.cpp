// main of test_parallel: a plain process (the single backend) or every rank of an mpiexec job (the MPI
// backend), reporting as tests/run_tests_on_every_rank.h says. The CPU tensor meter goes in first, so
// the memory tests see every tensor.
#include "cluster/world.h"
#include "src/parallel/memory_plan.h"
#include "tests/parallel/tiny_stack.h"
#include "tests/run_tests_on_every_rank.h"

namespace sdt {
namespace {

Communicator* the_communicator = nullptr;

}  // namespace

Communicator& test_communicator() { return *the_communicator; }

}  // namespace sdt

int main(int argc, char** argv) {
  sdt::CpuTensorMeter::install();
  sdt::DistributedSession session;
  const std::unique_ptr<sdt::Communicator> communicator = sdt::make_communicator(session.world(), at::kCPU);
  sdt::the_communicator = communicator.get();

  ::testing::InitGoogleTest(&argc, argv);
  return sdt::run_tests_on_every_rank(session);
}
