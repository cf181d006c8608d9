// For tests/check_lora_with_diffusers.py: writes a LoRA (U-Net with conv LoRA, and the text encoders) for the tiny
// SD 1.x or SDXL model, or (the transformer and CLIP-L) for the tiny FLUX.1 dev model, with random non-zero weights,
// and the outputs of our models with it applied (its adapters on the layers) and without.
//   write_lora_check_files sd|sdxl|flux MODEL_FOLDER OUT_DIR  ->  OUT_DIR/lora.safetensors, OUT_DIR/ours.safetensors
#include <cstdio>
#include <string>

#include <ATen/CPUGeneratorImpl.h>

#include "src/core/error.h"
#include "src/families/sd/sd_family.h"
#include "src/families/flux/flux_family.h"
#include "src/families/sdxl/sdxl_family.h"
#include "src/models/sd_checkpoint.h"
#include "src/models/sdxl_checkpoint.h"
#include "src/networks/lora.h"
#include "src/networks/lora_metadata.h"

namespace {

// The LoRA over `targets` with random non-zero weights, written to OUT_DIR/lora.safetensors.
sdt::LoRANetwork write_lora(const std::vector<sdt::NetworkTarget>& targets, const sdt::LoRANetworkConfig& config,
                            at::Generator& gen, const std::string& out) {
  sdt::LoRANetwork network(config, targets, true, true, gen);
  {
    torch::NoGradGuard no_grad;
    for (auto& p : network->parameters()) p.normal_(0, 0.3, gen);
  }
  network->save_weights(out + "/lora.safetensors", at::kFloat, sdt::LoRATrainingMetadata{}.to_metadata());
  network->eval();
  return network;
}

void write_sd(const std::string& folder, const std::string& out) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(17);
  sdt::SdModels models = sdt::load_diffusers_folder(folder);
  const auto config = sdt::parse_lora_network_args(4, 2.0, std::nullopt, {"conv_dim=2", "conv_alpha=1"});
  sdt::LoRANetwork network = write_lora(sdt::sd_network_targets(models.text_encoder, models.unet, true), config, gen, out);
  at::Tensor sample = at::randn({2, 4, 8, 8}, gen), context = at::randn({2, 5, 32}, gen);
  at::Tensor timesteps = at::tensor({10.0, 700.0});
  at::Tensor ids = at::tensor({998, 5, 17, 300, 999, 999, 998, 42, 999, 999, 999, 999}, at::kLong).reshape({2, 6});
  torch::NoGradGuard no_grad;
  const at::Tensor unet_lora = models.unet->forward(sample, timesteps, context);
  const at::Tensor text_lora = models.text_encoder->forward(ids).last_hidden_state;
  network->remove();
  sdt::save_safetensors(out + "/ours.safetensors",
                        {{"sample", sample}, {"timesteps", timesteps}, {"context", context}, {"input_ids", ids},
                         {"unet_base", models.unet->forward(sample, timesteps, context)},
                         {"text_base", models.text_encoder->forward(ids).last_hidden_state},
                         {"unet_lora", unet_lora}, {"text_lora", text_lora}});
}

// SDXL: kohya's SGM names (diffusers maps them onto its U-Net), both text encoders; the U-Net takes the vector of
// text_embeds and the size embeddings of time_ids, as diffusers' added_cond_kwargs.
void write_sdxl(const std::string& folder, const std::string& out) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(17);
  sdt::SdxlModels m = sdt::load_sdxl_diffusers_folder(folder);
  const auto config = sdt::parse_lora_network_args(4, 2.0, std::nullopt, {"conv_dim=2", "conv_alpha=1"},
                                                   sdt::NetworkBlockLayout::sdxl());
  sdt::LoRANetwork network =
      write_lora(sdt::sdxl_network_targets(m.text_encoder1, m.text_encoder2, m.unet, true), config, gen, out);
  const int64_t context_dim = m.unet->config.cross_attention_dim, pooled = m.text_encoder2->config.projection_dim;
  at::Tensor sample = at::randn({2, 4, 8, 8}, gen), context = at::randn({2, 5, context_dim}, gen);
  at::Tensor text_embeds = at::randn({2, pooled}, gen);
  at::Tensor time_ids = at::tensor({64.0, 48.0, 0.0, 8.0, 64.0, 64.0, 32.0, 32.0, 4.0, 0.0, 32.0, 32.0}).reshape({2, 6});
  at::Tensor timesteps = at::tensor({10.0, 700.0});
  at::Tensor ids = at::tensor({998, 5, 17, 300, 999, 0, 998, 42, 999, 0, 0, 0}, at::kLong).reshape({2, 6});
  const at::Tensor vector = at::cat({text_embeds, sdt::size_embedding(time_ids, m.unet->config.addition_time_embed_dim)}, 1);
  torch::NoGradGuard no_grad;
  const auto outputs = [&] {
    return std::vector<at::Tensor>{m.unet->forward(sample, timesteps, context, vector),
                                   m.text_encoder1->forward(ids).last_hidden_state,
                                   m.text_encoder2->forward(ids).text_embeds};
  };
  const std::vector<at::Tensor> lora = outputs();
  network->remove();
  const std::vector<at::Tensor> base = outputs();
  sdt::save_safetensors(out + "/ours.safetensors",
                        {{"sample", sample}, {"timesteps", timesteps}, {"context", context}, {"text_embeds", text_embeds},
                         {"time_ids", time_ids}, {"input_ids", ids},
                         {"unet_base", base[0]}, {"text_base", base[1]}, {"text2_base", base[2]},
                         {"unet_lora", lora[0]}, {"text_lora", lora[1]}, {"text2_lora", lora[2]}});
}

// FLUX.1 dev: kohya's lora_flux names for the transformer and CLIP-L (the tiny fixture, tests/fixtures/flux/tiny, with
// the tiny SD text encoder as CLIP-L); the transformer's packed inputs, CLIP-L's pooled output.
void write_flux(const std::string& folder, const std::string& out) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(17);
  sdt::FluxModels m;
  m.transformer = sdt::load_flux_transformer(folder + "/transformer.safetensors");
  m.clip_l = sdt::load_flux_clip_l(folder + "/../../sd/sd1/text_encoder");
  sdt::TrainArgs args;
  args.network_dim = 4;
  args.network_alpha = 2.0;
  const auto config = sdt::flux_network_config(args, m.transformer->config);
  sdt::LoRANetwork network = write_lora(sdt::flux_network_targets(m.clip_l, nullptr, m.transformer), config, gen, out);
  const sdt::FluxConfig& c = m.transformer->config;
  at::Tensor img = at::randn({2, 24, c.in_channels}, gen), txt = at::randn({2, 16, c.context_in_dim}, gen);
  at::Tensor y = at::randn({2, c.vec_in_dim}, gen), img_ids = sdt::flux_image_ids(2, 4, 6), txt_ids = at::zeros({2, 16, 3});
  at::Tensor timesteps = at::tensor({0.3f, 0.8f}), guidance = at::tensor({3.5f, 2.0f});
  at::Tensor ids = at::tensor({998, 5, 17, 300, 999, 999, 998, 42, 999, 999, 999, 999}, at::kLong).reshape({2, 6});
  torch::NoGradGuard no_grad;
  const auto outputs = [&] {
    return std::vector<at::Tensor>{m.transformer->forward(img, img_ids, txt, txt_ids, timesteps, y, guidance, at::Tensor()),
                                   m.clip_l->forward(ids).pooled};
  };
  const std::vector<at::Tensor> lora = outputs();
  network->remove();
  const std::vector<at::Tensor> base = outputs();
  sdt::save_safetensors(out + "/ours.safetensors",
                        {{"img", img}, {"txt", txt}, {"y", y}, {"img_ids", img_ids}, {"txt_ids", txt_ids}, {"timesteps", timesteps},
                         {"guidance", guidance}, {"input_ids", ids}, {"transformer_base", base[0]}, {"text_base", base[1]},
                         {"transformer_lora", lora[0]}, {"text_lora", lora[1]}});
}

}  // namespace

int main(int argc, char** argv) {
  const std::string family = argc == 4 ? argv[1] : "";
  if (family != "sd" && family != "sdxl" && family != "flux") {
    std::fprintf(stderr, "usage: %s sd|sdxl|flux MODEL_FOLDER OUT_DIR\n", argv[0]);
    return 2;
  }
  try {
    if (family == "sd") {
      write_sd(argv[2], argv[3]);
    } else if (family == "sdxl") {
      write_sdxl(argv[2], argv[3]);
    } else {
      write_flux(argv[2], argv[3]);
    }
  } catch (const sdt::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
