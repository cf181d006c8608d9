#include "src/train/precision.h"

#include <ATen/autocast_mode.h>

#include "src/core/error.h"

namespace sdt {

Precision precision_from_args(const TrainArgs& args) {
  Precision p;
  if (args.fp8_base || args.fp8_base_unet) {
    if (args.mixed_precision == "no") fail(args.fp8_base ? "--fp8_base" : "--fp8_base_unet", "requires --mixed_precision fp16 or bf16, as in kohya");
    p.fp8_denoiser = true;
    p.fp8_text_encoders = !args.fp8_base_unet;
  }
  if (args.mixed_precision == "no") return p;
  const at::ScalarType weight = args.mixed_precision == "fp16" ? at::kHalf : at::kBFloat16;
  p.autocast = weight;
  p.frozen = weight;
  p.vae = args.no_half_vae ? at::kFloat : weight;
  if (args.full_fp16 || args.full_bf16) p.trained = weight;
  p.loss_scaling = weight == at::kHalf;
  return p;
}

AutocastScope::AutocastScope(std::optional<at::ScalarType> dtype, c10::DeviceType device)
    : enabled_(dtype.has_value()), device_(device) {
  if (!enabled_) return;
  at::autocast::set_autocast_dtype(device_, *dtype);
  at::autocast::set_autocast_enabled(device_, true);
  at::autocast::increment_nesting();
}

AutocastScope::~AutocastScope() {
  if (!enabled_) return;
  if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
  at::autocast::set_autocast_enabled(device_, false);
}

void LossScaler::update(bool finite) {
  if (!finite) {
    scale *= 0.5;
    growth_tracker = 0;
  } else if (++growth_tracker == 2000) {
    scale *= 2.0;
    growth_tracker = 0;
  }
}

}  // namespace sdt
