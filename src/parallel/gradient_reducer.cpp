#include "src/parallel/gradient_reducer.h"

#include <chrono>
#include <cstring>
#include <map>
#include <tuple>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <torch/torch.h>

#include "src/core/error.h"

namespace sdt {
namespace {

// FNV-1a's step on 64-bit words: any one changed word changes the result.
uint64_t mix(uint64_t hash, uint64_t word) { return (hash ^ word) * 0x100000001b3ull; }

uint64_t hash_bytes(uint64_t hash, const void* data, size_t bytes) {
  const auto* p = static_cast<const unsigned char*>(data);
  size_t i = 0;
  for (; i + 8 <= bytes; i += 8) {
    uint64_t word;
    std::memcpy(&word, p + i, 8);
    hash = mix(hash, word);
  }
  uint64_t tail = 0;
  std::memcpy(&tail, p + i, bytes - i);
  return mix(hash, tail);
}

// Gathers one value from every rank; throws on every rank alike when some rank's value differs
// from rank 0's, naming those ranks.
void check_same_on_every_rank(uint64_t value, Communicator& communicator, const std::string& where,
                              const std::string& what) {
  const at::Tensor mine = at::tensor({static_cast<int64_t>(value)}, at::TensorOptions(at::kLong).device(communicator.device()));
  const at::Tensor all = communicator.all_gather(mine).cpu();
  std::vector<int> differing;
  for (int r = 1; r < communicator.size(); ++r) {
    if (all[r].item<int64_t>() != all[0].item<int64_t>()) differing.push_back(r);
  }
  if (!differing.empty()) fail(where, "{} on rank(s) {} differ from rank 0's", what, fmt::join(differing, ", "));
}

}  // namespace

// Runs once autograd has accumulated the parameter's gradient into .grad (AccumulateGrad calls a
// leaf's post-accumulate-grad hook after the sum), so it sees the whole gradient of this backward.
class GradientReducer::ReadyHook final : public torch::autograd::PostAccumulateGradHook {
 public:
  ReadyHook(GradientReducer& reducer, size_t parameter) : reducer_(reducer), parameter_(parameter) {}
  void operator()(const torch::autograd::Variable&) override { reducer_.mark_ready(parameter_); }

 private:
  GradientReducer& reducer_;
  size_t parameter_;
};

GradientReducer::GradientReducer(const std::vector<at::Tensor>& parameters, Communicator& communicator,
                                 int64_t bucket_bytes)
    : communicator_(communicator) {
  for (const auto& p : parameters) {
    if (!p.requires_grad()) continue;
    if (!p.is_leaf()) fail("gradient reducer", "parameter {} ({}) is not a leaf tensor", parameters_.size(), c10::str(p.sizes()));
    if (torch::autograd::impl::post_acc_grad_hooks(p)) {
      fail("gradient reducer", "parameter {} already has a post-accumulate-grad hook (a tensor has one)", parameters_.size());
    }
    parameters_.push_back(p);
  }
  // One process: the mean over one rank is the gradient itself; no buckets, no hooks, nothing to copy.
  if (communicator_.size() == 1) return;
  uint64_t layout = mix(0xcbf29ce484222325ull, parameters_.size());
  for (const auto& p : parameters_) {
    layout = mix(layout, static_cast<uint64_t>(p.scalar_type()));
    for (int64_t d : p.sizes()) layout = mix(layout, static_cast<uint64_t>(d));
  }
  check_same_on_every_rank(layout, communicator_, "gradient reducer",
                           fmt::format("the trainable parameters (count, shapes, dtypes; {} here)", parameters_.size()));
  broadcast_parameters(parameters_, communicator_);

  // Reverse order: backward makes the last parameters' gradients first. One open bucket per
  // (dtype, device); a bucket closes once it holds bucket_bytes.
  std::map<std::tuple<at::ScalarType, at::DeviceType, at::DeviceIndex>, size_t> open;
  bucket_of_.resize(parameters_.size());
  for (size_t i = parameters_.size(); i-- > 0;) {
    const at::Tensor& p = parameters_[i];
    const auto key = std::make_tuple(p.scalar_type(), p.device().type(), p.device().index());
    auto it = open.find(key);
    if (it == open.end()) {
      it = open.emplace(key, buckets_.size()).first;
      buckets_.emplace_back();
    }
    Bucket& bucket = buckets_[it->second];
    const int64_t offset = bucket.offsets.empty() ? 0 : bucket.offsets.back() + parameters_[bucket.parameters.back()].numel();
    bucket.parameters.push_back(i);
    bucket.offsets.push_back(offset);
    bucket_of_[i] = it->second;
    if ((offset + p.numel()) * p.element_size() >= bucket_bytes) open.erase(it);
  }
  for (Bucket& bucket : buckets_) {
    const at::Tensor& last = parameters_[bucket.parameters.back()];
    bucket.gradients = bucket.offsets.back() + last.numel();
    bucket.flat = at::zeros({bucket.gradients + static_cast<int64_t>(bucket.parameters.size())}, last.options());
    bucket.waiting = bucket.parameters.size();
  }
  arrived_.assign(parameters_.size(), 0);

  for (size_t i = 0; i < parameters_.size(); ++i) {
    torch::autograd::impl::set_post_acc_grad_hooks(parameters_[i], std::make_unique<ReadyHook>(*this, i));
  }
}

GradientReducer::~GradientReducer() {
  for (const auto& p : parameters_) torch::autograd::impl::set_post_acc_grad_hooks(p, nullptr);
}

void GradientReducer::set_sync(bool sync) {
  std::lock_guard lock(mutex_);
  if (in_step_) fail("gradient reducer", "set_sync after a backward with sync on: call finish() first");
  sync_ = sync;
}

void GradientReducer::set_on_gradient(std::function<void(at::Tensor&)> on_gradient) {
  on_gradient_ = std::move(on_gradient);
  if (communicator_.size() > 1) return;  // the buckets' hooks are in place; finish() calls it
  for (size_t i = 0; i < parameters_.size(); ++i) {
    torch::autograd::impl::set_post_acc_grad_hooks(parameters_[i], std::make_unique<ReadyHook>(*this, i));
  }
}

void GradientReducer::mark_ready(size_t parameter) {
  if (communicator_.size() == 1) {  // a hook exists in one process only to pass the gradient on
    if (sync_) on_gradient_(parameters_[parameter]);
    return;
  }
  std::lock_guard lock(mutex_);
  if (!sync_) return;
  if (arrived_[parameter]) {
    fail("gradient reducer",
         "parameter {} got a second gradient before finish(): call finish() after every backward with sync on "
         "(set_sync(false) for accumulation micro-steps)",
         parameter);
  }
  arrived_[parameter] = 1;
  in_step_ = true;
  --buckets_[bucket_of_[parameter]].waiting;
  start_ready_buckets();
}

void GradientReducer::start_ready_buckets() {
  // In bucket order, so that every rank's i-th all-reduce is the same bucket.
  while (next_bucket_ < buckets_.size() && buckets_[next_bucket_].waiting == 0) start(buckets_[next_bucket_++]);
}

void GradientReducer::start(Bucket& bucket) {
  at::NoGradGuard no_grad;
  std::vector<float> has_gradient(bucket.parameters.size());
  for (size_t k = 0; k < bucket.parameters.size(); ++k) {
    const at::Tensor& p = parameters_[bucket.parameters[k]];
    at::Tensor slot = bucket.flat.narrow(0, bucket.offsets[k], p.numel());
    has_gradient[k] = p.grad().defined() ? 1 : 0;
    if (has_gradient[k]) {
      slot.view(p.sizes()).copy_(p.grad());
      if (on_gradient_) parameters_[bucket.parameters[k]].mutable_grad().reset();  // its mean comes back in finish()
    } else {
      slot.zero_();
    }
  }
  bucket.flat.narrow(0, bucket.gradients, static_cast<int64_t>(has_gradient.size())).copy_(at::tensor(has_gradient));
  bucket.reduction = communicator_.all_reduce_async(bucket.flat, ReduceOp::average);
}

void GradientReducer::finish() {
  last_wait_seconds_ = 0;
  if (!sync_ || buckets_.empty()) return;
  {
    // Parameters that got no gradient in this backward (unused by this rank's batch) are zeros.
    std::lock_guard lock(mutex_);
    last_overlapped_buckets_ = next_bucket_;
    for (size_t i = 0; i < parameters_.size(); ++i) {
      if (!arrived_[i]) --buckets_[bucket_of_[i]].waiting;
    }
    start_ready_buckets();
  }
  at::NoGradGuard no_grad;
  for (Bucket& bucket : buckets_) {
    // Timed through the read of the used marks: with NCCL, wait() only queues the wait on the
    // stream, and that read is where the host waits for the reduction.
    const auto started = std::chrono::steady_clock::now();
    bucket.reduction->wait();
    bucket.reduction.reset();
    const at::Tensor used_anywhere =
        bucket.flat.narrow(0, bucket.gradients, static_cast<int64_t>(bucket.parameters.size())).to(at::kCPU, at::kFloat).contiguous();
    last_wait_seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();

    const float* used = used_anywhere.data_ptr<float>();
    for (size_t k = 0; k < bucket.parameters.size(); ++k) {
      at::Tensor& p = parameters_[bucket.parameters[k]];
      if (used[k] == 0) continue;
      const at::Tensor mean = bucket.flat.narrow(0, bucket.offsets[k], p.numel()).view(p.sizes());
      if (p.grad().defined()) {
        p.mutable_grad().copy_(mean);
      } else {
        p.mutable_grad() = at::empty_like(p).copy_(mean);
      }
      if (on_gradient_) on_gradient_(p);
    }
    bucket.waiting = bucket.parameters.size();
  }
  std::fill(arrived_.begin(), arrived_.end(), 0);
  next_bucket_ = 0;
  in_step_ = false;
}

void broadcast_parameters(const std::vector<at::Tensor>& parameters, Communicator& communicator, int root) {
  at::NoGradGuard no_grad;
  for (const auto& p : parameters) communicator.broadcast(p, root);
}

uint64_t replica_checksum(const std::vector<at::Tensor>& parameters, Communicator& communicator) {
  uint64_t hash = 0xcbf29ce484222325ull;
  for (const auto& p : parameters) {
    const at::Tensor bytes = p.detach().cpu().contiguous();
    hash = hash_bytes(mix(hash, static_cast<uint64_t>(bytes.numel())), bytes.data_ptr(), bytes.nbytes());
  }
  check_same_on_every_rank(hash, communicator, "replica check",
                           fmt::format("the parameters ({} tensors, checksum {:016x} here)", parameters.size(), hash));
  return hash;
}

}  // namespace sdt
