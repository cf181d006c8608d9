// The memory plan: its arithmetic (ZeRO's 16Ψ/N for full sharding with AdamW), the bytes a stack
// holds after a backward (exactly the plan, category by category), and the peak of every live CPU
// tensor over a whole training step, measured by CpuTensorMeter (the plan plus activations and the
// optimizer's temporaries).
#include <gtest/gtest.h>

#include <fmt/format.h>

#include "src/parallel/memory_plan.h"
#include "tests/parallel/tiny_stack.h"

namespace sdt {
namespace {

constexpr int64_t kAdamWBytes = 8;  // two fp32 moments per master element

TEST(MemoryPlan, FullShardingIsZeroStage3) {
  // 10 blocks of 1000 parameters, 4 ranks, fp32, AdamW: ZeRO's 16 bytes per parameter over 4 ranks,
  // plus two gathered and two gradient blocks.
  MemoryPlanConfig c;
  c.block_numel = 1000;
  c.blocks = 10;
  c.world_size = 4;
  c.sharding = Sharding::full;
  c.optimizer_bytes_per_param = kAdamWBytes;
  const MemoryPlan full = plan_memory(c);
  EXPECT_EQ(full.stack.device_masters + full.stack.device_gradients + full.device_optimizer_state, 16 * 10 * 1000 / 4);
  EXPECT_EQ(full.stack.gather_buffers, 2 * (1000 + 250) * 4);  // two whole blocks and the two shards they gather
  EXPECT_EQ(full.stack.gradient_buffers, 2 * 1000 * 4);
  EXPECT_EQ(full.host_total(), 0);

  // Without sharding every rank holds it all, and needs no gather buffers.
  c.sharding = Sharding::none;
  const MemoryPlan none = plan_memory(c);
  EXPECT_EQ(none.stack.device_masters + none.stack.device_gradients + none.device_optimizer_state, 16 * 10 * 1000);
  EXPECT_EQ(none.stack.gather_buffers, 0);

  // 3 swapped blocks: blocks 0-2 and 7-9 live on the host; the device keeps 4 of its own and 3 slots.
  c.sharding = Sharding::full;
  c.blocks_to_swap = 3;
  const MemoryPlan swapped = plan_memory(c);
  EXPECT_EQ(swapped.stack.device_masters, 4 * 250 * 4);
  EXPECT_EQ(swapped.stack.host_masters, 6 * 250 * 4);
  EXPECT_EQ(swapped.host_optimizer_state, 6 * 250 * kAdamWBytes);
  EXPECT_EQ(swapped.stack.swap_slots, 3 * 250 * 4);

  // A frozen bf16 stack computing in bf16 needs neither gradients nor a cast.
  c.trainable = false;
  c.optimizer_bytes_per_param = 0;
  c.master_dtype = c.compute_dtype = at::kBFloat16;
  c.sharding = Sharding::none;
  c.blocks_to_swap = 0;
  const MemoryPlan frozen = plan_memory(c);
  EXPECT_EQ(frozen.total(), 10 * 1000 * 2);
}

int64_t optimizer_state_bytes(AdamW* optimizer) {
  if (!optimizer) return 0;
  int64_t bytes = 0;
  for (const auto& [name, tensor] : optimizer->export_state().tensors) bytes += tensor.nbytes();
  return bytes;
}

TEST(MemoryPlan, MatchesHeldBytesAndMeasuredPeak) {
  ASSERT_TRUE(CpuTensorMeter::installed());
  Communicator& communicator = test_communicator();
  struct Case {
    bool frozen;
    StackOptions options;
  };
  const std::vector<Case> cases = {
      {false, {Sharding::none, 0, {}}}, {false, {Sharding::full, 0, {}}}, {false, {Sharding::none, 2, {}}},
      {false, {Sharding::full, 2, {}}}, {false, {Sharding::full, 2, at::kBFloat16}},
      {true, {Sharding::none, 2, {}}},  {true, {Sharding::full, 2, {}}},
  };
  for (const Case& c : cases) {
    const std::string name = fmt::format("{}, sharding {}, blocks_to_swap {}, compute {}", c.frozen ? "frozen" : "trainable",
                                         sharding_name(c.options.sharding), c.options.blocks_to_swap,
                                         c10::toString(c.options.compute_dtype.value_or(at::kFloat)));
    SCOPED_TRACE(name);
    TinyConfig config;
    config.frozen_stack = c.frozen;
    const int64_t baseline = CpuTensorMeter::live_bytes();
    StackRun run(config, communicator, c.options);
    run.step(0);  // the optimizer's moments exist from here on
    const MemoryPlan plan = plan_memory(memory_plan_config(run.stack(), kAdamWBytes));

    CpuTensorMeter::reset_peak();
    run.forward_backward(1);
    const EngineMemory held = run.stack().memory();
    run.optimizer_step();
    const int64_t peak = CpuTensorMeter::peak_bytes() - baseline;

    EXPECT_EQ(held.device_masters, plan.stack.device_masters);
    EXPECT_EQ(held.host_masters, plan.stack.host_masters);
    EXPECT_EQ(held.device_gradients, plan.stack.device_gradients);
    EXPECT_EQ(held.host_gradients, plan.stack.host_gradients);
    EXPECT_EQ(held.swap_slots, plan.stack.swap_slots);
    EXPECT_EQ(held.gather_buffers, plan.stack.gather_buffers);
    EXPECT_EQ(held.gradient_buffers, plan.stack.gradient_buffers);
    EXPECT_EQ(optimizer_state_bytes(run.stack_optimizer()), plan.device_optimizer_state + plan.host_optimizer_state);

    // Above the plan: the stem and head with their gradients, moments and reducer bucket, the
    // activations (a few KiB here), AdamW's temporaries, two masters' worth at most, and for a trainable stack the
    // recomputed block's weight gradients, one whole block in the compute dtype, which autograd returns before the
    // engine copies them into its gradient buffer. With a compute
    // dtype other than the masters', each gather in flight (the running block's and the prefetch, two at
    // most) also holds its shard cast to that dtype; when the transfers overlap depends on timing (a loaded
    // machine), so both count.
    const int64_t largest_master = run.stack().master(0).nbytes();
    int64_t allowance = 2 * largest_master + 64 * 1024;
    if (!c.frozen) {
      const at::ScalarType compute = c.options.compute_dtype.value_or(at::kFloat);
      allowance += run.stack().layout(0).numel() * static_cast<int64_t>(c10::elementSize(compute));
    }
    if (c.options.compute_dtype) {
      const int64_t master_element = run.stack().master(0).element_size();
      allowance += 2 * largest_master / master_element * static_cast<int64_t>(c10::elementSize(*c.options.compute_dtype));
    }
    EXPECT_GE(peak, plan.total());
    EXPECT_LE(peak, plan.total() + allowance);
    if (communicator.rank() == 0) {
      fmt::print("  {} ranks, {}: plan {} B, measured peak {} B, above the plan {} B ({:.1f}%)\n", communicator.size(),
                 name, plan.total(), peak, peak - plan.total(), 100.0 * (peak - plan.total()) / plan.total());
    }
  }
}

}  // namespace
}  // namespace sdt
