#include "src/train/fused_steps.h"

#include <algorithm>

#include <spdlog/spdlog.h>
#include <torch/nn/utils/clip_grad.h>

#include "src/core/error.h"

namespace sdt {

std::vector<std::vector<size_t>> fused_optimizer_groups(const std::vector<ParamGroup>& groups, int64_t count) {
  int64_t total = 0;
  for (const ParamGroup& g : groups) total += static_cast<int64_t>(g.params.size());
  const int64_t per_group = (total + count - 1) / count;
  std::vector<std::vector<size_t>> out;
  std::vector<size_t> current;
  size_t index = 0;
  for (size_t g = 0; g < groups.size(); ++g) {
    // kohya compares each tensor's lr with the open group's; groups of one lr in a row share fused groups.
    if (!current.empty() && groups[g].lr != groups[g - 1].lr) out.push_back(std::exchange(current, {}));
    for (size_t i = 0; i < groups[g].params.size(); ++i, ++index) {
      current.push_back(index);
      if (static_cast<int64_t>(current.size()) == per_group) out.push_back(std::exchange(current, {}));
    }
  }
  if (!current.empty()) out.push_back(std::move(current));
  return out;
}

FusedSteps::FusedSteps(Optimizer& optimizer, const std::vector<ParamGroup>& groups, const TrainArgs& args,
                       bool loss_scaling)
    : optimizer_(optimizer), max_grad_norm_(args.max_grad_norm) {
  const char* name = flag(args);
  if (args.fused_backward_pass && args.fused_optimizer_groups) {
    fail("--fused_backward_pass", "and --fused_optimizer_groups are two ways of the same thing; choose one");
  }
  if (args.fused_backward_pass && optimizer.kind() != "Adafactor") {
    fail(name, "works with --optimizer_type Adafactor only, as in kohya (got {}); --fused_optimizer_groups N fuses the others",
         optimizer.kind());
  }
  if (args.fused_optimizer_groups && *args.fused_optimizer_groups < 1) {
    fail(name, "must be at least 1, got {}", *args.fused_optimizer_groups);
  }
  if (args.gradient_accumulation_steps > 1) {
    fail(name, "steps the weights inside every backward, so it cannot accumulate --gradient_accumulation_steps {}; use 1",
         args.gradient_accumulation_steps);
  }
  if (!optimizer.updates_each_parameter_alone()) {
    fail(name, "{} computes one step size from all weights together, so it cannot step some before the others' "
         "gradients exist; use it without {}", optimizer.kind(), name);
  }
  if (loss_scaling) {
    fail(name, "with --mixed_precision fp16 the loss scaler must see every gradient before any weight steps (to skip "
         "an overflowing update); use --mixed_precision bf16");
  }
  std::vector<at::Tensor> tensors;
  for (const ParamGroup& g : groups) tensors.insert(tensors.end(), g.params.begin(), g.params.end());
  if (args.fused_backward_pass) {
    for (const at::Tensor& t : tensors) groups_.push_back({t});
  } else {
    for (const auto& indices : fused_optimizer_groups(groups, *args.fused_optimizer_groups)) {
      groups_.emplace_back();
      for (size_t i : indices) groups_.back().push_back(tensors[i]);
    }
    spdlog::info("--fused_optimizer_groups {}: {} groups of tensors, each stepped once its gradients are in", *args.fused_optimizer_groups,
                 groups_.size());
  }
  for (size_t g = 0; g < groups_.size(); ++g) {
    for (const at::Tensor& t : groups_[g]) group_of_[t.unsafeGetTensorImpl()] = g;
  }
  arrived_.assign(groups_.size(), 0);
}

void FusedSteps::on_gradient(at::Tensor& tensor) {
  std::lock_guard lock(mutex_);
  const auto found = group_of_.find(tensor.unsafeGetTensorImpl());
  if (found == group_of_.end()) fail("fused optimizer steps", "a gradient arrived for a tensor the optimizer does not step");
  if (max_grad_norm_ > 0) torch::nn::utils::clip_grad_norm_(tensor, max_grad_norm_);
  const size_t g = found->second;
  if (++arrived_[g] == groups_[g].size()) step_group(g);
}

void FusedSteps::finish_backward() {
  std::lock_guard lock(mutex_);
  for (size_t g = 0; g < groups_.size(); ++g) {
    if (arrived_[g] > 0 && arrived_[g] < groups_[g].size()) step_group(g);
  }
  std::fill(arrived_.begin(), arrived_.end(), 0);
}

void FusedSteps::step_group(size_t group) {
  optimizer_.step_parameters(groups_[group]);
  for (at::Tensor& t : groups_[group]) t.mutable_grad().reset();
  arrived_[group] = groups_[group].size();  // stepped: finish_backward leaves it
}

int64_t FusedSteps::largest_group_bytes() const {
  int64_t largest = 0;
  for (const auto& group : groups_) {
    int64_t bytes = 0;
    for (const at::Tensor& t : group) bytes += t.numel() * static_cast<int64_t>(t.element_size());
    largest = std::max(largest, bytes);
  }
  return largest;
}

}  // namespace sdt
