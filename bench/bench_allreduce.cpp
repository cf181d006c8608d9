// All-reduce throughput of float32 buffers from 1 MiB up: raw MPI_Allreduce, our MPI communicator
// (its communication thread and hand-off), and GradientReducer::finish() over 1 MiB parameters in
// 25 MiB buckets (copies into and out of the flat buckets included; no backward to overlap with).
//
//   mpiexec -n 2 build/bench_allreduce [max_mib=256]
//
// Each figure is the slowest rank's time per all-reduce. algbw = bytes / time; busbw = algbw *
// 2(n-1)/n, the bytes each rank's link carries in a ring all-reduce (nccl-tests' convention).
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <functional>

#include <fmt/format.h>
#include <torch/torch.h>

#include "cluster/communicator.h"
#include "src/parallel/gradient_reducer.h"
#include "cluster/world.h"

namespace {

// Seconds per call of `run`, the slowest rank's, after one warm-up call.
double seconds_per_call(int calls, const std::function<void()>& run) {
  run();
  MPI_Barrier(MPI_COMM_WORLD);
  const auto started = std::chrono::steady_clock::now();
  for (int i = 0; i < calls; ++i) run();
  double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count() / calls;
  MPI_Allreduce(MPI_IN_PLACE, &seconds, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  return seconds;
}

}  // namespace

int main(int argc, char** argv) {
  sdt::DistributedSession session;
  const sdt::World& world = session.world();
  if (!session.uses_mpi()) {
    fmt::print(stderr, "run under mpiexec with 2 or more ranks: mpiexec -n 2 {}\n", argv[0]);
    return 2;
  }
  const int64_t max_mib = argc > 1 ? std::atoll(argv[1]) : 256;
  auto communicator = sdt::make_communicator(world, at::kCPU);
  const double bus = 2.0 * (world.size - 1) / world.size;

  if (world.rank == 0) {
    fmt::print("all-reduce (sum) of float32, {} ranks, {} thread(s) per rank for LibTorch\n", world.size, at::get_num_threads());
    fmt::print("{:>8} | {:>22} | {:>22} | {:>22}\n", "", "raw MPI_Allreduce", "Communicator", "GradientReducer");
    fmt::print("{:>8} | {:>7} {:>6} {:>7} | {:>7} {:>6} {:>7} | {:>7} {:>6} {:>7}\n", "MiB", "ms", "algbw", "busbw", "ms",
               "algbw", "busbw", "ms", "algbw", "busbw");
  }
  for (int64_t mib = 1; mib <= max_mib; mib *= 2) {
    const int64_t floats = mib * 1024 * 1024 / 4;
    const int calls = static_cast<int>(std::clamp<int64_t>(64 / mib, 2, 20));

    at::Tensor raw = at::ones({floats});
    const double raw_s = seconds_per_call(calls, [&] {
      MPI_Allreduce(MPI_IN_PLACE, raw.data_ptr(), static_cast<int>(floats), MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
    });
    raw = at::Tensor();

    at::Tensor ours = at::ones({floats});
    const double communicator_s = seconds_per_call(calls, [&] { communicator->all_reduce(ours, sdt::ReduceOp::sum); });
    ours = at::Tensor();

    std::vector<at::Tensor> parameters;
    for (int64_t i = 0; i < mib; ++i) {
      parameters.push_back(at::zeros({1024 * 1024 / 4}).requires_grad_());
      parameters.back().mutable_grad() = at::ones({1024 * 1024 / 4});
    }
    double reducer_s = 0;
    {
      sdt::GradientReducer reducer(parameters, *communicator);
      reducer_s = seconds_per_call(calls, [&] { reducer.finish(); });
    }

    if (world.rank == 0) {
      const double gb = static_cast<double>(mib) * 1024 * 1024 / 1e9;
      auto row = [&](double s) { return fmt::format("{:7.2f} {:6.2f} {:7.2f}", s * 1e3, gb / s, gb / s * bus); };
      fmt::print("{:>8} | {} | {} | {}\n", mib, row(raw_s), row(communicator_s), row(reducer_s));
    }
  }
  return 0;
}
