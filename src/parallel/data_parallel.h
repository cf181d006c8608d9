// What the trainer sees of data parallelism, whatever --sharding (src/parallel/sharding.h) and --blocks_to_swap say, so
// its loop reads the same on 1 rank or 1000:
//
//   none       DDP: every rank keeps everything; gradients averaged in buckets during backward (gradient_reducer.h)
//   optimizer  ZeRO-1: each rank keeps and steps 1/N of the optimizer state (zero_shards.h)
//   gradients  ZeRO-2: and 1/N of the gradients, reduce-scattered during every backward
//   full       ZeRO-3 / FSDP: and 1/N of the weights of the model's blocks (block_engine.h), trained or frozen,
//              gathered one block at a time; the other trained tensors as with `gradients`
//
// With a BlockEngine (full, or block swap with none) the engine holds the blocks' weights: their masters are what the
// optimizer steps, and the engine averages their gradients; the other tensors go the mode's way.
//
// The loop:
//   Optimizer optimizer(parallel.optimizer_groups());
//   parallel.set_sync(last_micro_step); loss.backward(); parallel.finish();   // every micro-step
//   parallel.unscale(scale); parallel.clip_grad_norm(max); optimizer.step(); parallel.after_step();
//
// Saved optimizer states are always the unsharded layout ("<group>.<tensor>.<state>", as a one-process run writes
// them), so a state saved in any mode at any rank count resumes in any other.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "cluster/communicator.h"
#include "src/parallel/gradient_reducer.h"
#include "src/parallel/block_engine.h"
#include "src/parallel/sharding.h"
#include "src/parallel/zero_shards.h"
#include "src/train/optimizers.h"

namespace sdt {

class DataParallel {
 public:
  // `groups` are the trained tensors by optimizer group; under sharding they become views of flat buffers
  // (zero_shards.h). `engine` (full: required; none: block swap; not with optimizer or gradients) holds the model's
  // blocks; the groups' tensors inside them are its. Every rank starts from rank 0's values.
  DataParallel(const std::vector<ParamGroup>& groups, Communicator& communicator, Sharding mode, int64_t bucket_bytes,
               std::unique_ptr<BlockEngine> engine = nullptr);

  Sharding mode() const { return mode_; }
  // What the optimizer steps: the groups' tensors, each bucket's shard under sharding, the engine's masters.
  std::vector<ParamGroup> optimizer_groups() const;
  // Refuses optimizers that cannot step a shard or a flat buffer of a block (sdt::Error naming --optimizer_type).
  void check_optimizer(const std::string& optimizer_kind) const;

  void set_sync(bool sync);  // false on accumulation micro-steps
  void finish();             // after every backward
  // Divides the gradients the optimizer will use by `scale`; whether they are finite on every rank.
  bool unscale(double scale);
  // torch.nn.utils.clip_grad_norm_ over all ranks' gradients together.
  void clip_grad_norm(double max_norm);
  void after_step();         // after optimizer.step()

  // `on_gradient` gets each trained tensor as soon as its gradient, averaged over the ranks, is whole
  // (GradientReducer::set_on_gradient): for optimizer steps inside backward. Only where every rank holds every
  // gradient whole: --sharding none without a block engine (sdt::Error naming `flag` otherwise).
  void set_on_gradient(std::function<void(at::Tensor& tensor)> on_gradient, const std::string& flag);

  // Collective; rank 0 writes the file.
  void save_optimizer_state(const Optimizer& optimizer, const std::string& path);
  void load_optimizer_state(Optimizer& optimizer, const std::string& path);

  // With an engine: rank 0's modules get the blocks' whole weights for saving or sampling, until release_whole().
  // Collective; nothing to do without one.
  bool holds_block_weights() const { return engine_ != nullptr; }
  void gather_whole_to_root();
  void release_whole();
  // Whether `tensor` is a block weight the engine holds as a master (resume fills it by load_weights).
  bool is_block_weight(const at::Tensor& tensor) const;
  // Each trained block's master from the block weights' whole saved values.
  void load_weights(const std::function<at::Tensor(const at::Tensor& tensor)>& saved_value);

  // Rank 0's start-up lines: bytes per rank of the trained tensors, their gradients and the optimizer
  // state in this mode (frozen_bytes: the models' other tensors), and the plan's total.
  struct MemoryPlan {
    int64_t frozen = 0, trained = 0, gradients = 0, optimizer_state = 0, buffers = 0;
    int64_t total() const { return frozen + trained + gradients + optimizer_state + buffers; }
  };
  MemoryPlan plan_memory(int64_t frozen_bytes, int64_t optimizer_bytes_per_element) const;
  static std::string describe(const MemoryPlan& plan, Sharding mode, int ranks);

 private:
  // One tensor the optimizer steps for tensors of one group: a ZeroShards bucket's shard or a trained block's master
  // (cut by `layout` into `ranks` shards), or, beside an engine's masters with sharding none, a tensor itself.
  struct Stepped {
    size_t group = 0;
    std::vector<size_t> tensors;  // indices into the group's tensors, in layout order
    const FlatLayout* layout = nullptr;  // null: the tensor itself
    int ranks = 1;
    at::Tensor master;
  };
  std::vector<at::Tensor> stepped() const;  // what the optimizer steps, all groups
  bool replicated() const { return mode_ == Sharding::none && !engine_; }  // the optimizer steps the groups' tensors
  // Whether every rank's gradients are the same: then checks and norms need no collective.
  bool gradients_replicated() const { return mode_ == Sharding::none; }

  Sharding mode_;
  Communicator& communicator_;
  std::vector<ParamGroup> groups_;
  std::unique_ptr<GradientReducer> reducer_;  // none (the tensors outside blocks)
  std::unique_ptr<ZeroShards> shards_;        // optimizer, gradients, full (the tensors outside blocks)
  std::unique_ptr<BlockEngine> engine_;       // full, or none with block swap
  std::vector<Stepped> stepped_;              // by group, in the optimizer's order (empty when replicated())
};

// Bytes of optimizer state per trained element for kohya's --optimizer_type (AdamW 8, Lion 4, ...).
int64_t optimizer_bytes_per_element(const std::string& optimizer_kind, int64_t element_size);

}  // namespace sdt
