// kohya's optimizer steps inside backward (sdxl_train.py; its SD3 and FLUX scripts do the same):
//
//   --fused_backward_pass        Adafactor steps each trained tensor as soon as its gradient is whole, then frees it
//   --fused_optimizer_groups N   the tensors cut into about N groups in order (a group never spans two learning
//                                rates); a group steps once all its tensors' gradients are in, then frees them
//
// Either way --max_grad_norm clips each tensor's gradient by its own norm (kohya calls clip_grad_norm_ per tensor),
// not by the norm of all of them, and the gradients of the whole model never exist at once: a step holds the
// gradients of the groups backward has not finished, not all of them. kohya makes one optimizer and one lr schedule
// per group; here one optimizer steps a group at a time (Optimizer::step_parameters), which computes the same because
// each of its updates reads one tensor's gradient and state only (Prodigy, whose step size comes from all tensors, is
// refused).
//
// Use: DataParallel::set_on_gradient calls on_gradient() per tensor in backward; finish_backward() after backward.
#pragma once

#include <cstdint>
#include <map>
#include <mutex>
#include <vector>

#include <ATen/core/Tensor.h>

#include "src/core/train_args.h"
#include "src/train/optimizers.h"

namespace sdt {

class FusedSteps {
 public:
  // Whether the arguments ask for fused steps.
  static bool requested(const TrainArgs& args) { return args.fused_backward_pass || args.fused_optimizer_groups.has_value(); }
  // The flag that asked, for messages.
  static const char* flag(const TrainArgs& args) { return args.fused_backward_pass ? "--fused_backward_pass" : "--fused_optimizer_groups"; }

  // `groups`: what `optimizer` steps, by optimizer group. Throws sdt::Error naming the flag for what kohya refuses
  // (another optimizer than Adafactor with --fused_backward_pass, gradient accumulation) and what cannot be fused
  // (Prodigy; `loss_scaling`, fp16's loss scaler, which must see every gradient before any step).
  FusedSteps(Optimizer& optimizer, const std::vector<ParamGroup>& groups, const TrainArgs& args, bool loss_scaling);

  // In backward: `tensor`'s gradient is whole. Clips it, and steps its group if that was the group's last.
  void on_gradient(at::Tensor& tensor);
  // After backward: steps the groups some of whose tensors got no gradient (unused in this step), resets the counts.
  void finish_backward();

  size_t group_count() const { return groups_.size(); }
  // Bytes of the largest group's gradients: what a step holds at least, in place of all gradients.
  int64_t largest_group_bytes() const;

 private:
  void step_group(size_t group);

  Optimizer& optimizer_;
  double max_grad_norm_ = 0;
  std::vector<std::vector<at::Tensor>> groups_;
  std::map<const void*, size_t> group_of_;  // tensor -> fused group
  std::vector<size_t> arrived_;             // per fused group, in this backward
  std::mutex mutex_;                        // autograd may run hooks on its device threads
};

// kohya's split for --fused_optimizer_groups N: tensors in the optimizer groups' order, ceil(total / N) per group,
// a new group wherever the learning rate changes. Each group as indices into the flattened list of tensors.
std::vector<std::vector<size_t>> fused_optimizer_groups(const std::vector<ParamGroup>& groups, int64_t count);

}  // namespace sdt
