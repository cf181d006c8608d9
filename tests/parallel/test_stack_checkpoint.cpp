// Checkpoints of a block stack: rank 0 assembles each block from the shards, the file holds the
// unsharded model's tensors, and a run resumed from it continues as if it had never stopped, at the
// same rank count and at another one (the 2-rank job writes a checkpoint the 3-rank job and the
// one-process run resume from; ctest orders them with a fixture).
#include <gtest/gtest.h>

#include <filesystem>

#include <fmt/format.h>

#include "src/core/safetensors.h"
#include "src/core/tensor_io.h"
#include "src/parallel/memory_plan.h"
#include "src/parallel/stack_checkpoint.h"
#include "tests/parallel/tiny_stack.h"

namespace sdt {
namespace {

constexpr int kSteps = 2;  // before and after the resume
constexpr double kTolerance = 1e-5;

std::string checkpoint_folder(const std::string& name) { return std::string(SDT_PARALLEL_CHECKPOINT_DIR) + "/" + name; }

// Root assembles each block; every other rank holds one shard at a time, never the block.
TEST(StackCheckpoint, RootGathersWholeBlocksShardByShard) {
  Communicator& communicator = test_communicator();
  const TinyConfig config;
  const TinyModel reference(config);
  StackRun run(config, communicator, {Sharding::full, 2, {}});
  const BlockEngine& stack = run.stack();
  const int64_t shard_bytes = stack.master(0).nbytes();
  for (int root : {0, communicator.size() - 1}) {
    for (int64_t b = 0; b < stack.block_count(); ++b) {
      const int64_t before = CpuTensorMeter::live_bytes();
      CpuTensorMeter::reset_peak();
      const at::Tensor full = stack.gather_to_root(b, stack.master(b), root);
      const int64_t held = CpuTensorMeter::peak_bytes() - before;
      if (communicator.rank() != root) {
        EXPECT_FALSE(full.defined());
        EXPECT_LE(held, shard_bytes) << "block " << b << ": more than one shard on a rank that is not root";
        continue;
      }
      // The block, padded to whole shards, and the shard in transit.
      EXPECT_LE(held, stack.layout(0).padded_numel(stack.shard_ranks()) * 4 + shard_bytes);
      const at::Tensor expected = stack.layout(0).flatten(reference.blocks[b]->parameters(), 1, at::kFloat);
      ASSERT_EQ(full.numel(), stack.layout(0).numel());
      EXPECT_TRUE(at::equal(full, expected)) << "block " << b << ", root " << root;
    }
  }
}

TEST(StackCheckpoint, FileHoldsTheUnshardedTensors) {
  Communicator& communicator = test_communicator();
  const TinyConfig config;
  const TinyModel reference(config);
  StackRun run(config, communicator, {Sharding::full, 0, {}});
  const std::string folder = checkpoint_folder(fmt::format("np{}_plain", communicator.size()));
  save_run(run, folder);
  const safetensors::File file(folder + "/stack.safetensors");
  for (int64_t b = 0; b < config.blocks; ++b) {
    for (const auto& item : reference.blocks[b]->named_parameters()) {
      const std::string name = fmt::format("blocks.{}.{}", b, item.key());
      ASSERT_TRUE(file.contains(name)) << name;
      EXPECT_TRUE(at::equal(load_tensor(file, name), item.value())) << name;
    }
  }
  communicator.barrier();  // nobody rewrites the folder while another rank reads it
}

// The reference trained 2 * kSteps steps; `resumed` loads `folder` (written after kSteps steps) and
// trains the rest.
void expect_resume_matches(const std::string& folder, const StackOptions& options) {
  Communicator& communicator = test_communicator();
  const TinyConfig config;
  ReferenceRun reference(config, communicator);
  std::vector<double> expected;
  for (int s = 0; s < 2 * kSteps; ++s) expected.push_back(reference.step(s));

  StackRun resumed(config, communicator, options);
  load_run(resumed, folder);
  for (int s = kSteps; s < 2 * kSteps; ++s) {
    const double loss = resumed.step(s);
    EXPECT_LE(std::abs(loss - expected[s]) / std::abs(expected[s]), kTolerance) << "step " << s;
  }
  EXPECT_LE(masters_difference(resumed.stack(), reference.model()), kTolerance);
  EXPECT_LE(replicated_difference(resumed.model(), reference.model()), kTolerance);
}

TEST(StackCheckpoint, ResumesAtThisRankCount) {
  Communicator& communicator = test_communicator();
  for (const StackOptions& options : {StackOptions{Sharding::full, 2, {}}, StackOptions{Sharding::none, 0, {}}}) {
    SCOPED_TRACE(fmt::format("sharding {}, blocks_to_swap {}", sharding_name(options.sharding), options.blocks_to_swap));
    const std::string folder = checkpoint_folder(fmt::format("np{}_{}", communicator.size(), sharding_name(options.sharding)));
    StackRun first(TinyConfig{}, communicator, options);
    for (int s = 0; s < kSteps; ++s) first.step(s);
    save_run(first, folder);
    expect_resume_matches(folder, options);
  }
}

// Written by the 2-rank job (sharding full, 2 swapped blocks: each rank's part came from its own host
// shards), resumed by the others with 3 shards per block, or none. The control is the plain
// data-parallel model resumed from the same files: the runs start from identical states (checked
// exactly) and must stay together. (An uninterrupted run at this rank count is no control here: it
// sums the ranks' gradients in another order, and Adam carries last-bit differences along.)
TEST(StackCheckpoint, ResumesAtAnotherRankCount) {
  Communicator& communicator = test_communicator();
  const std::string folder = checkpoint_folder("from_two_ranks");
  if (communicator.size() == 2) {
    StackRun first(TinyConfig{}, communicator, {Sharding::full, 2, {}});
    for (int s = 0; s < kSteps; ++s) first.step(s);
    save_run(first, folder);
    return;
  }
  if (!std::filesystem::exists(folder + "/stack.safetensors")) {
    GTEST_SKIP() << "no checkpoint from the 2-rank job in " << folder << " (ctest runs that job first)";
  }
  for (const StackOptions& options : {StackOptions{Sharding::full, 1, {}}, StackOptions{Sharding::none, 0, {}}}) {
    SCOPED_TRACE(fmt::format("sharding {}, blocks_to_swap {}", sharding_name(options.sharding), options.blocks_to_swap));
    const TinyConfig config;
    ReferenceRun reference(config, communicator);
    load_reference(reference, folder);
    StackRun resumed(config, communicator, options);
    load_run(resumed, folder);
    EXPECT_EQ(masters_difference(resumed.stack(), reference.model()), 0.0);
    EXPECT_EQ(replicated_difference(resumed.model(), reference.model()), 0.0);
    double losses = 0;
    for (int s = kSteps; s < 2 * kSteps; ++s) {
      const double expected = reference.step(s), loss = resumed.step(s);
      losses = std::max(losses, std::abs(loss - expected) / std::abs(expected));
    }
    const double masters = masters_difference(resumed.stack(), reference.model());
    EXPECT_LE(losses, kTolerance);
    EXPECT_LE(masters, kTolerance);
    EXPECT_LE(replicated_difference(resumed.model(), reference.model()), kTolerance);
    if (communicator.rank() == 0) {
      fmt::print("  {} ranks resumed from 2, sharding {}, blocks_to_swap {}: max relative difference to the resumed "
                 "plain run: losses {:.2e}, stack {:.2e}\n",
                 communicator.size(), sharding_name(options.sharding), options.blocks_to_swap, losses, masters);
    }
  }
}

}  // namespace
}  // namespace sdt
