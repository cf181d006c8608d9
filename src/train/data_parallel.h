// What the trainer sees of data parallelism, whatever --sharding says (issue #8), so its loop reads
// the same on 1 rank or 1000:
//
//   none       DDP: every rank keeps everything; gradients averaged in buckets during backward
//              (cluster/gradient_reducer.h)
//   optimizer  ZeRO-1: each rank keeps and steps 1/N of the optimizer state (src/dist/zero_shards.h)
//   gradients  ZeRO-2: and 1/N of the gradients, reduce-scattered during every backward
//   full       ZeRO-3 / FSDP: and 1/N of the weights of the model's blocks (src/dist/sharded_units.h), trained
//              or frozen, gathered one block at a time; the other trained tensors as with `gradients`
//
// The loop:
//   Optimizer optimizer(parallel.optimizer_groups());
//   parallel.set_sync(last_micro_step); loss.backward(); parallel.finish();   // every micro-step
//   parallel.unscale(scale); parallel.clip_grad_norm(max); optimizer.step(); parallel.after_step();
//
// Saved optimizer states are always the unsharded layout ("<group>.<tensor>.<state>", as a one-process
// run writes them), so a state saved in any mode at any rank count resumes in any other.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "cluster/communicator.h"
#include "cluster/gradient_reducer.h"
#include "src/dist/sharded_units.h"
#include "src/dist/zero_shards.h"
#include "src/train/optimizers.h"

namespace sdt {

enum class ShardingMode { none, optimizer, gradients, full };
// "none" | "optimizer" | "gradients" | "full"; else sdt::Error naming --sharding.
ShardingMode parse_sharding_mode(std::string_view name);

class DataParallel {
 public:
  // `groups` are the trained tensors by optimizer group; under sharding they become views of flat
  // buffers (zero_shards.h). `units` (full only) holds the model's blocks, already sharded; the groups'
  // tensors inside them are its. Every rank starts from rank 0's values.
  DataParallel(const std::vector<ParamGroup>& groups, Communicator& communicator, ShardingMode mode, int64_t bucket_bytes,
               std::unique_ptr<ShardedUnits> units = nullptr);

  ShardingMode mode() const { return mode_; }
  // What the optimizer steps: the groups' tensors, or each bucket's shard under sharding.
  std::vector<ParamGroup> optimizer_groups() const;
  // Refuses optimizers that cannot step a shard (sdt::Error naming --optimizer_type).
  static void check_optimizer(ShardingMode mode, const std::string& optimizer_kind);

  void set_sync(bool sync);  // false on accumulation micro-steps
  void finish();             // after every backward
  // Divides the gradients the optimizer will use by `scale`; whether they are finite on every rank.
  bool unscale(double scale);
  // torch.nn.utils.clip_grad_norm_ over all ranks' gradients together.
  void clip_grad_norm(double max_norm);
  void after_step();         // after optimizer.step()

  // Collective; rank 0 writes the file.
  void save_optimizer_state(const Optimizer& optimizer, const std::string& path);
  void load_optimizer_state(Optimizer& optimizer, const std::string& path);

  // full: rank 0's modules get the blocks' whole weights for saving or sampling, until release_whole().
  // Collective; nothing to do in the other modes.
  void gather_whole_to_root();
  void release_whole();
  // full: whether `tensor` is a block weight that exists only as shards (resume fills it by load_weights).
  bool is_sharded_block_weight(const at::Tensor& tensor) const;
  // Each trained block weight's shard from its whole saved value.
  void load_weights(const std::function<at::Tensor(const at::Tensor& tensor)>& saved_value);

  // Rank 0's start-up lines: bytes per rank of the trained tensors, their gradients and the optimizer
  // state in this mode (frozen_bytes: the models' other tensors), and the plan's total.
  struct MemoryPlan {
    int64_t frozen = 0, trained = 0, gradients = 0, optimizer_state = 0, buffers = 0;
    int64_t total() const { return frozen + trained + gradients + optimizer_state + buffers; }
  };
  MemoryPlan plan_memory(int64_t frozen_bytes, int64_t optimizer_bytes_per_element) const;
  static std::string describe(const MemoryPlan& plan, ShardingMode mode, int ranks);

 private:
  // One master the optimizer steps: a ZeroShards bucket or a trained block, over tensors of one group.
  struct Sharded {
    size_t group = 0;
    std::vector<size_t> tensors;  // indices into the group's tensors, in layout order
    const FlatLayout* layout = nullptr;
    at::Tensor master;
  };
  std::vector<at::Tensor> stepped() const;  // what the optimizer steps, all groups

  ShardingMode mode_;
  Communicator& communicator_;
  std::vector<ParamGroup> groups_;
  std::unique_ptr<GradientReducer> reducer_;  // none
  std::unique_ptr<ZeroShards> shards_;        // optimizer, gradients, full (the tensors outside blocks)
  std::unique_ptr<ShardedUnits> units_;       // full
  std::vector<Sharded> sharded_;              // by group, in the optimizer's order
};

// Bytes of optimizer state per trained element for kohya's --optimizer_type (AdamW 8, Lion 4, ...).
int64_t optimizer_bytes_per_element(const std::string& optimizer_kind, int64_t element_size);

}  // namespace sdt
