// The one engine that runs a model's blocks when their weights are not all resident on the device: per-block full
// sharding (ZeRO-3 / FSDP) and per-rank block swap (kohya's --blocks_to_swap), alone or together, in a data-parallel
// job. It is a BlockRunner (src/models/layers.h): the model calls run() for each of its blocks, in forward order, with
// as many tensors in and out as the block has (a FLUX double block takes four and returns two). The blocks may differ
// from each other (the U-Net's ResNets and Transformer2Ds); block swap works on stacks of identical blocks inside them
// (a family's ParallelPlan names them).
//
// Each block's weights become one flat buffer (flat_layout.h). The engine keeps per block one master: a 1-D tensor that
// is this rank's shard of the buffer (Sharding::full) or the whole buffer (Sharding::none). The masters are what an
// optimizer steps, each rank its own; the blocks' own parameter tensors hold no storage except while their block runs.
// Tensors a block reads but does not own (a LoRA's weights on its layers: `kept_whole`) stay whole and are
// differentiated as with gradient checkpointing, so a LoRA works inside every block the engine runs.
//
// Running block b:
//   1. its master reaches the device: a block whose master lives on the host (swap_schedule.h) is copied into its
//      device slot, on kohya's schedule;
//   2. its full weights are assembled in the compute dtype into one of two reused buffers: an all-gather of the shards
//      (sharding full), a cast (compute dtype != master dtype), or nothing at all (the master itself is the buffer).
//      The next block's gather starts before this block runs, so it overlaps this block's compute (prefetch);
//   3. the module's parameters are pointed at views of that buffer, the block runs without keeping activations, and
//      they are pointed away again.
// Backward recomputes each block from its saved inputs (activation checkpointing at block granularity, as FSDP with
// checkpointing does), replaying the forward's autocast and generator state (RecomputeState) so a LoRA's dropout
// draws the same masks: gather again (the last two blocks are still gathered from forward), prefetch the previous
// block, recompute, back-propagate, then average the weights' gradient over the ranks: the whole buffer, of which this
// rank keeps its shard (full) or all (none). The average runs while the previous block recomputes; at most one is in
// flight; finish() lands the last. The result is added into the master's .grad, on the master's device, in the
// master's dtype, so gradient accumulation over micro-steps works as with DDP.
//
// Swapped blocks: every block that kohya's schedule ever moves off the device has its master on the host (pinned when
// the device is CUDA); with sharding full that is this rank's shard only. A trainable block's gradient and optimizer
// state live with its master, so the optimizer steps it where it lives (on the host for swapped blocks, as
// ZeRO-Offload does): moving weights alone would leave 12 of AdamW's 16 bytes per parameter on the device. What
// travels per step, S = blocks_to_swap of a stack:
//   frozen stack     host to device: 2S blocks (forward S, backward S); nothing comes back.
//   trainable stack  host to device: 3S blocks (the host blocks resident at the start of a step were copied in before
//                    the optimizer changed them); device to host: the gradients of the min(2S, N) host blocks.
// On the CPU the same code runs with host-to-host copies, so the schedule is tested everywhere.
//
// Rules: every rank builds the same blocks and runs them in the same order (the engine runs collectives). A block's
// weights are all trainable or all frozen, in one dtype; blocks are deterministic (they run twice). The engine must
// outlive every graph built through it. Gradient clipping sees the masters' .grad: with sharding full a global norm
// needs a sum of squares over ranks (DataParallel does it).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>

#include "cluster/communicator.h"
#include "src/models/layers.h"
#include "src/parallel/flat_layout.h"
#include "src/parallel/sharding.h"
#include "src/parallel/swap_schedule.h"

namespace sdt {

struct BlockEngineOptions {
  Sharding sharding = Sharding::none;  // none or full
  std::vector<SwapStack> swap;
  // The dtype the blocks run in and their weights are gathered in (bf16 under mixed precision with fp32 masters);
  // by default each master's own dtype.
  std::optional<at::ScalarType> compute_dtype;
  // For blocks built without weights (their parameters on the meta device: BlockWeights::deferred): block b's
  // parameter `name`, whole, in any dtype, on the CPU. Each rank copies the part its master covers into the master;
  // a view of a memory-mapped checkpoint then pages in little more than that, and no rank holds the whole model.
  std::function<at::Tensor(int64_t block, const std::string& name)> read_deferred;
};

// Bytes this rank moved since reset_traffic().
struct EngineTraffic {
  int64_t host_to_device = 0;  // swapped masters copied into device slots
  int64_t device_to_host = 0;  // gradients of host masters copied back
  int64_t gathered = 0;        // full-weight buffers assembled by a collective
  int64_t reduced = 0;         // gradient buffers averaged over the ranks
};

// Bytes the engine holds now, from its live tensors (the masters' .grad included), by where they are.
struct EngineMemory {
  int64_t device_masters = 0, device_gradients = 0;
  int64_t host_masters = 0, host_gradients = 0;
  int64_t swap_slots = 0;        // device copies of host masters
  int64_t gather_buffers = 0;    // full weights in the compute dtype
  int64_t gradient_buffers = 0;  // full gradients in the compute dtype
};

class BlockEngine final : public BlockRunner {
 public:
  struct ManagedBlock {
    std::shared_ptr<torch::nn::Module> module;
    std::vector<at::Tensor> parameters;  // the module's own, in layout order (empty tensors between runs)
    FlatLayout layout;
    at::Tensor master;                   // 1-D; requires grad when the block is trainable
    bool trainable = false;
  };

  // `blocks` in forward order; their parameters except `kept_whole` go into the masters. Every rank's masters start
  // from rank 0's values (broadcast), or for blocks built without weights from options.read_deferred (every rank reads
  // the same checkpoint), and the modules' parameter tensors are emptied. The compute device is the communicator's.
  // sdt::Error for what it cannot do (mixed blocks, a swap stack of unlike blocks, too many swapped, deferred weights
  // with nothing to read them).
  BlockEngine(const std::vector<std::shared_ptr<torch::nn::Module>>& blocks, const std::vector<at::Tensor>& kept_whole,
              Communicator& communicator, BlockEngineOptions options = {});
  ~BlockEngine() override;
  BlockEngine(const BlockEngine&) = delete;
  BlockEngine& operator=(const BlockEngine&) = delete;

  // With grad mode on and something to differentiate (an input or a kept-whole tensor requires grad, or the block is
  // trainable) the block becomes one recompute-in-backward node; otherwise it just runs (sampling, validation).
  std::vector<at::Tensor> run(const torch::nn::Module& module, Block block, const std::vector<at::Tensor>& inputs,
                              const std::vector<at::Tensor>& params) override;
  // After backward: every trainable master's .grad holds its averaged gradient (the last average has landed).
  void finish();

  const std::vector<ManagedBlock>& blocks() const { return blocks_; }
  int64_t block_count() const { return static_cast<int64_t>(blocks_.size()); }
  const FlatLayout& layout(int64_t block) const { return blocks_.at(block).layout; }
  const at::Tensor& master(int64_t block) const { return blocks_.at(block).master; }
  std::vector<at::Tensor> masters() const;  // one per block, in block order: what an optimizer steps
  const BlockEngineOptions& options() const { return options_; }
  Communicator& communicator() const { return communicator_; }
  int shard_ranks() const { return shard_ranks_; }  // ranks a block is cut into: world size, or 1
  int shard_index() const { return shard_ranks_ == 1 ? 0 : communicator_.rank(); }
  at::ScalarType compute_dtype(int64_t block) const;

  EngineTraffic traffic() const { return traffic_; }
  void reset_traffic() { traffic_ = {}; }
  EngineMemory memory() const;
  // What a rank holds beyond its masters while the largest block runs: its gathered weights, the next block's
  // (prefetched), the shard snapshots their gathers send, and in backward their gradient and the gradient buffer being
  // reduced.
  int64_t running_block_bytes() const;

  // Every host-to-device copy since the last clear, as (block, slot within its stack) in order: the schedule, for tests.
  struct Fetch {
    int64_t block, slot;
    bool operator==(const Fetch&) const = default;
  };
  const std::vector<Fetch>& fetch_log() const { return fetch_log_; }
  void clear_fetch_log() { fetch_log_.clear(); }

  // `shard` is a per-element companion of block b's master (the master itself, an Adam moment). Root receives the
  // block's full buffer (layout(b).numel() elements, on the CPU); the other ranks get an undefined tensor and never
  // hold more than one shard. Collective: every rank calls it for the same block.
  at::Tensor gather_to_root(int64_t block, const at::Tensor& shard, int root = 0) const;
  // Rank 0's modules get every block's whole weights (to save or to sample from), the other ranks' stay empty; until
  // release_whole(), run() just runs the blocks (rank 0 only). Collective.
  void gather_whole_to_root();
  void release_whole();
  // Sets block b's master from the whole tensors `whole_parameter(k)` (layout entry k), reading only the parts of
  // them this rank's master covers.
  void load_block(int64_t block, const std::function<at::Tensor(size_t k)>& whole_parameter);

 private:
  struct Slot;
  struct GatherBuffer;
  struct GradientBuffer;
  class Copier;
  class Hooks;
  struct Swap {  // a block's place in a swap stack
    size_t stack = 0;
    int64_t index = 0;  // within the stack
  };

  void bring_in(int64_t block, bool recompute);  // the block's weights in place, its neighbour's on their way
  void reduce_gradient(int64_t block, const std::vector<at::Tensor>& weight_gradients);

  bool on_host(int64_t block) const;
  at::Tensor acquire(int64_t block);               // the block's full weights, ready to use
  void prefetch(int64_t block);                    // start moving `block` in while its neighbour computes
  void fetch(int64_t block);                       // copy a host master into its slot, unless already there
  const at::Tensor& device_master(int64_t block);  // the master, or its slot once the copy has landed
  void start_gather(int64_t block);
  void point_parameters(int64_t block, const at::Tensor& full);
  void release_parameters(int64_t block);
  void fetch_scheduled(std::optional<int64_t> (SwapSchedule::*when)(int64_t) const, int64_t block);
  void start_reduction(int64_t block, GradientBuffer& buffer);
  void finish_reduction(GradientBuffer& buffer);
  bool assembles(int64_t block) const;  // full weights need a buffer (gather or cast); else the master is it

  std::vector<ManagedBlock> blocks_;
  std::unordered_map<const torch::nn::Module*, int64_t> index_of_;
  std::vector<std::unordered_set<const void*>> own_;  // per block: its parameters' TensorImpl, to tell kept-whole ones
  Communicator& communicator_;
  BlockEngineOptions options_;
  std::vector<SwapSchedule> schedules_;           // one per swap stack
  std::vector<std::optional<Swap>> swap_of_;      // per block
  std::vector<std::vector<std::unique_ptr<Slot>>> slots_;  // per swap stack: shared_slots() of them
  at::Device device_;
  int shard_ranks_ = 1;

  at::Tensor released_;  // what a block's parameters hold while it is not running: nothing
  std::vector<std::unique_ptr<GatherBuffer>> gather_buffers_;      // two
  std::vector<std::unique_ptr<GradientBuffer>> gradient_buffers_;  // one, or two with several ranks
  std::unique_ptr<Copier> copier_;
  uint64_t pass_ = 0;             // forward passes so far: a gathered buffer is reused only within its pass
  int64_t last_forward_ = -1;     // the block forward ran last; running one at or before it starts a new pass
  bool whole_ = false;
  EngineTraffic traffic_;
  std::vector<Fetch> fetch_log_;
};

}  // namespace sdt
