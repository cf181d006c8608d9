// Full sharding (ZeRO-3 / FSDP) of a model's blocks that are not all alike: the U-Net's ResNets and
// Transformer2Ds (issue #8). Each block ("unit") keeps on this rank only its shard of one flat buffer
// of its weights (flat_layout.h), trainable or frozen; the model's own parameter tensors are empty
// except while their block runs. The model calls run() for each block (BlockRunner, src/models/layers.h):
//
//   forward   gather the block's shards (all-gather) into a whole buffer, point its parameters at views
//             of it, start gathering the next block (prefetch: it travels while this one computes),
//             run the block without keeping activations, point the parameters away again;
//   backward  gather again (prefetching the block before it), recompute the block with grad on,
//             back-propagate, and for a trainable block reduce-scatter the weights' gradient so each
//             rank receives the average of its shard, which autograd accumulates into the master's
//             .grad (accumulation micro-steps work).
//
// So a rank holds 1/N of every block plus the block that runs and the one being prefetched. Other tensors a block
// reads (a LoRA's weights, registered under its targets) stay whole and are differentiated as with gradient
// checkpointing; a LoRA acts as an adapter on the forward of whatever weights its layer holds, so it needs nothing
// from the gather. The recomputation replays the forward's autocast and generator state (RecomputeState).
//
// Under mixed precision the blocks can run in a compute dtype (bf16) other than their masters' (fp32):
// the shard is cast before the all-gather (half the bytes), and the gradient is reduced in the
// master's dtype. Blocks run in the order given (the model's forward order); a prefetch that does not
// match the next block asked for, or whose master changed since (an optimizer step), is not used.
// Not done here (BlockStack does it for stacks of identical blocks): block swap.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <unordered_map>
#include <vector>

#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>

#include "cluster/communicator.h"
#include "src/dist/flat_layout.h"
#include "src/models/layers.h"

namespace sdt {

class ShardedUnits final : public BlockRunner {
 public:
  struct Unit {
    std::shared_ptr<torch::nn::Module> module;
    std::vector<at::Tensor> parameters;  // the module's own, in layout order (empty tensors between runs)
    FlatLayout layout;
    at::Tensor master;                   // this rank's shard: a leaf, requires grad when the unit is trainable
    bool trainable = false;
  };

  // `units`: the blocks; their parameters except `kept_whole` are sharded (all trainable or all frozen per
  // block, one dtype). Every rank starts from rank 0's values; the modules' parameters are emptied.
  ShardedUnits(const std::vector<std::shared_ptr<torch::nn::Module>>& units, const std::vector<at::Tensor>& kept_whole,
               Communicator& communicator, std::optional<at::ScalarType> compute_dtype = std::nullopt);

  std::vector<at::Tensor> run(const torch::nn::Module& module, Block block, const std::vector<at::Tensor>& inputs,
                              const std::vector<at::Tensor>& params) override;

  const std::vector<Unit>& units() const { return units_; }
  Communicator& communicator() const { return communicator_; }

  // Rank 0's modules get every block's whole weights (to save or to sample from), the other ranks' stay
  // empty; until release_whole(), run() just runs the blocks (rank 0 only). Collective.
  void gather_whole_to_root();
  void release_whole();

  // What a rank holds beyond its shards while the largest block runs: its gathered weights, the next
  // block's (prefetched), and in backward their gradient and the gradient buffer being reduced.
  int64_t running_block_bytes() const;

  // Sets unit u's master from the whole tensors `whole_parameter(k)` (layout entry k), reading only the
  // parts of them this rank's shard covers.
  void load_unit(size_t u, const std::function<at::Tensor(size_t k)>& whole_parameter);

 private:
  friend struct UnitFunction;
  struct Prefetch {
    size_t unit;
    int64_t master_version;
    at::Tensor shard, whole;
    std::unique_ptr<PendingCollective> pending;
  };
  // Points unit u's parameters at its whole weights, then starts gathering unit `next` if given.
  void acquire(size_t u, std::optional<size_t> next);
  void release(size_t u);
  at::Tensor reduce_gradient(size_t u, const std::vector<at::Tensor>& gradients);  // this rank's averaged shard

  std::vector<Unit> units_;
  std::unordered_map<const torch::nn::Module*, size_t> unit_of_;
  Communicator& communicator_;
  std::optional<at::ScalarType> compute_dtype_;
  std::unique_ptr<Prefetch> prefetch_;  // at most one gather in flight
  bool whole_ = false;
};

}  // namespace sdt
