// LoRA modules and networks against kohya's networks/lora.py run on the same tiny diffusers models: which modules,
// their names, dims and alphas, the initial weights for a seed, the optimizer groups, the forward (kohya's patched
// forward vs our adapters), gradients and max-norm regularisation. The dropouts: test_lora_dropout.cpp.
#include <gtest/gtest.h>

#include <ATen/Version.h>

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
  LoRANetwork network(config, sd_network_targets(models.text_encoder, models.unet, config.adapts_conv_blocks()), true, true, seeded(0));

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
  std::vector<LoraParamGroup> groups = network->prepare_optimizer_params({5e-5}, 1e-4, 1e-3);
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
  // torch's uniform kernel rounds otherwise when it is not vectorised (ATEN_CPU_CAPABILITY=default, CPUs without AVX2),
  // in kohya as here: the fixture holds kohya's hashes for both kernels, and the one in use here is compared.
  const bool scalar_kernels = at::get_cpu_capability() == "DEFAULT";
  const nlohmann::json expected = read_json(kNetworks + "names.json").at(scalar_kernels ? "init_sd1_scalar_kernels" : "init_sd1");
  SdModels models = load_diffusers_folder(kSd + "sd1");
  LoRANetworkConfig config = parse_lora_network_args(4, 2.0, std::nullopt, {"conv_dim=2", "conv_alpha=0.5"});
  LoRANetwork network(config, sd_network_targets(models.text_encoder, models.unet, config.adapts_conv_blocks()), true, true,
                      seeded(expected.at("seed").get<uint64_t>()));
  // Equal hashes of the fp32 bytes in safetensors layout: every initial weight is bit-identical to kohya's.
  SafetensorsHashes hashes = precalculate_safetensors_hashes(network->state_dict(), {});
  EXPECT_EQ(hashes.model_hash, expected.at("sshs_model_hash").get<std::string>());
  EXPECT_EQ(hashes.legacy_hash, expected.at("sshs_legacy_hash").get<std::string>());
}

class KohyaForward : public ::testing::TestWithParam<std::string> {};

// kohya applies LoRA by patching each layer's forward (org(x) + s * up(down(x))); ours is an adapter on the layer.
// The LoRA's own contribution (output with LoRA minus output without) is compared, so the base models' own conformance
// error (diffusers vs ours, ~1e-6) does not hide a LoRA error.
TEST_P(KohyaForward, UNetAndTextEncoderOutputsMatchKohyasLoRAForward) {
  const std::string variant = GetParam();
  auto ref = read_tensors(kNetworks + "reference_" + variant + ".safetensors");
  SdModels models = load_diffusers_folder(kSd + variant);
  Outputs base = run_models(models, ref);
  const double multiplier = variant == "sd1" ? 0.75 : 1.0;
  LoRANetwork network = network_from_file(kNetworks + "lora_" + variant + ".safetensors", models, multiplier);
  network->eval();
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

// One layer: the adapted layer, the formula and the merged weight (export's form) agree; removing the LoRA restores
// the layer bit for bit.
TEST(LoRAModule, AdaptedForwardEqualsBasePlusScaledUpDownAndTheMergedWeight) {
  auto gen = seeded(3);
  for (bool conv : {false, true}) {
    std::shared_ptr<torch::nn::Module> target;
    at::Tensor x;
    if (conv) {
      target = Conv2d(torch::nn::Conv2dOptions(6, 5, 3).padding(1)).ptr();
      x = at::randn({2, 6, 7, 7}, gen);
    } else {
      target = Linear(6, 5).ptr();
      x = at::randn({2, 4, 6}, gen);
    }
    auto run = [&](const at::Tensor& input) {
      return conv ? std::dynamic_pointer_cast<Conv2dImpl>(target)->forward(input) : std::dynamic_pointer_cast<LinearImpl>(target)->forward(input);
    };
    LoRAModule lora("lora_test", target, 3, 1.5, gen);
    lora->multiplier = 0.6;
    torch::NoGradGuard no_grad;
    lora->lora_up_weight().normal_(0, 0.5, gen);
    const at::Tensor base = run(x);
    const at::Tensor low_rank = conv ? lora->conv_up(lora->conv_down(x)) : lora->linear_up(lora->linear_down(x));
    lora->apply_to_target();
    const at::Tensor adapted = run(x);
    expect_close(conv ? "conv adapted" : "linear adapted", adapted, base + 0.6 * 0.5 * low_rank, 1e-6);
    at::Tensor& weight = conv ? std::dynamic_pointer_cast<Conv2dImpl>(target)->weight : std::dynamic_pointer_cast<LinearImpl>(target)->weight;
    const at::Tensor original = weight;
    lora->remove_from_target();
    EXPECT_TRUE(at::equal(run(x), base)) << "removed";
    weight = original + lora->delta_weight();
    expect_close(conv ? "conv merged weight" : "linear merged weight", run(x), adapted, 1e-6);
    weight = original;
  }
}

TEST(LoRAModule, ALayerTakesOneAdapter) {
  auto gen = seeded(4);
  auto target = Linear(4, 4).ptr();
  LoRAModule a("lora_a", target, 2, 1.0, gen), b("lora_b", target, 2, 1.0, gen);
  a->apply_to_target();
  EXPECT_THROW(b->apply_to_target(), Error);
  EXPECT_THROW(LoRAModule("lora_plain", torch::nn::Linear(4, 4).ptr(), 2, 1.0, gen)->apply_to_target(), Error)
      << "a torch Linear has no adapter hook";
}

TEST(LoRANetwork, UnknownNetworkArgIsAnErrorWithASuggestion) {
  try {
    parse_lora_network_args(4, 1.0, std::nullopt, {"conv_dims=4"});
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("conv_dim"), std::string::npos) << e.what();
  }
}

// Gradients through the adapter equal those of the merged weight W + s * up @ down, and survive gradient
// checkpointing (which recomputes blocks against their parameters(), where the LoRAs are registered).
TEST(LoRANetwork, GradientsEqualTheMergedWeightsAndSurviveGradientCheckpointing) {
  auto gen = seeded(5);
  auto linear = Linear(6, 5);
  LoRAModule lora("lora_test", linear.ptr(), 2, 1.0, gen);
  {
    torch::NoGradGuard no_grad;
    lora->lora_up_weight().normal_(0, 1, gen);
  }
  at::Tensor x = at::randn({4, 6}, gen);
  lora->apply_to_target();
  linear->forward(x).pow(2).sum().backward();
  at::Tensor adapter_down = lora->lora_down_weight().grad().clone(), adapter_up = lora->lora_up_weight().grad().clone();
  lora->remove_from_target();
  lora->zero_grad();
  at::linear(x, linear->weight + lora->delta_weight(), linear->bias).pow(2).sum().backward();
  expect_close("d lora_down", adapter_down, lora->lora_down_weight().grad(), 1e-6);
  expect_close("d lora_up", adapter_up, lora->lora_up_weight().grad(), 1e-6);

  auto ref = read_tensors(kNetworks + "reference_sd1.safetensors");
  std::map<bool, std::vector<at::Tensor>> grads;
  for (bool checkpointing : {false, true}) {
    SdModels models = load_diffusers_folder(kSd + "sd1");
    for (auto& p : models.unet->parameters()) p.requires_grad_(false);
    LoRANetwork network = network_from_file(kNetworks + "lora_sd1.safetensors", models, 1.0);
    for (auto& p : network->parameters()) p.requires_grad_(true);
    models.unet->gradient_checkpointing = checkpointing;
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
