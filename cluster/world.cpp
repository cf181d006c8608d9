#include "cluster/world.h"

#include <mpi.h>
#include <unistd.h>

#include <array>
#include <cstdlib>
#include <exception>
#include <map>

#include <fmt/format.h>

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

void place_on_nodes(World& world, const std::vector<std::string>& host_of_rank) {
  std::map<std::string, int> node_of_host;
  world.local_rank = 0;
  for (int r = 0; r < static_cast<int>(host_of_rank.size()); ++r) {
    const auto [it, inserted] = node_of_host.emplace(host_of_rank[r], static_cast<int>(node_of_host.size()));
    if (r == world.rank) world.node = it->second;
    if (r < world.rank && host_of_rank[r] == host_of_rank[world.rank]) ++world.local_rank;
  }
  world.node_count = static_cast<int>(node_of_host.size());
}

namespace {

std::string host_name() {
  std::array<char, 256> name{};
  if (gethostname(name.data(), name.size() - 1) != 0) return "unknown-host";
  return name.data();
}

bool mpi_running() {
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  return initialized && !finalized;
}

}  // namespace

DistributedSession::DistributedSession() : world_(world_from_environment()) {
  if (world_.size == 1) return;

  // The communicators run their collectives on a thread of their own, beside the main thread, and
  // abort_job may call MPI_Abort from the main thread while that thread sits in a collective.
  int provided = MPI_THREAD_SINGLE;
  MPI_Init_thread(nullptr, nullptr, MPI_THREAD_MULTIPLE, &provided);
  uses_mpi_ = true;
  if (provided < MPI_THREAD_MULTIPLE) {
    abort_job(world_, "the MPI library does not provide MPI_THREAD_MULTIPLE; sdt runs collectives on a thread of their own");
  }
  int rank = 0, size = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  if (rank != world_.rank || size != world_.size) {
    abort_job(world_, fmt::format("MPI says rank {} of {}, the {} launcher's environment says rank {} of {} "
                                  "(under Slurm, start the ranks with srun --mpi=pmix, or with mpirun)",
                                  rank, size, world_.launcher, world_.rank, world_.size));
  }

  constexpr int kNameBytes = 256;
  std::string own = host_name().substr(0, kNameBytes - 1);
  own.resize(kNameBytes, '\0');
  std::string all(static_cast<size_t>(kNameBytes) * size, '\0');
  MPI_Allgather(own.data(), kNameBytes, MPI_CHAR, all.data(), kNameBytes, MPI_CHAR, MPI_COMM_WORLD);
  std::vector<std::string> host_of_rank;
  for (int r = 0; r < size; ++r) host_of_rank.emplace_back(all.c_str() + static_cast<size_t>(r) * kNameBytes);
  place_on_nodes(world_, host_of_rank);
}

DistributedSession::~DistributedSession() {
  if (!uses_mpi_ || !mpi_running()) return;
  // Destroyed while an exception unwinds the stack: this rank will not reach the collectives the
  // others wait in, and MPI_Finalize would wait for them. Take the job down instead.
  if (std::uncaught_exceptions() > 0) abort_job(world_, "an exception left main without abort_job; stopping the job");
  MPI_Finalize();
}

void abort_job(const World& world, const std::string& what) {
  if (world.size == 1) {
    fmt::print(stderr, "error: {}\n", what);
  } else {
    fmt::print(stderr, "error: rank {} of {} ({}): {}\n", world.rank, world.size, host_name(), what);
  }
  std::fflush(nullptr);
  if (mpi_running()) MPI_Abort(MPI_COMM_WORLD, 1);
  // _Exit, not exit: after an I/O error, libraries' exit handlers (HDF5 closing a file whose write failed on a full
  // disk) can crash and turn a named error into a segfault. Every file sdt writes is whole before it is renamed into
  // place, so there is nothing left to flush but the streams above.
  std::_Exit(1);
}

}  // namespace sdt
