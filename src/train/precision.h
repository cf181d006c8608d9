// kohya's --mixed_precision as the trainer applies it: the dtypes of frozen and trained weights, autocast over the
// forward on the device that computes, and fp16 loss scaling (torch.amp.GradScaler's rules).
#pragma once

#include <cstdint>
#include <optional>

#include <ATen/ATen.h>

#include "src/core/train_args.h"

namespace sdt {

// Frozen models are stored in the weight dtype and run under autocast; trained weights stay fp32 unless --full_fp16 /
// --full_bf16; fp16 scales the loss so small gradients survive.
struct Precision {
  std::optional<at::ScalarType> autocast;  // the compute dtype of matmuls and convolutions
  at::ScalarType frozen = at::kFloat;      // the dtype of weights nobody trains
  at::ScalarType trained = at::kFloat;     // the dtype of trained weights and their gradients
  at::ScalarType vae = at::kFloat;
  bool loss_scaling = false;
  // kohya's --fp8_base / --fp8_base_unet (a network's frozen models): the denoiser, and with --fp8_base alone the text
  // encoders, stored in float8_e4m3fn (store_in_fp8); autocast widens each weight as its op runs.
  bool fp8_denoiser = false, fp8_text_encoders = false;
};

// sdt::Error for --fp8_base without --mixed_precision (kohya's assertion).
Precision precision_from_args(const TrainArgs& args);

// torch.autocast for one device type over a scope: ops on its lower-precision list run in `dtype`.
class AutocastScope {
 public:
  AutocastScope(std::optional<at::ScalarType> dtype, c10::DeviceType device);
  ~AutocastScope();
  AutocastScope(const AutocastScope&) = delete;
  AutocastScope& operator=(const AutocastScope&) = delete;

 private:
  bool enabled_;
  c10::DeviceType device_;
};

// torch.amp.GradScaler with its defaults: the loss is multiplied by `scale` before backward; before the update the
// gradients are divided by it, and a step whose gradients hold inf or NaN is skipped and halves the scale; 2000
// good steps in a row double it (DataParallel::unscale divides the gradients).
struct LossScaler {
  double scale = 65536.0;
  int64_t growth_tracker = 0;

  void update(bool finite);
};

}  // namespace sdt
