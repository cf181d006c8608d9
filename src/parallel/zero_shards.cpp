#include "src/parallel/zero_shards.h"

#include <algorithm>
#include <string>

#include <torch/csrc/autograd/function_hook.h>
#include <torch/torch.h>

#include "src/core/error.h"

namespace sdt {

// Runs after autograd has accumulated a tensor's whole gradient of this backward into its .grad.
class ZeroShards::ReadyHook final : public torch::autograd::PostAccumulateGradHook {
 public:
  ReadyHook(ZeroShards& shards, size_t bucket) : shards_(shards), bucket_(bucket) {}
  void operator()(const torch::autograd::Variable&) override { shards_.mark_ready(bucket_); }

 private:
  ZeroShards& shards_;
  size_t bucket_;
};

ZeroShards::ZeroShards(const std::vector<std::vector<at::Tensor>>& groups, Communicator& communicator, Sharding stage,
                       int64_t bucket_bytes)
    : communicator_(communicator), stage_(stage), groups_(groups.size()) {
  if (stage != Sharding::optimizer && stage != Sharding::gradients) {
    fail("ZeRO sharding", "cuts optimizer states (optimizer) or gradients too (gradients), not '{}'", sharding_name(stage));
  }
  // Buckets from the last tensor backwards, cut at bucket_bytes and wherever the group or dtype changes.
  for (size_t g = groups.size(); g-- > 0;) {
    Bucket* open = nullptr;
    int64_t open_bytes = 0;
    for (size_t i = groups[g].size(); i-- > 0;) {
      const at::Tensor& t = groups[g][i];
      const bool fits = open && open_bytes < bucket_bytes &&
                        t.scalar_type() == groups[g][open->tensors.front()].scalar_type() &&
                        t.device() == groups[g][open->tensors.front()].device();
      if (!fits) {
        buckets_.push_back(Bucket{.group = g});
        open = &buckets_.back();
        open_bytes = 0;
      }
      open->tensors.insert(open->tensors.begin(), i);
      open_bytes += t.numel() * static_cast<int64_t>(t.element_size());
    }
  }
  const int ranks = communicator_.size();
  at::NoGradGuard no_grad;
  for (size_t b = 0; b < buckets_.size(); ++b) {
    Bucket& bucket = buckets_[b];
    std::vector<std::pair<std::string, std::vector<int64_t>>> shapes;
    std::vector<at::Tensor> tensors;
    for (size_t i : bucket.tensors) {
      const at::Tensor& t = groups[bucket.group][i];
      shapes.emplace_back(std::to_string(i), t.sizes().vec());
      tensors.push_back(t);
    }
    bucket.layout = FlatLayout(shapes);
    bucket.flat = bucket.layout.flatten(tensors, ranks, tensors.front().options().requires_grad(false));
    if (ranks > 1) communicator_.broadcast(bucket.flat, 0);
    const std::vector<at::Tensor> views = bucket.layout.views(bucket.flat);
    for (size_t k = 0; k < tensors.size(); ++k) tensors[k].set_data(views[k]);
    const int64_t shard = bucket.layout.shard_numel(ranks);
    bucket.master = bucket.flat.narrow(0, communicator_.rank() * shard, shard).detach().requires_grad_(true);
    bucket_tensors_.push_back(tensors);
    if (stage_ == Sharding::gradients) {
      for (const at::Tensor& t : tensors) {
        if (!t.requires_grad()) continue;
        if (torch::autograd::impl::post_acc_grad_hooks(t)) {
          fail("ZeRO sharding", "a trained tensor already has a post-accumulate-grad hook (another reducer owns it)");
        }
        torch::autograd::impl::set_post_acc_grad_hooks(t, std::make_unique<ReadyHook>(*this, b));
        hooked_.push_back(t);
        ++bucket.waiting;
      }
    }
  }
}

ZeroShards::~ZeroShards() {
  for (const auto& t : hooked_) torch::autograd::impl::set_post_acc_grad_hooks(t, nullptr);
}

std::vector<std::vector<at::Tensor>> ZeroShards::masters() const {
  std::vector<std::vector<at::Tensor>> out(groups_);
  for (const Bucket& bucket : buckets_) out[bucket.group].push_back(bucket.master);
  return out;
}

bool ZeroShards::active(size_t bucket) const {
  for (const at::Tensor& t : bucket_tensors_[bucket]) {
    if (t.requires_grad()) return true;
  }
  return false;
}

void ZeroShards::mark_ready(size_t bucket) {
  std::lock_guard lock(mutex_);
  --buckets_[bucket].waiting;
  // In bucket order, so that every rank's i-th collective is the same bucket.
  while (next_bucket_ < buckets_.size() && (!active(next_bucket_) || buckets_[next_bucket_].waiting == 0)) {
    if (active(next_bucket_)) reduce(next_bucket_);
    ++next_bucket_;
  }
}

// The bucket's gradients, flattened (zeros for a tensor without one), reduce-scattered: the whole gradients are
// freed now, and this rank's shard of the average goes into its master's .grad when it lands.
void ZeroShards::reduce(size_t b) {
  at::NoGradGuard no_grad;
  Bucket& bucket = buckets_[b];
  const int ranks = communicator_.size();
  Reduction r{.bucket = b};
  r.flat = at::zeros({bucket.layout.padded_numel(ranks)}, bucket.flat.options());
  const std::vector<at::Tensor> views = bucket.layout.views(r.flat);
  for (size_t k = 0; k < views.size(); ++k) {
    at::Tensor& tensor = bucket_tensors_[b][k];
    if (!tensor.grad().defined()) continue;
    views[k].copy_(tensor.grad());
    tensor.mutable_grad().reset();
  }
  r.shard = at::empty({bucket.layout.shard_numel(ranks)}, r.flat.options());
  r.pending = communicator_.reduce_scatter_async(r.flat.view({ranks, -1}), r.shard, ReduceOp::average);
  in_flight_.push_back(std::move(r));
  if (in_flight_.size() > 2) land_oldest();
}

void ZeroShards::land_oldest() {
  Reduction r = std::move(in_flight_.front());
  in_flight_.pop_front();
  r.pending->wait();
  at::NoGradGuard no_grad;
  at::Tensor& master = buckets_[r.bucket].master;
  if (master.grad().defined()) {
    master.mutable_grad().add_(r.shard);
  } else {
    master.mutable_grad() = r.shard;
  }
}

void ZeroShards::finish() {
  std::lock_guard lock(mutex_);
  if (stage_ == Sharding::optimizer) {
    if (!sync_) return;
    for (size_t b = 0; b < buckets_.size(); ++b) {
      if (active(b)) reduce(b);
    }
    while (!in_flight_.empty()) land_oldest();
    return;
  }
  // Stage 2: the buckets some of whose tensors got no gradient in this backward, then a fresh count.
  for (; next_bucket_ < buckets_.size(); ++next_bucket_) {
    if (active(next_bucket_)) reduce(next_bucket_);
  }
  while (!in_flight_.empty()) land_oldest();
  next_bucket_ = 0;
  for (size_t b = 0; b < buckets_.size(); ++b) {
    buckets_[b].waiting = 0;
    for (const at::Tensor& t : bucket_tensors_[b]) buckets_[b].waiting += t.requires_grad() ? 1 : 0;
  }
}

void ZeroShards::gather_parameters() {
  at::NoGradGuard no_grad;
  const int ranks = communicator_.size();
  if (ranks == 1) return;  // the master is the whole buffer
  for (size_t b = 0; b < buckets_.size(); ++b) {
    if (!active(b)) continue;
    Bucket& bucket = buckets_[b];
    bucket.flat.view({ranks, -1}).copy_(communicator_.all_gather(bucket.master.detach()));
  }
}

}  // namespace sdt
