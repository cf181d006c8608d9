// main of test_cluster: a plain process (the single backend) or every rank of an mpiexec job (the MPI
// backend), reporting as tests/run_tests_on_every_rank.h says.
#include <cstring>

#include "cluster/world.h"
#include "tests/cluster/cluster_test.h"
#include "tests/run_tests_on_every_rank.h"

namespace sdt {
namespace {

const World* the_world = nullptr;

}  // namespace

const World& test_world() { return *the_world; }

}  // namespace sdt

int main(int argc, char** argv) {
  sdt::DistributedSession session;
  sdt::the_world = &session.world();
  if (argc > 1 && std::strcmp(argv[1], "--failing-rank-job") == 0) sdt::run_failing_rank_job(session.world());
  if (argc > 1 && std::strcmp(argv[1], "--stalled-rank-job") == 0) sdt::run_stalled_rank_job(session.world());

  ::testing::InitGoogleTest(&argc, argv);
  return sdt::run_tests_on_every_rank(session);
}
