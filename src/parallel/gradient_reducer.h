// Data-parallel gradients, as PyTorch's DistributedDataParallel reduces them: every rank runs the
// same model on its share of the global batch, and after backward every rank holds the mean of
// all ranks' gradients, so N ranks with batch b step exactly like one process with batch N*b.
//
// The trainable parameters are grouped into buckets of about `bucket_bytes`, in reverse parameter
// order (backward produces the last layers' gradients first) and by dtype and device. A hook on
// each parameter fires once autograd has accumulated its .grad; when every parameter of a bucket
// is in, the bucket's gradients are copied into one flat buffer and its all-reduce starts while
// backward goes on with earlier layers. Buckets start in bucket order on every rank, so the ranks'
// collectives always pair up. finish() waits for them and writes the means back into .grad.
//
// Use per optimizer step:
//
//   reducer.set_sync(micro == accumulation_steps - 1);  // accumulation micro-steps just accumulate
//   loss.backward();
//   if (reducer.sync()) reducer.finish();             // before clipping and optimizer.step()
//
// A parameter that got no gradient on a rank in a step (unused by that rank's batch) counts as a
// zero gradient there, as with DDP's find_unused_parameters, and never blocks the reduction: its
// bucket, and the ones after it, start in finish() instead of during backward (so they do not
// overlap). A parameter that no rank used keeps an undefined .grad, as in a one-process run.
// Parameters without requires_grad (frozen) never enter a bucket and are not broadcast.
//
// Each parameter's post-accumulate-grad hook is the reducer's while it lives (a tensor has one).
// In a one-process world the reducer does nothing at all (no buckets, no hooks, no copies), unless
// set_on_gradient asks for each gradient as it arrives.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include <ATen/core/Tensor.h>

#include "cluster/communicator.h"

namespace sdt {

class GradientReducer {
 public:
  static constexpr int64_t kDefaultBucketBytes = 25 * 1024 * 1024;  // DDP's bucket_cap_mb default

  // `parameters` in the model's order, the same on every rank (checked). The trainable ones are
  // broadcast from rank 0 first, so every replica starts from rank 0's weights.
  GradientReducer(const std::vector<at::Tensor>& parameters, Communicator& communicator,
                  int64_t bucket_bytes = kDefaultBucketBytes);
  ~GradientReducer();  // removes the hooks
  GradientReducer(const GradientReducer&) = delete;
  GradientReducer& operator=(const GradientReducer&) = delete;

  // false: the next backward passes only accumulate into .grad, with no communication; the next
  // backward with sync on reduces the accumulated sums.
  void set_sync(bool sync);
  bool sync() const { return sync_; }

  // After a backward with sync on: waits for every bucket, writes the means into .grad.
  void finish();

  // Calls `on_gradient` with each parameter as soon as its final gradient (the mean over the ranks) is in .grad: in
  // one process from the parameter's post-accumulate-grad hook during backward, with several ranks in finish() as each
  // bucket's mean lands (a rank's own gradient is then dropped once it is copied into its bucket). A parameter that no
  // rank used is not passed. For optimizer steps inside backward (kohya's --fused_backward_pass), which then free
  // each gradient.
  void set_on_gradient(std::function<void(at::Tensor& parameter)> on_gradient);

  // Seconds the last finish() waited for communication that backward did not hide. With NCCL
  // this includes the GPU work still queued before the reductions (the host waits for both).
  double last_wait_seconds() const { return last_wait_seconds_; }
  // Buckets of the last finish() whose reduction started during backward, overlapping it; the
  // others started in finish().
  size_t last_overlapped_buckets() const { return last_overlapped_buckets_; }
  size_t bucket_count() const { return buckets_.size(); }

 private:
  struct Bucket {
    std::vector<size_t> parameters;  // indices into parameters_
    std::vector<int64_t> offsets;    // of each parameter's gradient in `flat`
    // The gradients (`gradients` elements), then one mark per parameter: 1 where this rank has a
    // gradient for it, so a parameter whose mark is still 0 after the mean had none on any rank.
    at::Tensor flat;
    int64_t gradients = 0;
    size_t waiting = 0;  // parameters whose gradient has not arrived in this backward
    std::unique_ptr<PendingCollective> reduction;
  };
  class ReadyHook;

  void mark_ready(size_t parameter);   // from the autograd hook, in backward
  void start_ready_buckets();          // under mutex_
  void start(Bucket& bucket);

  Communicator& communicator_;
  std::vector<at::Tensor> parameters_;  // trainable only
  std::vector<size_t> bucket_of_;       // per parameter
  std::vector<char> arrived_;           // per parameter, in this backward
  std::vector<Bucket> buckets_;
  size_t next_bucket_ = 0;  // the first bucket whose reduction has not started
  bool in_step_ = false;    // a backward with sync on has begun, its finish() not yet
  bool sync_ = true;
  double last_wait_seconds_ = 0;
  size_t last_overlapped_buckets_ = 0;
  std::function<void(at::Tensor&)> on_gradient_;
  std::mutex mutex_;  // autograd may run hooks on its device threads
};

// Overwrites `parameters` on every rank with root's.
void broadcast_parameters(const std::vector<at::Tensor>& parameters, Communicator& communicator, int root = 0);

// A 64-bit hash of the parameters' bytes, compared across ranks: fails, on every rank alike,
// naming the ranks whose replica differs from rank 0's. For a divergence check behind a flag
// (it copies the parameters to the host).
uint64_t replica_checksum(const std::vector<at::Tensor>& parameters, Communicator& communicator);

}  // namespace sdt
