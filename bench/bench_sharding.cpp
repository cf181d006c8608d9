// Memory per rank, step time and bytes moved for each BlockEngine mode: sharding none / full x
// blocks_to_swap 0 / S, for a trainable stack (AdamW on the masters) and a frozen one (the LoRA case:
// trainable layers around frozen blocks). Run at each rank count:
//
//   mpiexec -n 2 build/bench_sharding [blocks=8] [swap=4] [dim=256] [hidden=1024] [tokens=64] [rows=2] [steps=5]
//
// The model is stem -> blocks residual MLP blocks (LayerNorm, Linear, GELU, Linear) -> head, on
// (rows per rank, tokens, dim) inputs: a transformer's block stack without attention. Memory is the
// peak of every live CPU tensor over the timed steps (CpuTensorMeter), the largest over the ranks,
// next to the plan. On the CPU the device and the host are the same memory: the measured peak is
// their sum. Rank 0 prints one table.
#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <vector>

#include <fmt/format.h>
#include <torch/torch.h>

#include "cluster/communicator.h"
#include "cluster/world.h"
#include "src/parallel/block_engine.h"
#include "src/parallel/gradient_reducer.h"
#include "src/parallel/memory_plan.h"
#include "src/train/optimizers.h"

namespace {

using namespace sdt;

struct Settings {
  int64_t blocks = 8, swap = 4, dim = 256, hidden = 1024, tokens = 64, rows = 2, steps = 5;
};

struct ResidualMlpImpl : torch::nn::Module {
  ResidualMlpImpl(int64_t dim, int64_t hidden)
      : norm(register_module("norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({dim})))),
        fc1(register_module("fc1", torch::nn::Linear(dim, hidden))),
        fc2(register_module("fc2", torch::nn::Linear(hidden, dim))) {}
  at::Tensor forward(const at::Tensor& x) { return x + fc2(torch::gelu(fc1(norm(x)))); }
  torch::nn::LayerNorm norm;
  torch::nn::Linear fc1, fc2;
};
TORCH_MODULE(ResidualMlp);

struct Result {
  MemoryPlan plan;
  int64_t peak = 0;     // largest over the ranks
  double step_ms = 0;   // median
  EngineTraffic traffic;  // per step, this rank (the same on every rank)
};

int64_t largest_over_ranks(int64_t value, Communicator& communicator) {
  const at::Tensor all = communicator.all_gather(at::tensor({value}, at::kLong));
  return all.max().item<int64_t>();
}

Result run(const Settings& s, Communicator& communicator, bool frozen, BlockEngineOptions options) {
  const int64_t baseline = CpuTensorMeter::live_bytes();
  torch::manual_seed(0);
  torch::nn::Linear stem(s.dim, s.dim), head(s.dim, s.dim);
  std::vector<ResidualMlp> blocks;
  std::vector<std::shared_ptr<torch::nn::Module>> modules;
  for (int64_t b = 0; b < s.blocks; ++b) {
    blocks.emplace_back(s.dim, s.hidden);
    if (frozen) {
      for (auto& p : blocks.back()->parameters()) p.set_requires_grad(false);
    }
    modules.push_back(blocks.back().ptr());
  }
  BlockEngine stack(modules, {}, communicator, options);
  const auto forward = [&](at::Tensor h) {
    for (ResidualMlp block : blocks) {
      h = stack.run(*block, [block](const std::vector<at::Tensor>& in) mutable { return std::vector<at::Tensor>{block->forward(in[0])}; },
                    {h}, block->parameters())[0];
    }
    return h;
  };
  std::vector<at::Tensor> replicated = stem->parameters();
  for (const auto& p : head->parameters()) replicated.push_back(p);
  GradientReducer reducer(replicated, communicator);
  std::vector<ParamGroup> groups{{replicated, 1e-4}};
  if (!frozen) groups.push_back({stack.masters(), 1e-4});
  AdamW optimizer(groups, AdamWConfig{});

  const at::Tensor x = torch::randn({s.rows, s.tokens, s.dim}), y = torch::randn({s.rows, s.tokens, s.dim});
  const auto step = [&] {
    const at::Tensor loss = torch::mse_loss(head(forward(stem(x))), y);
    loss.backward();
    reducer.finish();
    stack.finish();
    optimizer.step();
    optimizer.zero_grad();
  };
  step();  // warm-up: moments allocated, slots filled
  CpuTensorMeter::reset_peak();
  std::vector<double> times;
  for (int64_t i = 0; i < s.steps; ++i) {
    stack.reset_traffic();
    communicator.barrier();
    const auto start = std::chrono::steady_clock::now();
    step();
    communicator.barrier();
    times.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
  }
  std::sort(times.begin(), times.end());

  Result r;
  r.plan = plan_memory(memory_plan_config(stack, /*AdamW*/ 8));
  r.peak = largest_over_ranks(CpuTensorMeter::peak_bytes() - baseline, communicator);
  r.step_ms = times[times.size() / 2];
  r.traffic = stack.traffic();
  return r;
}

double mib(int64_t bytes) { return static_cast<double>(bytes) / (1024.0 * 1024.0); }

}  // namespace

int main(int argc, char** argv) {
  CpuTensorMeter::install();
  DistributedSession session;
  const World& world = session.world();
  try {
    Settings s;
    int64_t* fields[] = {&s.blocks, &s.swap, &s.dim, &s.hidden, &s.tokens, &s.rows, &s.steps};
    for (int i = 1; i < argc && i <= 7; ++i) *fields[i - 1] = std::atoll(argv[i]);
    const std::unique_ptr<Communicator> communicator = make_communicator(world, at::kCPU);

    if (world.rank == 0) {
      const int64_t per_block = 2 * s.dim + 2 * s.dim * s.hidden + s.hidden + s.dim;
      fmt::print("bench_sharding: {} ranks, {} blocks of {} parameters ({:.2f} MiB fp32), blocks_to_swap {}, "
                 "{} rows x {} tokens x {} per rank, median of {} steps\n",
                 world.size, s.blocks, per_block, mib(per_block * 4), s.swap, s.rows, s.tokens, s.dim, s.steps);
      fmt::print("{:<9} {:<5} {:>4} | {:>8} {:>8} {:>8} | {:>8} {:>6} | {:>8} | {:>8} {:>8} {:>8} {:>8}\n", "stack",
                 "shard", "swap", "plan dev", "host", "total", "measured", "diff", "step ms", "H2D", "D2H", "gather",
                 "reduce");
      fmt::print("{:<9} {:<5} {:>4} | {:>8} {:>8} {:>8} | {:>8} {:>6} | {:>8} | {:>8} {:>8} {:>8} {:>8}\n", "", "", "",
                 "MiB", "MiB", "MiB", "MiB", "%", "", "MiB/step", "MiB/step", "MiB/step", "MiB/step");
    }
    MemoryPlan shown;  // the plan of the most constrained trainable mode, as a trainer prints it at start
    for (bool frozen : {false, true}) {
      for (Sharding sharding : {Sharding::none, Sharding::full}) {
        for (int64_t swap : {int64_t{0}, s.swap}) {
          BlockEngineOptions options{.sharding = sharding};
          if (swap > 0) options.swap.push_back({0, static_cast<size_t>(s.blocks), swap});
          const Result r = run(s, *communicator, frozen, options);
          if (!frozen && sharding == Sharding::full && swap == s.swap) shown = r.plan;
          if (world.rank != 0) continue;
          fmt::print("{:<9} {:<5} {:>4} | {:>8.2f} {:>8.2f} {:>8.2f} | {:>8.2f} {:>6.1f} | {:>8.1f} | {:>8.2f} {:>8.2f} {:>8.2f} {:>8.2f}\n",
                     frozen ? "frozen" : "trainable", sharding_name(sharding), swap, mib(r.plan.device_total()),
                     mib(r.plan.host_total()), mib(r.plan.total()), mib(r.peak),
                     100.0 * (r.peak - r.plan.total()) / r.plan.total(), r.step_ms, mib(r.traffic.host_to_device),
                     mib(r.traffic.device_to_host), mib(r.traffic.gathered), mib(r.traffic.reduced));
        }
      }
    }
    if (world.rank == 0) fmt::print("\nplan of trainable, sharding full, blocks_to_swap {}:\n{}", s.swap, describe(shown));
  } catch (const std::exception& e) {
    abort_job(world, e.what());
  }
  return 0;
}
