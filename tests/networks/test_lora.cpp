// LoRA modules and networks against kohya's networks/lora.py run on the same tiny diffusers models: which modules,
// their names, dims and alphas, the initial weights for a seed, the optimizer groups, the forward (kohya's patched
// forward vs our merged-weight reparametrisation), gradients, dropouts and max-norm regularisation.
#include <gtest/gtest.h>

#include "src/core/error.h"
#include "src/networks/lora_metadata.h"
#include "tests/networks/lora_fixtures.h"

namespace sdt {
namespace {

using namespace lora_test;
using testing_support::expect_close;

std::vector<std::string> generator_args(const std::string& config) {
  if (config == "conv") return {"conv_dim=2", "conv_alpha=0.5"};
  if (config != "blocks") return {};
  return {"block_dims=2,3,0,4,5,6,0,7,8,2,3,4,5,6,7,8,0,2,3,4,5,6,7,8,2",
          "block_alphas=0.5,0.75,1.0,1.25,1.5,1.75,2.0,2.25,2.5,2.75,3.0,3.25,3.5,3.75,4.0,4.25,4.5,4.75,5.0,5.25,5.5,"
          "5.75,6.0,6.25,6.5",
          "conv_block_dims=1,2,3,1,2,3,1,2,3,1,2,3,1,2,3,1,2,3,1,2,3,1,2,3,1",
          "down_lr_weight=sine+0.1",
          "mid_lr_weight=2.0",
          "up_lr_weight=0.5,0.05,1.5",
          "block_lr_zero_threshold=0.1",
          "loraplus_unet_lr_ratio=4",
          "loraplus_lr_ratio=16"};
}

class KohyaNetworks : public ::testing::TestWithParam<std::tuple<std::string, std::string>> {};

TEST_P(KohyaNetworks, ModulesNamesDimsAlphasAndParamGroupsMatchKohya) {
  const auto& [variant, config_name] = GetParam();
  const nlohmann::json expected = read_json(kNetworks + "names.json").at(variant + "_" + config_name);
  SdModels models = load_diffusers_folder(kSd + variant);
  const double alpha = config_name == "conv" ? 2.0 : 1.0;
  LoRANetworkConfig config = parse_lora_network_args(4, alpha, std::nullopt, generator_args(config_name));
  LoRANetwork network(config, models.text_encoder, models.unet, true, true, seeded(0));

  auto check = [&](const std::vector<LoRAModule>& loras, const nlohmann::json& want, const std::string& what) {
    ASSERT_EQ(loras.size(), want.size()) << what;
    for (size_t i = 0; i < loras.size(); ++i) {
      EXPECT_EQ(loras[i]->lora_name, want[i][0].get<std::string>()) << what << " #" << i;
      EXPECT_EQ(loras[i]->dim(), want[i][1].get<int64_t>()) << loras[i]->lora_name;
      EXPECT_DOUBLE_EQ(loras[i]->alpha_value(), want[i][2].get<double>()) << loras[i]->lora_name;
    }
  };
  check(network->text_encoder_loras, expected.at("text_encoder"), variant + " text encoder");
  check(network->unet_loras, expected.at("unet"), variant + " U-Net");

  std::map<const void*, std::string> names;
  for (const auto& item : network->named_parameters()) names[item.value().unsafeGetTensorImpl()] = item.key();
  std::vector<LoraParamGroup> groups = network->prepare_optimizer_params(5e-5, 1e-4, 1e-3);
  const auto& want_groups = expected.at("param_groups");
  ASSERT_EQ(groups.size(), want_groups.size());
  for (size_t i = 0; i < groups.size(); ++i) {
    EXPECT_EQ(groups[i].description, want_groups[i][0].get<std::string>()) << "group " << i;
    EXPECT_NEAR(groups[i].lr, want_groups[i][1].get<double>(), 1e-15) << groups[i].description;
    ASSERT_EQ(static_cast<int64_t>(groups[i].params.size()), want_groups[i][2].get<int64_t>()) << groups[i].description;
    std::string joined;
    for (const auto& p : groups[i].params) joined += (joined.empty() ? "" : "\n") + names.at(p.unsafeGetTensorImpl());
    Sha256 sha;
    sha.update(joined.data(), joined.size());
    EXPECT_EQ(sha.hex_digest(), want_groups[i][3].get<std::string>()) << groups[i].description << " parameters";
  }
}

INSTANTIATE_TEST_SUITE_P(Sd, KohyaNetworks,
                         ::testing::Combine(::testing::Values("sd1", "sd2"), ::testing::Values("default", "conv", "blocks")),
                         [](const auto& info) { return std::get<0>(info.param) + "_" + std::get<1>(info.param); });

TEST(LoRANetwork, InitialWeightsEqualKohyasForTheSameSeed) {
  const nlohmann::json expected = read_json(kNetworks + "names.json").at("init_sd1");
  SdModels models = load_diffusers_folder(kSd + "sd1");
  LoRANetworkConfig config = parse_lora_network_args(4, 2.0, std::nullopt, {"conv_dim=2", "conv_alpha=0.5"});
  LoRANetwork network(config, models.text_encoder, models.unet, true, true, seeded(expected.at("seed").get<uint64_t>()));
  // Equal hashes of the fp32 bytes in safetensors layout: every initial weight is bit-identical to kohya's.
  SafetensorsHashes hashes = precalculate_safetensors_hashes(network->state_dict(), {});
  EXPECT_EQ(hashes.model_hash, expected.at("sshs_model_hash").get<std::string>());
  EXPECT_EQ(hashes.legacy_hash, expected.at("sshs_legacy_hash").get<std::string>());
}

class KohyaForward : public ::testing::TestWithParam<std::string> {};

// kohya applies LoRA by patching each layer's forward (org(x) + s * up(down(x))); we reparametrise the weights. The
// LoRA's own contribution (output with LoRA minus output without) is compared, so the base models' own conformance
// error (diffusers vs ours, ~1e-6) does not hide a LoRA error.
TEST_P(KohyaForward, UNetAndTextEncoderOutputsMatchKohyasLoRAForward) {
  const std::string variant = GetParam();
  auto ref = read_tensors(kNetworks + "reference_" + variant + ".safetensors");
  SdModels models = load_diffusers_folder(kSd + variant);
  Outputs base = run_models(models, ref);
  const double multiplier = variant == "sd1" ? 0.75 : 1.0;
  LoRANetwork network = network_from_file(kNetworks + "lora_" + variant + ".safetensors", models, multiplier);
  network->eval();
  {
    torch::NoGradGuard no_grad;
    network->update_weights();
  }
  Outputs with_lora = run_models(models, ref);
  expect_close(variant + " unet with LoRA", with_lora.unet, ref.at("unet_out_lora"), 2e-5);
  expect_close(variant + " text encoder with LoRA", with_lora.text, ref.at("text_out_lora"), 2e-5);
  if (ref.contains("unet_out_base")) {
    expect_close(variant + " unet LoRA delta", with_lora.unet - base.unet, ref.at("unet_out_lora") - ref.at("unet_out_base"), 2e-5);
    expect_close(variant + " text LoRA delta", with_lora.text - base.text, ref.at("text_out_lora") - ref.at("text_out_base"), 2e-5);
  }
  network->remove();
  Outputs removed = run_models(models, ref);
  EXPECT_TRUE(at::equal(removed.unet, base.unet));
  EXPECT_TRUE(at::equal(removed.text, base.text));
}

INSTANTIATE_TEST_SUITE_P(Sd, KohyaForward, ::testing::Values("sd1", "sd2"));

// One layer: the reparametrised model layer, kohya's forward (LoRAModule::forward) and the formula agree.
TEST(LoRAModule, MergedWeightForwardEqualsBasePlusScaledUpDown) {
  auto gen = seeded(3);
  for (bool conv : {false, true}) {
    std::shared_ptr<torch::nn::Module> target;
    at::Tensor x;
    if (conv) {
      target = torch::nn::Conv2d(torch::nn::Conv2dOptions(6, 5, 3).padding(1)).ptr();
      x = at::randn({2, 6, 7, 7}, gen);
    } else {
      target = torch::nn::Linear(6, 5).ptr();
      x = at::randn({2, 4, 6}, gen);
    }
    LoRAModule lora("lora_test", target, 3, 1.5, gen);
    lora->multiplier = 0.6;
    torch::NoGradGuard no_grad;
    lora->lora_up_weight().normal_(0, 0.5, gen);
    at::Tensor base, low_rank;
    if (conv) {
      auto c = std::dynamic_pointer_cast<torch::nn::Conv2dImpl>(target);
      base = c->forward(x);
      low_rank = lora->conv_up(lora->conv_down(x));
      c->weight = c->weight + lora->delta_weight();
      expect_close("conv merged weight", c->forward(x), base + 0.6 * 0.5 * low_rank, 1e-6);
    } else {
      auto l = std::dynamic_pointer_cast<torch::nn::LinearImpl>(target);
      base = l->forward(x);
      low_rank = lora->linear_up(lora->linear_down(x));
      l->weight = l->weight + lora->delta_weight();
      expect_close("linear merged weight", l->forward(x), base + 0.6 * 0.5 * low_rank, 1e-6);
    }
    expect_close(conv ? "conv LoRAModule::forward" : "linear LoRAModule::forward", lora->forward(x),
                 base + 0.6 * 0.5 * low_rank, 1e-6);
  }
}

TEST(LoRAModule, DropoutsActOnlyInTraining) {
  auto gen = seeded(4);
  auto target = torch::nn::Linear(8, 8).ptr();
  LoRAModule lora("lora_test", target, 4, 4.0, gen);
  torch::NoGradGuard no_grad;
  lora->lora_up_weight().normal_(0, 1, gen);
  at::Tensor x = at::randn({3, 5, 8}, gen);
  at::Tensor plain = lora->forward(x);
  lora->dropout = 0.5;
  lora->rank_dropout = 0.5;
  lora->module_dropout = 0.5;
  lora->eval();
  EXPECT_TRUE(at::equal(lora->forward(x, gen), plain)) << "eval mode ignores every dropout";
  lora->train();
  lora->dropout.reset();
  lora->module_dropout = 1.0;
  at::Tensor base = at::linear(x, lora->target_weight(), std::dynamic_pointer_cast<torch::nn::LinearImpl>(target)->bias);
  EXPECT_TRUE(at::equal(lora->forward(x, gen), base)) << "module_dropout 1 drops the whole LoRA";
  lora->module_dropout.reset();
  // rank_dropout: each sample keeps a subset of ranks, the survivors scaled by 1 / (1 - p).
  at::Tensor dropped = lora->forward(x, gen);
  at::Tensor h = lora->linear_down(x);
  bool some_differ = false;
  for (int64_t b = 0; b < 3; ++b) {
    // Some subset of the 4 ranks reproduces sample b exactly.
    bool found = false;
    for (int mask = 0; mask < 16 && !found; ++mask) {
      at::Tensor m = at::tensor({mask & 1, (mask >> 1) & 1, (mask >> 2) & 1, (mask >> 3) & 1}, at::kFloat);
      at::Tensor y = base[b] + lora->linear_up(h[b] * m) * 2.0;  // scale 1 / (1 - 0.5)
      found = at::allclose(dropped[b], y, 1e-5, 1e-5);
    }
    EXPECT_TRUE(found) << "sample " << b;
    some_differ |= !at::allclose(dropped[b], plain[b]);
  }
  EXPECT_TRUE(some_differ);
}

TEST(LoRANetwork, NeuronAndRankDropoutOnModelsAreRefusedWithAReason) {
  SdModels models = load_diffusers_folder(kSd + "sd1");
  for (const char* arg : {"rank_dropout=0.1", ""}) {
    LoRANetworkConfig config = parse_lora_network_args(4, 1.0, std::string(arg).empty() ? 0.1 : std::optional<double>(),
                                                       std::string(arg).empty() ? std::vector<std::string>{}
                                                                                : std::vector<std::string>{arg});
    try {
      LoRANetwork network(config, models.text_encoder, models.unet, true, true, seeded(0));
      ADD_FAILURE() << "expected an error for " << arg;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("merged weights"), std::string::npos) << e.what();
    }
  }
}

TEST(LoRANetwork, UnknownNetworkArgIsAnErrorWithASuggestion) {
  try {
    parse_lora_network_args(4, 1.0, std::nullopt, {"conv_dims=4"});
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("conv_dim"), std::string::npos) << e.what();
  }
}

// Gradients through the reparametrised weights equal those of kohya's explicit forward, also under gradient
// checkpointing (which recomputes blocks against their parameters(), where the LoRAs are registered).
TEST(LoRANetwork, GradientsEqualExplicitForwardAndSurviveGradientCheckpointing) {
  auto gen = seeded(5);
  auto target = torch::nn::Linear(6, 5).ptr();
  LoRAModule lora("lora_test", target, 2, 1.0, gen);
  {
    torch::NoGradGuard no_grad;
    lora->lora_up_weight().normal_(0, 1, gen);
  }
  at::Tensor x = at::randn({4, 6}, gen);
  lora->forward(x).pow(2).sum().backward();
  at::Tensor explicit_down = lora->lora_down_weight().grad().clone(), explicit_up = lora->lora_up_weight().grad().clone();
  lora->zero_grad();
  auto linear = std::dynamic_pointer_cast<torch::nn::LinearImpl>(target);
  linear->weight = lora->target_weight() + lora->delta_weight();
  linear->forward(x).pow(2).sum().backward();
  expect_close("d lora_down", lora->lora_down_weight().grad(), explicit_down, 1e-6);
  expect_close("d lora_up", lora->lora_up_weight().grad(), explicit_up, 1e-6);

  auto ref = read_tensors(kNetworks + "reference_sd1.safetensors");
  std::map<bool, std::vector<at::Tensor>> grads;
  for (bool checkpointing : {false, true}) {
    SdModels models = load_diffusers_folder(kSd + "sd1");
    for (auto& p : models.unet->parameters()) p.requires_grad_(false);
    LoRANetwork network = network_from_file(kNetworks + "lora_sd1.safetensors", models, 1.0);
    for (auto& p : network->parameters()) p.requires_grad_(true);
    models.unet->gradient_checkpointing = checkpointing;
    network->update_weights();
    models.unet->forward(ref.at("sample"), ref.at("timesteps"), ref.at("context")).pow(2).mean().backward();
    for (auto& lora_module : network->unet_loras) grads[checkpointing].push_back(lora_module->lora_down_weight().grad().clone());
  }
  ASSERT_EQ(grads[false].size(), grads[true].size());
  for (size_t i = 0; i < grads[false].size(); ++i) {
    ASSERT_TRUE(grads[true][i].defined());
    EXPECT_TRUE(at::allclose(grads[true][i], grads[false][i], 1e-5, 1e-7)) << "module " << i;
  }
  EXPECT_GT(grads[false][0].abs().sum().item<double>(), 0);
}

TEST(LoRANetwork, MaxNormRegularisationMatchesKohya) {
  const nlohmann::json expected = read_json(kNetworks + "names.json").at("max_norm");
  SdModels models = load_diffusers_folder(kSd + "sd1");
  LoRANetwork network = network_from_file(kNetworks + "lora_sd1.safetensors", models, 1.0);
  MaxNormResult result = network->apply_max_norm_regularization(expected.at("max_norm").get<double>());
  EXPECT_EQ(result.keys_scaled, expected.at("keys_scaled").get<int64_t>());
  EXPECT_NEAR(result.mean_norm, expected.at("mean_norm").get<double>(), 1e-6 * expected.at("mean_norm").get<double>());
  EXPECT_NEAR(result.max_norm, expected.at("max_key_norm").get<double>(), 1e-6 * expected.at("max_key_norm").get<double>());
  size_t checked = 0;
  for (const auto& [key, tensor] : network->state_dict()) {
    const double want = expected.at("weight_norms").at(key).get<double>();
    EXPECT_NEAR(tensor.to(at::kDouble).norm().item<double>(), want, 1e-5 * std::max(want, 1e-3)) << key;
    ++checked;
  }
  EXPECT_EQ(checked, expected.at("weight_norms").size());
}

}  // namespace
}  // namespace sdt
