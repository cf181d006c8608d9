// What a stack of identical blocks in a BlockEngine costs per rank before it is built, and how to measure what it cost.
//
// The plan counts the persistent state, by where it lives: the masters, their gradients and the
// optimizer state (on the device, or on the host for swapped blocks), the swap slots, and the reused
// full-size buffers (gathered parameters, gradients being averaged). It matches what BlockEngine
// allocates byte for byte (BlockEngine::memory()), plus the optimizer state the caller names.
// Activations and transients are not in it: the checkpointed block inputs (one per block), one block's
// recompute, and the optimizer's temporaries (about two masters' worth for AdamW).
//
// Measuring on the CPU: LibTorch keeps no statistics for CPU memory, so CpuTensorMeter puts a counting
// allocator in front of the default CPU allocator. It sees every CPU tensor's storage, whoever
// allocates it (autograd's gradients, the optimizer's moments, the MPI backend's buffers, activations),
// and keeps the live total and its peak. Its peak over a training step is the plan's total plus the
// activations and transients above. On CUDA, the caching allocator's own statistics
// (c10::cuda::CUDACachingAllocator::getDeviceStats) measure the device part.
#pragma once

#include <cstdint>
#include <string>

#include <c10/core/ScalarType.h>

#include "src/parallel/block_engine.h"

namespace sdt {

struct MemoryPlanConfig {
  int64_t block_numel = 0;  // one block's parameters as laid out: FlatLayout::numel()
  int64_t blocks = 0;
  int world_size = 1;
  Sharding sharding = Sharding::none;
  int64_t blocks_to_swap = 0;
  at::ScalarType master_dtype = at::kFloat;
  at::ScalarType compute_dtype = at::kFloat;
  bool trainable = true;
  // Per master element, e.g. 8 for AdamW (two fp32 moments); 0 for a frozen stack.
  int64_t optimizer_bytes_per_param = 0;
};

struct MemoryPlan {
  EngineMemory stack;  // what BlockEngine::memory() reports once every master has a gradient
  int64_t device_optimizer_state = 0;
  int64_t host_optimizer_state = 0;

  int64_t device_total() const;
  int64_t host_total() const;
  int64_t total() const { return device_total() + host_total(); }
};

MemoryPlan plan_memory(const MemoryPlanConfig& config);

// The configuration of an engine that holds one stack of identical blocks (its swap stack, if any), for plan_memory.
MemoryPlanConfig memory_plan_config(const BlockEngine& engine, int64_t optimizer_bytes_per_param);

// A few lines for rank 0 to print at start: each category, device and host, in MiB.
std::string describe(const MemoryPlan& plan);

// Counts the bytes of every live CPU tensor storage from install() on (for the whole process, once).
class CpuTensorMeter {
 public:
  static void install();
  static bool installed();
  static int64_t live_bytes();
  static int64_t peak_bytes();  // since the last reset_peak()
  static void reset_peak();     // peak := live
};

}  // namespace sdt
