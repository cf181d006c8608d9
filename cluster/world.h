// Where this process sits among the job's processes: rank, world size, rank within its node and
// the node, as the launcher (mpirun / srun) reports them. A process started without a launcher is
// rank 0 of 1 and never touches MPI.
#pragma once

#include <functional>
#include <optional>
#include <string>
#include <vector>

namespace sdt {

struct World {
  int rank = 0;
  int size = 1;
  int local_rank = 0;     // rank among the processes on this node: picks the GPU
  int node = 0;           // index of this node, nodes numbered in order of their lowest rank
  int node_count = 1;
  std::string launcher = "none";  // "openmpi", "slurm", "pmi" or "none"
};

// Reads the launcher's environment variables; `getenv` is injectable for tests. Nodes are not in
// the environment of every launcher, so node and node_count stay 0 and 1 here; DistributedSession
// fills them in from the host names.
World world_from_environment(const std::function<std::optional<std::string>(const char*)>& getenv);
World world_from_environment();

// The process's part in the job, from MPI_Init to MPI_Finalize. Construct one at the top of main,
// before any other thread starts, and keep it until main returns.
//
// MPI is initialised only when the launcher's environment says the job has more than one process.
// A plain `sdt inspect` or a one-process `sdt train` then needs no mpirun and no MPI at all:
// Open MPI's singleton MPI_Init works, but it forks a helper daemon, and under srun without a PMI
// plugin it fails, so a command that has no one to talk to should not pay for it or risk it.
//
// With MPI, local_rank, node and node_count come from comparing host names across ranks (one
// MPI_Allgather), not from the launcher's variables: srun, mpirun and hand-written host files
// agree on host names, not on which variables they set.
class DistributedSession {
 public:
  DistributedSession();
  ~DistributedSession();
  DistributedSession(const DistributedSession&) = delete;
  DistributedSession& operator=(const DistributedSession&) = delete;

  const World& world() const { return world_; }
  bool uses_mpi() const { return uses_mpi_; }

 private:
  World world_;
  bool uses_mpi_ = false;
};

// Places ranks on nodes from their host names, in rank order: node numbers follow each node's
// lowest rank, local ranks count the lower ranks on the same host. Pure, for tests.
void place_on_nodes(World& world, const std::vector<std::string>& host_of_rank);

// Brings the whole job down after an error on this rank: prints "error: rank R of N (host): what"
// to stderr ("error: what" in a one-process job) and, when MPI runs, calls MPI_Abort, which makes
// the launcher kill every other rank (blocked in a collective or not) and exit non-zero. Without
// MPI it exits with status 1.
// A rank that just returned from main instead would leave the others waiting for it forever.
[[noreturn]] void abort_job(const World& world, const std::string& what);

}  // namespace sdt
