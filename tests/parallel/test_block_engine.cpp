// BlockEngine trains a stack as plain data parallel does: full sharding gives the same losses and weights
// (within 1e-5, the ranks' sums may associate differently), block swap changes nothing at all (it
// only copies), a frozen stack passes gradients through without moving anything back, parameters
// are gathered in the compute dtype, and the swap copies follow kohya's schedule.
#include <gtest/gtest.h>

#include <map>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "src/core/error.h"
#include "tests/parallel/tiny_stack.h"

namespace sdt {
namespace {

constexpr int kSteps = 3;
constexpr double kTolerance = 1e-5;

// The mean loss of each step.
template <typename Run>
std::vector<double> train(Run& run) {
  std::vector<double> losses;
  for (int s = 0; s < kSteps; ++s) losses.push_back(run.step(s));
  return losses;
}

double losses_difference(const std::vector<double>& ours, const std::vector<double>& reference) {
  double worst = 0;
  for (size_t i = 0; i < ours.size(); ++i) worst = std::max(worst, std::abs(ours[i] - reference[i]) / std::abs(reference[i]));
  return worst;
}

std::string describe(const StackOptions& o) {
  return fmt::format("sharding {}, blocks_to_swap {}", sharding_name(o.sharding), o.blocks_to_swap);
}

const std::vector<StackOptions> kModes = {
    {Sharding::none, 0, {}}, {Sharding::none, 2, {}}, {Sharding::none, 4, {}},
    {Sharding::full, 0, {}}, {Sharding::full, 2, {}}, {Sharding::full, 4, {}},
};

TEST(BlockEngineTraining, EveryModeTrainsLikeDataParallel) {
  Communicator& communicator = test_communicator();
  const TinyConfig config;
  ReferenceRun reference(config, communicator);
  const std::vector<double> expected = train(reference);

  for (const StackOptions& options : kModes) {
    SCOPED_TRACE(describe(options));
    StackRun run(config, communicator, options);
    const std::vector<double> got = train(run);
    const double losses = losses_difference(got, expected);
    const double masters = masters_difference(run.stack(), reference.model());
    const double replicated = replicated_difference(run.model(), reference.model());
    EXPECT_LE(losses, kTolerance);
    EXPECT_LE(masters, kTolerance);
    EXPECT_LE(replicated, kTolerance);
    if (communicator.rank() == 0) {
      fmt::print("  {} ranks, {}: max relative difference to data parallel: losses {:.2e}, stack {:.2e}, stem+head {:.2e}\n",
                 communicator.size(), describe(options), losses, masters, replicated);
    }
  }
}

TEST(BlockEngineTraining, BlockSwapChangesNoBit) {
  Communicator& communicator = test_communicator();
  const TinyConfig config;
  for (Sharding sharding : {Sharding::none, Sharding::full}) {
    StackRun resident(config, communicator, {sharding, 0, {}});
    const std::vector<double> expected = train(resident);
    for (int64_t swap : {1, 2, 4}) {
      SCOPED_TRACE(describe({sharding, swap, {}}));
      StackRun swapped(config, communicator, {sharding, swap, {}});
      const std::vector<double> got = train(swapped);
      EXPECT_EQ(got, expected);
      for (int64_t b = 0; b < config.blocks; ++b) {
        EXPECT_TRUE(at::equal(swapped.stack().master(b), resident.stack().master(b))) << "block " << b;
      }
    }
  }
}

// Two micro-steps per optimizer step: the reference accumulates local sums and averages once (DDP's
// no_sync), the stack averages each micro-step's gradient and accumulates the averages.
TEST(BlockEngineTraining, GradientAccumulationTrainsLikeDataParallel) {
  Communicator& communicator = test_communicator();
  TinyConfig config;
  config.micro_steps = 2;
  ReferenceRun reference(config, communicator);
  const std::vector<double> expected = train(reference);
  for (const StackOptions& options : {StackOptions{Sharding::full, 2, {}}, StackOptions{Sharding::none, 0, {}}}) {
    SCOPED_TRACE(describe(options));
    StackRun run(config, communicator, options);
    EXPECT_LE(losses_difference(train(run), expected), kTolerance);
    EXPECT_LE(masters_difference(run.stack(), reference.model()), kTolerance);
    EXPECT_LE(replicated_difference(run.model(), reference.model()), kTolerance);
  }
}

// A frozen stack between a trainable stem and head: gradients flow through it to the stem, the
// stack's masters never change, and block swap copies host to device only.
TEST(BlockEngineFrozen, FrozenStackTrainsLikeDataParallel) {
  Communicator& communicator = test_communicator();
  TinyConfig config;
  config.frozen_stack = true;
  ReferenceRun reference(config, communicator);
  const std::vector<double> expected = train(reference);

  for (const StackOptions& options : kModes) {
    SCOPED_TRACE(describe(options));
    StackRun run(config, communicator, options);
    ASSERT_FALSE(run.stack().blocks()[0].trainable);
    std::vector<double> got;
    for (int s = 0; s < kSteps; ++s) {
      run.stack().reset_traffic();
      got.push_back(run.step(s));
      if (s == 0) continue;  // the first step also fills the slots
      // Steady state: S blocks in forward, S in backward, one shard each; nothing back.
      const EngineTraffic traffic = run.stack().traffic();
      const int64_t shard_bytes = run.stack().master(0).nbytes();
      EXPECT_EQ(traffic.host_to_device, 2 * options.blocks_to_swap * shard_bytes);
      EXPECT_EQ(traffic.device_to_host, 0);
      EXPECT_EQ(traffic.reduced, 0);
    }
    EXPECT_LE(losses_difference(got, expected), kTolerance);
    EXPECT_LE(replicated_difference(run.model(), reference.model()), kTolerance);
    EXPECT_EQ(masters_difference(run.stack(), reference.model()), 0.0);  // frozen: exactly the initial weights
  }
}

// The copies of one step, as (block, slot), for 6 blocks with 2 swapped: kohya's arrivals (4 and 5
// after blocks 0 and 1 in forward; 1 and 0 after blocks 4 and 3 in backward). A trainable stack also
// copies blocks 0 and 1 again at the start, because the optimizer changed their host masters.
TEST(BlockEngineSchedule, CopiesFollowKohyasSchedule) {
  Communicator& communicator = test_communicator();
  using Fetch = BlockEngine::Fetch;
  const std::vector<Fetch> kohya = {{4, 0}, {5, 1}, {1, 1}, {0, 0}};
  const std::vector<Fetch> first_step = {{0, 0}, {1, 1}, {4, 0}, {5, 1}, {1, 1}, {0, 0}};
  for (bool frozen : {true, false}) {
    for (Sharding sharding : {Sharding::none, Sharding::full}) {
      SCOPED_TRACE(fmt::format("{}, sharding {}", frozen ? "frozen" : "trainable", sharding_name(sharding)));
      TinyConfig config;
      config.frozen_stack = frozen;
      StackRun run(config, communicator, {sharding, 2, {}});
      run.step(0);
      EXPECT_EQ(run.stack().fetch_log(), first_step);
      run.stack().clear_fetch_log();
      run.step(1);
      EXPECT_EQ(run.stack().fetch_log(), frozen ? kohya : first_step);

      // A forward without backward (sampling) leaves [S, N) resident; the next forward copies the
      // first blocks back one ahead of use, then the schedule goes on as before.
      {
        torch::NoGradGuard no_grad;
        run.forward(torch::zeros({2, config.dim}));
      }
      run.stack().clear_fetch_log();
      run.step(2);
      EXPECT_EQ(run.stack().fetch_log(), first_step);
    }
  }
}

TEST(BlockEngineSchedule, TrainableStackMovesGradientsOfHostBlocksBack) {
  Communicator& communicator = test_communicator();
  const TinyConfig config;
  StackRun run(config, communicator, {Sharding::full, 2, {}});
  run.step(0);
  run.stack().reset_traffic();
  run.step(1);
  const EngineTraffic traffic = run.stack().traffic();
  const int64_t shard_bytes = run.stack().master(0).nbytes();
  EXPECT_EQ(traffic.host_to_device, 3 * 2 * shard_bytes);  // 3S blocks
  EXPECT_EQ(traffic.device_to_host, 2 * 2 * shard_bytes);  // the gradients of the 2S host blocks
  if (communicator.size() > 1) {
    const int64_t full_bytes = run.stack().layout(0).padded_numel(communicator.size()) * 4;
    // Backward reuses the last two blocks' buffers from forward.
    EXPECT_EQ(traffic.gathered, (2 * config.blocks - 2) * full_bytes);
    EXPECT_EQ(traffic.reduced, config.blocks * full_bytes);
  }
}

// fp32 masters, bf16 compute: the blocks run on bf16 parameters, gathered as bf16 (half the bytes),
// and compute exactly what the same blocks converted to bf16 compute.
TEST(BlockEnginePrecision, GathersInTheComputeDtype) {
  Communicator& communicator = test_communicator();
  TinyConfig config;
  config.frozen_stack = true;
  TinyModel reference(config);
  torch::manual_seed(5);
  const at::Tensor x = torch::randn({4, config.dim});
  at::Tensor expected = x.to(at::kBFloat16);
  {
    torch::NoGradGuard no_grad;
    for (auto& block : reference.blocks) {
      block->to(at::kBFloat16);
      expected = block(expected);
    }
  }
  for (Sharding sharding : {Sharding::none, Sharding::full}) {
    for (int64_t swap : {0, 2}) {
      SCOPED_TRACE(describe({sharding, swap, {}}));
      StackRun run(config, communicator, {sharding, swap, at::kBFloat16});
      EXPECT_EQ(run.stack().master(0).scalar_type(), at::kFloat);
      torch::NoGradGuard no_grad;
      run.stack().reset_traffic();
      const at::Tensor got = run.forward(x.to(at::kBFloat16));
      EXPECT_EQ(got.scalar_type(), at::kBFloat16);
      EXPECT_TRUE(at::equal(got, expected));
      if (run.stack().shard_ranks() > 1) {
        EXPECT_EQ(run.stack().traffic().gathered, config.blocks * run.stack().layout(0).padded_numel(run.stack().shard_ranks()) * 2);
      }
    }
  }
}

// Trainable with bf16 compute: gradients are averaged in bf16 and added into fp32 masters. Sharded
// and unsharded average the same bf16 buffers, so they agree bit for bit.
TEST(BlockEnginePrecision, Bf16ComputeTrainsTheSameShardedOrNot) {
  Communicator& communicator = test_communicator();
  const TinyConfig config;
  StackRun unsharded(config, communicator, {Sharding::none, 0, at::kBFloat16});
  StackRun sharded(config, communicator, {Sharding::full, 2, at::kBFloat16});
  for (int s = 0; s < kSteps; ++s) {
    const double a = unsharded.step(s), b = sharded.step(s);
    EXPECT_EQ(a, b) << "step " << s;
    EXPECT_TRUE(std::isfinite(a));
  }
  const BlockEngine& whole = unsharded.stack();
  const BlockEngine& cut = sharded.stack();
  for (int64_t b = 0; b < config.blocks; ++b) {
    const int64_t shard = cut.master(b).numel(), begin = cut.shard_index() * shard;
    const int64_t inside = std::min(shard, whole.layout(b).numel() - begin);  // the rest is padding
    EXPECT_EQ(cut.master(b).scalar_type(), at::kFloat);
    EXPECT_TRUE(at::equal(cut.master(b).narrow(0, 0, inside), whole.master(b).narrow(0, begin, inside))) << "block " << b;
    EXPECT_EQ(cut.master(b).narrow(0, inside, shard - inside).abs().sum().item<double>(), 0.0);
  }
}

TEST(BlockEngineOptions, RefusesWhatItCannotDo) {
  Communicator& communicator = test_communicator();
  TinyConfig config;
  EXPECT_THROW({ StackRun run(config, communicator, {Sharding::none, config.blocks - 1, {}}); }, Error);
  EXPECT_THROW(parse_sharding("zero3"), Error);
  EXPECT_EQ(parse_sharding("full"), Sharding::full);

  // A swap stack's blocks must be identical; unlike blocks are fine outside one.
  const std::vector<std::shared_ptr<torch::nn::Module>> blocks{ResidualMlp(8, 16).ptr(), ResidualMlp(8, 32).ptr(),
                                                               ResidualMlp(8, 32).ptr()};
  EXPECT_THROW({ BlockEngine engine(blocks, {}, communicator, {.swap = {{0, 3, 1}}}); }, Error);
  EXPECT_NO_THROW({ BlockEngine engine(blocks, {}, communicator, {.sharding = Sharding::full}); });
  // A block whose weights are partly trained.
  ResidualMlp mixed(8, 16);
  mixed->fc1->weight.set_requires_grad(false);
  EXPECT_THROW({ BlockEngine engine({mixed.ptr()}, {}, communicator); }, Error);
  EXPECT_THROW({ BlockEngine engine(blocks, {}, communicator, {.sharding = Sharding::optimizer}); }, Error);
}

// Blocks built without weights (BlockWeights::deferred) get masters read in place through read_deferred, each rank its
// part only: the same masters bit for bit as blocks built with the same weights (which rank 0 broadcasts), and the same
// forward, with and without sharding and swap.
TEST(BlockEngineLoading, DeferredBlocksGetTheMastersOfLoadedOnes) {
  Communicator& communicator = test_communicator();
  const auto make_blocks = [] {
    torch::manual_seed(3);
    std::vector<std::shared_ptr<torch::nn::Module>> blocks;
    for (int i = 0; i < 4; ++i) blocks.push_back(ResidualMlp(8, 16).ptr());
    return blocks;
  };
  std::vector<std::map<std::string, at::Tensor>> stored;  // the checkpoint the deferred blocks read
  for (const auto& block : make_blocks()) {
    stored.emplace_back();
    for (const auto& item : block->named_parameters()) stored.back()[item.key()] = item.value().detach().clone();
  }
  const at::Tensor x = torch::randn({3, 8});
  for (Sharding sharding : {Sharding::none, Sharding::full}) {
    for (int64_t swap : {0, 2}) {
      SCOPED_TRACE(describe({sharding, swap, {}}));
      const auto loaded_blocks = make_blocks(), deferred_blocks = make_blocks();
      for (const auto& block : deferred_blocks) {
        defer_weights(*block);
        for (const auto& p : block->parameters()) ASSERT_TRUE(p.is_meta());
      }
      int64_t reads = 0;
      BlockEngineOptions options{.sharding = sharding, .swap = swap ? std::vector<SwapStack>{{0, 4, swap}} : std::vector<SwapStack>{}};
      BlockEngine loaded(loaded_blocks, {}, communicator, options);
      options.read_deferred = [&](int64_t b, const std::string& name) {
        ++reads;
        return stored.at(static_cast<size_t>(b)).at(name);
      };
      BlockEngine deferred(deferred_blocks, {}, communicator, options);
      EXPECT_GT(reads, 0);
      for (int64_t b = 0; b < 4; ++b) {
        EXPECT_TRUE(at::equal(deferred.master(b), loaded.master(b))) << "block " << b;
        for (const auto& p : deferred_blocks[b]->parameters()) EXPECT_FALSE(p.is_meta());
      }
      torch::NoGradGuard no_grad;
      const auto forward = [&](const std::vector<std::shared_ptr<torch::nn::Module>>& blocks, BlockEngine& engine) {
        at::Tensor h = x;
        for (const auto& block : blocks) {
          ResidualMlp mlp(std::dynamic_pointer_cast<ResidualMlpImpl>(block));
          h = engine.run(*block, [mlp](const std::vector<at::Tensor>& in) mutable { return std::vector<at::Tensor>{mlp->forward(in[0])}; },
                         {h}, {})[0];
        }
        return h;
      };
      EXPECT_TRUE(at::equal(forward(deferred_blocks, deferred), forward(loaded_blocks, loaded)));
    }
  }
}

TEST(BlockEngineLoading, DeferredWeightsNeedSomethingToReadThem) {
  Communicator& communicator = test_communicator();
  ResidualMlp deferred(8, 16), half(8, 16);
  defer_weights(*deferred);
  EXPECT_THROW({ BlockEngine engine({deferred.ptr()}, {}, communicator); }, Error);
  defer_weights(*half->fc1);
  const auto read = [](int64_t, const std::string&) { return at::zeros({1}); };
  EXPECT_THROW({ BlockEngine engine({half.ptr()}, {}, communicator, {.read_deferred = read}); }, Error);
}

}  // namespace
}  // namespace sdt
