// For tests/check_lora_with_diffusers.py: writes a LoRA (U-Net with conv LoRA, and text encoder) for the tiny SD 1.x
// model with random non-zero weights, and the outputs of our models with it applied (its adapters on the layers).
//   write_lora_check_files SD1_DIFFUSERS_FOLDER OUT_DIR  ->  OUT_DIR/lora.safetensors, OUT_DIR/ours.safetensors
#include <cstdio>

#include <ATen/CPUGeneratorImpl.h>

#include "src/core/error.h"
#include "src/families/sd/sd_family.h"
#include "src/models/sd_checkpoint.h"
#include "src/networks/lora.h"
#include "src/networks/lora_metadata.h"

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s SD1_DIFFUSERS_FOLDER OUT_DIR\n", argv[0]);
    return 2;
  }
  try {
    const std::string folder = argv[1], out = argv[2];
    auto gen = at::make_generator<at::CPUGeneratorImpl>(17);
    sdt::SdModels models = sdt::load_diffusers_folder(folder);
    auto config = sdt::parse_lora_network_args(4, 2.0, std::nullopt, {"conv_dim=2", "conv_alpha=1"});
    sdt::LoRANetwork network(config, sdt::sd_network_targets(models.text_encoder, models.unet, config.adapts_conv_blocks()), true, true, gen);
    {
      torch::NoGradGuard no_grad;
      for (auto& p : network->parameters()) p.normal_(0, 0.3, gen);
    }
    sdt::LoRATrainingMetadata metadata;
    network->save_weights(out + "/lora.safetensors", at::kFloat, metadata.to_metadata());

    at::Tensor sample = at::randn({2, 4, 8, 8}, gen), context = at::randn({2, 5, 32}, gen);
    at::Tensor timesteps = at::tensor({10.0, 700.0});
    at::Tensor ids = at::tensor({998, 5, 17, 300, 999, 999, 998, 42, 999, 999, 999, 999}, at::kLong).reshape({2, 6});
    torch::NoGradGuard no_grad;
    network->eval();
    const at::Tensor unet_lora = models.unet->forward(sample, timesteps, context);
    const at::Tensor text_lora = models.text_encoder->forward(ids).last_hidden_state;
    network->remove();
    const at::Tensor unet_base = models.unet->forward(sample, timesteps, context);
    const at::Tensor text_base = models.text_encoder->forward(ids).last_hidden_state;
    sdt::save_safetensors(out + "/ours.safetensors",
                          {{"sample", sample}, {"timesteps", timesteps}, {"context", context}, {"input_ids", ids},
                           {"unet_base", unet_base}, {"text_base", text_base},
                           {"unet_lora", unet_lora}, {"text_lora", text_lora}});
  } catch (const sdt::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
