// ZeRO stages 1 and 2 for any set of trained tensors (issue #8): the optimizer state (stage 1), and
// with it the gradients (stage 2), cut into one equal shard per rank. Model-agnostic: it works on a
// U-Net, a text encoder or a LoRA alike, because it never touches the forward pass.
//
// The trained tensors of each optimizer group are cut, in order, into buckets of about bucket_bytes;
// a bucket's tensors become views of one flat buffer (flat_layout.h) and this rank's master is its
// shard of that buffer: a 1-D leaf tensor that aliases the buffer, so stepping it changes the model.
//
//   stage 1 (optimizer)  backward accumulates whole gradients in the tensors' .grad as plain data
//                        parallel does; finish() reduce-scatters each bucket, so a rank receives the
//                        averaged gradient of its shard only, and the optimizer steps the masters.
//   stage 2 (gradients)  every backward (accumulation micro-steps too) starts a bucket's reduce-scatter
//                        as soon as autograd has produced all its gradients and frees the whole
//                        gradients; the reduction travels while backward computes the next buckets (at
//                        most two in flight), and its shard is added into the master's .grad when it
//                        lands: a rank keeps 1/N of the gradients between backward passes.
//   after the step       gather_parameters() all-gathers the updated shards into every rank's buffers.
//
// The masters are what the optimizer steps, so it must be elementwise (AdamW, Lion, SGD): stepping a
// shard is then stepping that part of each tensor. A tensor that gets no gradient in a backward while
// others of its bucket do is stepped with a zero gradient (AdamW decays it; unsharded AdamW would skip
// it); a bucket none of whose tensors requires grad now (a text encoder that stopped training) is left
// alone, as the unsharded optimizer leaves tensors without a gradient.
//
// Bucket order is the reverse of the tensors' order (backward produces the last layers' gradients
// first), the same on every rank, and the layout never depends on the rank count, so a state gathered
// from 2 ranks loads on 3 (unshard_to_root / shard_of in flat_layout.h).
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <vector>

#include <ATen/core/Tensor.h>

#include "cluster/communicator.h"
#include "src/parallel/flat_layout.h"
#include "src/parallel/sharding.h"

namespace sdt {

class ZeroShards {
 public:
  struct Bucket {
    size_t group = 0;
    std::vector<size_t> tensors;  // indices into the group's tensors, ascending
    FlatLayout layout;
    at::Tensor flat;              // the whole buffer (padded_numel(ranks)); the tensors are views of it
    at::Tensor master;            // this rank's shard of `flat`, a leaf that requires grad
    size_t waiting = 0;           // stage 2: tensors whose gradient has not arrived in this backward
  };

  // Each group's tensors (distinct, trainable or not) are re-pointed at views of their bucket's
  // buffer. Every rank's values start as rank 0's.
  ZeroShards(const std::vector<std::vector<at::Tensor>>& groups, Communicator& communicator, Sharding stage,
             int64_t bucket_bytes);
  ~ZeroShards();  // removes the hooks
  ZeroShards(const ZeroShards&) = delete;
  ZeroShards& operator=(const ZeroShards&) = delete;

  Sharding stage() const { return stage_; }
  int ranks() const { return communicator_.size(); }
  const std::vector<Bucket>& buckets() const { return buckets_; }
  // The masters of each group, in bucket order: what the optimizer steps instead of the group's tensors.
  std::vector<std::vector<at::Tensor>> masters() const;

  // false: the next backward only accumulates (stage 1); stage 2 reduces every backward regardless.
  void set_sync(bool sync) { sync_ = sync; }
  // After the backward of an update's last micro-step: every active master's .grad holds the gradient
  // averaged over the ranks (its shard of it).
  void finish();
  // After optimizer.step(): the updated shards into every rank's tensors. Collective.
  void gather_parameters();

 private:
  class ReadyHook;
  // A bucket's reduce-scatter in flight: its flattened gradients and this rank's shard of the average.
  struct Reduction {
    size_t bucket;
    at::Tensor flat, shard;
    std::unique_ptr<PendingCollective> pending;
  };
  bool active(size_t bucket) const;  // some tensor of the bucket requires grad
  void mark_ready(size_t bucket);
  void reduce(size_t bucket);        // starts it; lands the oldest when more than two are in flight
  void land_oldest();

  Communicator& communicator_;
  Sharding stage_;  // optimizer (ZeRO-1) or gradients (ZeRO-2)
  size_t groups_ = 0;
  std::vector<Bucket> buckets_;
  std::vector<at::Tensor> hooked_;  // tensors with our post-accumulate-grad hook
  std::vector<std::vector<at::Tensor>> bucket_tensors_;  // per bucket, the tensors in layout order
  size_t next_bucket_ = 0;  // stage 2: the first bucket not yet reduced in this backward
  std::deque<Reduction> in_flight_;
  bool sync_ = true;
  std::mutex mutex_;
};

}  // namespace sdt
