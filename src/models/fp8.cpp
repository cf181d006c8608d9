#include "src/models/fp8.h"

#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/normalization.h>

#include "src/models/clip_text.h"
#include "src/models/t5.h"

namespace sdt {

void store_denoiser_in_fp8(torch::nn::Module& denoiser) { denoiser.to(at::kFloat8_e4m3fn); }

void store_text_encoder_in_fp8(torch::nn::Module& encoder, at::ScalarType kept) {
  encoder.to(at::kFloat8_e4m3fn);
  for (const auto& module : encoder.modules()) {
    if (dynamic_cast<torch::nn::EmbeddingImpl*>(module.get()) || dynamic_cast<ClipEmbeddingsImpl*>(module.get()) ||
        dynamic_cast<T5LayerNormImpl*>(module.get())) {
      module->to(kept);
    }
  }
}

std::string fp8_cpu_obstacle(const torch::nn::Module& model) {
  for (const auto& item : model.named_modules()) {
    const auto* layer_norm = dynamic_cast<const torch::nn::LayerNormImpl*>(item.value().get());
    const auto* group_norm = dynamic_cast<const torch::nn::GroupNormImpl*>(item.value().get());
    if ((layer_norm && layer_norm->options.elementwise_affine()) || (group_norm && group_norm->options.affine())) {
      return "its " + std::string(layer_norm ? "LayerNorm" : "GroupNorm") + " '" + item.key() +
             "' has weights, which PyTorch's CPU kernels do not take in fp8 (CUDA's autocast widens them)";
    }
  }
  return {};
}

}  // namespace sdt
