// Where this process sits among the job's processes: rank, world size and rank within its node,
// as the launcher (mpirun / srun) reports them. A process started without a launcher is rank 0 of 1.
#pragma once

#include <functional>
#include <optional>
#include <string>

namespace sdt {

struct World {
  int rank = 0;
  int size = 1;
  int local_rank = 0;
  std::string launcher = "none";  // "openmpi", "slurm", "pmi" or "none"
};

// Reads the launcher's environment variables; `getenv` is injectable for tests.
World world_from_environment(const std::function<std::optional<std::string>(const char*)>& getenv);
World world_from_environment();

}  // namespace sdt
