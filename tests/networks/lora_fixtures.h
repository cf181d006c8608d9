// Shared by the LoRA tests: the tiny SD models, kohya's reference files (tests/fixtures/networks, made by
// gen_lora_fixtures.py) and the network configurations the generator used.
#pragma once

#include <fstream>
#include <map>
#include <string>

#include <ATen/CPUGeneratorImpl.h>
#include <nlohmann/json.hpp>

#include "src/core/tensor_io.h"
#include "src/families/sd/sd_family.h"
#include "src/models/sd_checkpoint.h"
#include "src/networks/lora.h"
#include "tests/fixture_files.h"
#include "tests/models/compare.h"

namespace sdt::lora_test {

inline const std::string kSd = SDT_FIXTURES "/sd/";
inline const std::string kNetworks = SDT_FIXTURES "/networks/";

using testing_support::read_json;
using testing_support::read_tensors;

inline at::Generator seeded(uint64_t seed) { return at::make_generator<at::CPUGeneratorImpl>(seed); }

// The architecture of the fixtures' models, which single files do not record.
inline SdConfig fixture_config(bool v2) {
  SdConfig c;
  c.v2 = v2;
  const std::string dir = kSd + (v2 ? "sd2" : "sd1");
  c.text = read_clip_text_config(dir + "/text_encoder/config.json");
  c.vae = read_vae_config(dir + "/vae/config.json");
  c.unet = read_unet_config(dir + "/unet/config.json");
  return c;
}

// A network created from a file's dims and alphas (kohya's create_network_from_weights) with its weights loaded.
inline LoRANetwork network_from_file(const std::string& path, SdModels& models, double multiplier) {
  LoRANetworkConfig config;
  config.modules_dim_alpha = lora_dims_from_file(safetensors::File(path));
  config.multiplier = multiplier;
  LoRANetwork network(config, sd_network_targets(models.text_encoder, models.unet, config.adapts_conv_blocks()), true, true, seeded(0));
  LoadResult loaded = network->load_weights(path);
  EXPECT_TRUE(loaded.missing.empty() && loaded.unexpected.empty()) << path;
  return network;
}

struct Outputs {
  at::Tensor unet, text;
};

inline Outputs run_models(SdModels& models, const std::map<std::string, at::Tensor>& x) {
  torch::NoGradGuard no_grad;
  return {models.unet->forward(x.at("sample"), x.at("timesteps"), x.at("context")),
          models.text_encoder->forward(x.at("input_ids")).last_hidden_state};
}

}  // namespace sdt::lora_test
