// A stack of identical blocks (the transformer blocks of FLUX, SD3, ...) run one after another, with
// per-block full sharding (ZeRO-3 / FSDP) and per-rank block swap (kohya's --blocks_to_swap), alone or
// together, in a data-parallel job.
//
// Each block's parameters become one flat buffer (flat_layout.h). The stack keeps per block one
// master: a 1-D tensor that is this rank's shard of the buffer (sharding full) or the whole buffer
// (sharding none). The masters are what an optimizer steps, each rank its own; the blocks' own
// parameter tensors hold no storage except while their block runs.
//
// Running block b:
//   1. its master reaches the device: a block whose master lives on the host (swap_schedule.h) is
//      copied into its device slot, on kohya's schedule;
//   2. its full parameters are assembled in the compute dtype into one of two reused buffers: an
//      all-gather of the shards (sharding full), a cast (compute dtype != master dtype), or nothing at
//      all (the master itself is the buffer). The next block's gather starts before this block runs,
//      so it overlaps this block's compute (prefetch);
//   3. the module's parameters are pointed at views of that buffer, the block runs, and they are
//      pointed away again.
// Backward recomputes each block from its saved input (activation checkpointing at block granularity,
// as FSDP with checkpointing does): gather again (the last two blocks are still gathered from
// forward), prefetch the previous block, recompute, back-propagate into a reused gradient buffer,
// then average the gradient over the ranks: the whole buffer, of which this rank keeps its shard
// (sharding full, ZeRO-2/3) or all (sharding none, data parallel). The average runs while the previous block
// recomputes; at most one is in flight. The result is added into the master's .grad, on the master's
// device, in the master's dtype, so gradient accumulation over micro-steps works as with DDP.
//
// Swapped blocks (blocks_to_swap > 0): every block that kohya's schedule ever moves off the device has
// its master on the host (pinned when the device is CUDA); with sharding full that is this rank's
// shard only. A trainable block's gradient and optimizer state live with its master, so the optimizer
// steps it where it lives (on the host for swapped blocks, as ZeRO-Offload does): moving weights alone
// would leave 12 of AdamW's 16 bytes per parameter on the device. What travels per step:
//   frozen stack     host to device: 2S blocks (forward S, backward S); nothing comes back.
//   trainable stack  host to device: 3S blocks (min(S, N-S) more than frozen: the host blocks
//                    resident at the start of a step were copied in before the optimizer changed
//                    them); device to host: the gradients of the min(2S, N) host blocks.
// On the CPU the same code runs with host-to-host copies, so the schedule is tested everywhere.
//
// Rules: every rank builds the same blocks and calls forward/backward in the same order (the stack
// runs collectives). The blocks must be identical in parameter names, shapes and dtype (one flat
// layout) and deterministic (they run twice). Their parameters must be all trainable or all frozen;
// buffers (none in transformer blocks) stay where they are. The stack must outlive every graph built
// by its forward. Gradient clipping sees the masters' .grad: with sharding full a global norm needs a
// sum of squares over ranks.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <ATen/core/Tensor.h>
#include <torch/nn/modules/container/any.h>

#include "cluster/communicator.h"
#include "src/dist/flat_layout.h"
#include "src/dist/swap_schedule.h"

namespace sdt {

enum class Sharding { none, full };
Sharding parse_sharding(std::string_view name);  // "none" | "full", else sdt::Error
std::string_view sharding_name(Sharding sharding);

struct BlockStackOptions {
  Sharding sharding = Sharding::none;
  int64_t blocks_to_swap = 0;  // at most blocks - 2, as kohya allows
  // The dtype the blocks run in and their parameters are gathered in (bf16 under mixed precision
  // with fp32 masters); by default the masters' own dtype.
  std::optional<at::ScalarType> compute_dtype;
};

// Bytes this rank moved since reset_traffic().
struct StackTraffic {
  int64_t host_to_device = 0;  // swapped masters copied into device slots
  int64_t device_to_host = 0;  // gradients of host masters copied back
  int64_t gathered = 0;        // full-parameter buffers assembled by a collective
  int64_t reduced = 0;         // gradient buffers averaged over the ranks
};

// Bytes the stack holds now, from its live tensors (the masters' .grad included), by where they are.
struct StackMemory {
  int64_t device_masters = 0, device_gradients = 0;
  int64_t host_masters = 0, host_gradients = 0;
  int64_t swap_slots = 0;         // device copies of host masters
  int64_t gather_buffers = 0;     // full parameters in the compute dtype
  int64_t gradient_buffers = 0;   // full gradients in the compute dtype
};

class BlockStack {
 public:
  // Takes the blocks' parameters over: every rank's masters start from rank 0's values (broadcast),
  // and the modules' parameter tensors are emptied. The compute device is the communicator's.
  BlockStack(std::vector<torch::nn::AnyModule> blocks, Communicator& communicator, BlockStackOptions options = {});
  ~BlockStack();
  BlockStack(const BlockStack&) = delete;
  BlockStack& operator=(const BlockStack&) = delete;

  // Runs every block on x (on the compute device). With grad mode on and something to differentiate
  // (x requires grad, or the stack is trainable) each block becomes one recompute-in-backward node;
  // otherwise the blocks just run (sampling, validation).
  at::Tensor forward(const at::Tensor& x);

  // One per block, in block order: flat, 1-D, requires_grad when trainable. Hand these to the optimizer.
  const std::vector<at::Tensor>& masters() const { return masters_; }
  const FlatLayout& layout() const { return layout_; }
  int64_t blocks() const { return static_cast<int64_t>(masters_.size()); }
  bool trainable() const { return trainable_; }
  const BlockStackOptions& options() const { return options_; }
  Communicator& communicator() const { return communicator_; }
  at::ScalarType master_dtype() const { return master_dtype_; }
  at::ScalarType compute_dtype() const { return compute_dtype_; }
  int shard_ranks() const { return shard_ranks_; }  // ranks a block is cut into: world size, or 1
  int shard_index() const { return shard_ranks_ == 1 ? 0 : communicator_.rank(); }

  StackTraffic traffic() const { return traffic_; }
  void reset_traffic() { traffic_ = {}; }
  StackMemory memory() const;

  // Every host-to-device copy since the last clear, as (block, slot) in order: the schedule, for tests.
  struct Fetch {
    int64_t block, slot;
    bool operator==(const Fetch&) const = default;
  };
  const std::vector<Fetch>& fetch_log() const { return fetch_log_; }
  void clear_fetch_log() { fetch_log_.clear(); }

  // Checkpoints. `shard` is a per-element companion of block b's master (the master itself, an Adam
  // moment): this rank's shard, or the whole buffer without sharding. Root receives the block's full
  // buffer (layout().numel() elements, no rank padding); the other ranks get an undefined tensor and
  // never hold more than one shard. Collective: every rank calls it for the same block.
  at::Tensor gather_to_root(int64_t block, const at::Tensor& shard, int root = 0) const;

 private:
  struct Slot;
  struct GatherBuffer;
  struct GradientBuffer;
  class Copier;
  friend struct BlockFunction;

  at::Tensor run_block(int64_t block, const at::Tensor& x);            // forward, no graph
  at::Tensor backward_block(int64_t block, const at::Tensor& x, const at::Tensor& grad_output, bool needs_input_grad);

  at::Tensor acquire(int64_t block);               // the block's full parameters, ready to use
  void prefetch(int64_t block);                    // start moving `block` in while its neighbour computes
  void fetch(int64_t block);                       // copy a host master into its slot, unless already there
  const at::Tensor& device_master(int64_t block);  // the master, or its slot once the copy has landed
  void start_gather(int64_t block);
  void point_parameters(int64_t block, const at::Tensor& full);
  void release_parameters(int64_t block);
  void start_reduction(int64_t block, GradientBuffer& buffer);
  void finish_reduction(GradientBuffer& buffer);

  std::vector<torch::nn::AnyModule> blocks_;
  std::vector<std::vector<at::Tensor>> parameters_;  // each block's own parameter tensors
  Communicator& communicator_;
  BlockStackOptions options_;
  SwapSchedule schedule_;
  FlatLayout layout_;
  bool trainable_ = false;
  at::ScalarType master_dtype_, compute_dtype_;
  at::Device device_;
  int shard_ranks_ = 1;
  bool assembles_ = false;  // full parameters need a buffer (gather or cast); else the master is it

  std::vector<at::Tensor> masters_;
  at::Tensor released_;  // what a block's parameters hold while it is not running: nothing
  std::vector<std::unique_ptr<Slot>> slots_;        // shared_slots() of them
  std::vector<std::unique_ptr<GatherBuffer>> gather_buffers_;
  std::vector<std::unique_ptr<GradientBuffer>> gradient_buffers_;
  std::unique_ptr<Copier> copier_;
  uint64_t pass_ = 0;  // forward passes so far: a gathered buffer is reused only within its pass
  StackTraffic traffic_;
  std::vector<Fetch> fetch_log_;
};

}  // namespace sdt
