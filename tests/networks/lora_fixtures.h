// Shared by the LoRA tests: the tiny SD models, kohya's reference files (tests/fixtures/networks, made by
// gen_lora_fixtures.py) and the network configurations the generator used.
#pragma once

#include <fstream>
#include <iostream>
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

// Draws of a random LoRA output, `samples` (draws, ...), against kohya's per-element mean and variance over the same
// number of its own draws (torch's generator is not replayed across languages). Each statistic is an average over n
// independent draws on both sides, so their difference has standard error sqrt(2) * se, with se from our draws (the
// sample's own variance for a mean; the fourth central moment for a variance). Five standard errors per element: a
// normal tail of 6e-7, so a few thousand comparisons fail under 1% of the time for a correct implementation.
inline void expect_draws_match(const std::string& what, const at::Tensor& samples, const at::Tensor& expected_mean,
                               const at::Tensor& expected_var) {
  const double n = static_cast<double>(samples.size(0));
  const at::Tensor mean = samples.mean(0);
  const at::Tensor centred = samples - mean;
  const at::Tensor var = centred.pow(2).mean(0);
  const at::Tensor fourth = centred.pow(4).mean(0);
  const at::Tensor mean_tolerance = 5.0 * (2.0 * var / n).sqrt() + 1e-7;
  const at::Tensor var_tolerance = 5.0 * (2.0 * (fourth - var.pow(2)).clamp_min(0) / n).sqrt() + 1e-7;
  const double mean_excess = ((mean - expected_mean.to(at::kDouble)).abs() / mean_tolerance).max().item<double>();
  const double var_excess = ((var - expected_var.to(at::kDouble)).abs() / var_tolerance).max().item<double>();
  std::cout << what << ": largest |mean - kohya's| " << mean_excess * 5 << " standard errors, largest |variance - kohya's| "
            << var_excess * 5 << "\n";
  EXPECT_LE(mean_excess, 1.0) << what << " mean";
  EXPECT_LE(var_excess, 1.0) << what << " variance";
}

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
