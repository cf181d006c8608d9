#include "cluster/world.h"

#include <cstdlib>

#include "src/core/error.h"

namespace sdt {
namespace {

int env_int(const std::function<std::optional<std::string>(const char*)>& getenv, const char* name, int fallback) {
  auto v = getenv(name);
  if (!v) return fallback;
  try {
    size_t used = 0;
    int x = std::stoi(*v, &used);
    if (used == v->size()) return x;
  } catch (const std::exception&) {
  }
  fail(std::string("environment variable ") + name, "expected an integer, got '{}'", *v);
}

}  // namespace

World world_from_environment(const std::function<std::optional<std::string>(const char*)>& getenv) {
  World w;
  // Open MPI's mpirun, then Slurm's srun, then the generic PMI variables (MPICH, Intel MPI).
  struct Source {
    const char* launcher;
    const char* rank;
    const char* size;
    const char* local_rank;
  };
  static const Source sources[] = {
      {"openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"},
      {"slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"},
      {"pmi", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"},
  };
  for (const auto& s : sources) {
    if (!getenv(s.rank) || !getenv(s.size)) continue;
    w.launcher = s.launcher;
    w.rank = env_int(getenv, s.rank, 0);
    w.size = env_int(getenv, s.size, 1);
    w.local_rank = env_int(getenv, s.local_rank, 0);
    if (w.size < 1 || w.rank < 0 || w.rank >= w.size) {
      fail(std::string("environment variables ") + s.rank + "/" + s.size, "rank {} is not within world size {}", w.rank, w.size);
    }
    break;
  }
  return w;
}

World world_from_environment() {
  return world_from_environment([](const char* name) -> std::optional<std::string> {
    const char* v = std::getenv(name);
    return v ? std::optional<std::string>(v) : std::nullopt;
  });
}

}  // namespace sdt
