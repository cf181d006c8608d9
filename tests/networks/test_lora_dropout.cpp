// kohya's LoRA dropouts (network_dropout, rank_dropout, module_dropout) against kohya's own LoRAModule
// (tests/fixtures/networks/gen_dropout_fixtures.py). Dropout draws from the default generator, which is not replayed
// across languages, so the distribution of the LoRA's contribution over many draws is compared: the per-element mean
// and variance, the variance of its sum over a sample's tokens / pixels (one rank mask per sample, or one per
// element), and how often the whole module is skipped. With dropout off the contribution itself is compared.
#include <gtest/gtest.h>

#include <ATen/CPUGeneratorImpl.h>
#include <nlohmann/json.hpp>

#include "tests/networks/lora_fixtures.h"

namespace sdt {
namespace {

using namespace lora_test;
using testing_support::expect_close;

struct Layer {
  std::shared_ptr<torch::nn::Module> module;
  LoRAModule lora{nullptr};
  at::Tensor x, base;
  std::function<at::Tensor(const at::Tensor&)> run;
};

// The fixture's layer with its LoRA applied: the same weights, input and multiplier kohya ran.
Layer fixture_layer(const std::map<std::string, at::Tensor>& f, const std::string& name, double multiplier) {
  Layer layer;
  const at::Tensor weight = f.at(name + ".weight"), down = f.at(name + ".lora_down");
  if (name == "conv") {
    auto conv = Conv2d(torch::nn::Conv2dOptions(weight.size(1), weight.size(0), weight.size(2)).padding(1));
    layer.module = conv.ptr();
    layer.run = [conv](const at::Tensor& x) mutable { return conv->forward(x); };
  } else {
    auto linear = Linear(weight.size(1), weight.size(0));
    layer.module = linear.ptr();
    layer.run = [linear](const at::Tensor& x) mutable { return linear->forward(x); };
  }
  torch::NoGradGuard no_grad;
  layer.module->named_parameters()["weight"].copy_(weight);
  layer.module->named_parameters()["bias"].copy_(f.at(name + ".bias"));
  layer.x = f.at(name + ".x");
  layer.base = layer.run(layer.x);
  layer.lora = LoRAModule("lora_" + name, layer.module, down.size(0), f.at(name + ".alpha").item<double>(), seeded(0));
  layer.lora->lora_down_weight().copy_(down);
  layer.lora->lora_up_weight().copy_(f.at(name + ".lora_up"));
  layer.lora->multiplier = multiplier;
  layer.lora->apply_to_target();
  return layer;
}

class KohyaDropout : public ::testing::TestWithParam<std::tuple<std::string, std::string>> {};

TEST_P(KohyaDropout, DistributionOfTheLoRAsContributionMatchesKohyas) {
  const auto& [name, setting] = GetParam();
  const std::string path = kNetworks + "dropout_stats.safetensors";
  const auto f = read_tensors(path);
  const safetensors::File file(path);
  const int64_t draws = std::stoll(file.metadata().at("draws"));
  const nlohmann::json probabilities = nlohmann::json::parse(file.metadata().at("settings")).at(setting);
  Layer layer = fixture_layer(f, name, std::stod(file.metadata().at("multiplier")));
  torch::NoGradGuard no_grad;

  layer.lora->eval();
  expect_close(name + " dropout off", layer.run(layer.x) - layer.base, f.at(name + ".plain_delta"), 1e-6);

  auto probability = [&](const char* key) -> std::optional<double> {
    return probabilities.contains(key) ? std::optional<double>(probabilities.at(key).get<double>()) : std::nullopt;
  };
  layer.lora->dropout = probability("dropout");
  layer.lora->rank_dropout = probability("rank_dropout");
  layer.lora->module_dropout = probability("module_dropout");
  layer.lora->train();
  torch::manual_seed(12345);
  std::vector<at::Tensor> deltas;
  for (int64_t i = 0; i < draws; ++i) deltas.push_back((layer.run(layer.x) - layer.base).to(at::kDouble));
  const at::Tensor d = at::stack(deltas);  // (draws, ...)
  const std::vector<int64_t> positions = name == "linear" ? std::vector<int64_t>{2} : std::vector<int64_t>{3, 4};
  const at::Tensor pooled = d.sum(positions);
  const double n = static_cast<double>(draws);

  // A wrong rule (no rescaling, a mask per element instead of per sample, another p) moves these statistics by tens of
  // standard errors.
  auto expect_within_standard_errors = [&](const std::string& what, const at::Tensor& samples, const at::Tensor& expected_mean,
                                           const at::Tensor& expected_var) {
    expect_draws_match("[dropout] " + name + " " + setting + " " + what, samples, expected_mean, expected_var);
  };
  const std::string stats = name + "." + setting;
  std::vector<int64_t> fixture_positions;
  for (int64_t p : positions) fixture_positions.push_back(p - 1);
  expect_within_standard_errors("per element", d, f.at(stats + ".mean"), f.at(stats + ".var"));
  expect_within_standard_errors("summed over positions", pooled, f.at(stats + ".mean").sum(fixture_positions),
                                f.at(stats + ".pooled_var"));

  // Draws where the whole module was skipped: a binomial count, standard error sqrt(p (1 - p) / draws) on each side.
  // (Without module_dropout a contribution is all zero only when rank_dropout happens to drop every rank of every
  // sample, 0.4^9 for the conv case: nothing to compare.)
  if (!probability("module_dropout")) return;
  const double dropped = (d.flatten(1).abs().amax(1) == 0).to(at::kDouble).mean().item<double>();
  const double kohya_dropped = f.at(stats + ".dropped").item<double>();
  const double p = *probability("module_dropout");
  std::cout << "[dropout] " << name << " " << setting << ": module skipped in " << dropped << " of the draws (kohya "
            << kohya_dropped << ")\n";
  EXPECT_NEAR(dropped, kohya_dropped, 5.0 * std::sqrt(2.0 * p * (1.0 - p) / n) + 1e-12);
}

INSTANTIATE_TEST_SUITE_P(Layers, KohyaDropout,
                         ::testing::Combine(::testing::Values("linear", "conv"),
                                            ::testing::Values("network_dropout", "rank_dropout", "module_dropout", "all")),
                         [](const auto& info) { return std::get<0>(info.param) + "_" + std::get<1>(info.param); });

// Gradient checkpointing evaluates a block twice; the recomputation replays the forward's generator state, so the
// dropout masks, and so the gradients, are those of the run without checkpointing, and the generator stands where it
// would after the step.
TEST(LoRADropout, CheckpointedBlocksRecomputeWithTheForwardsMasks) {
  auto ref = read_tensors(kNetworks + "reference_sd1.safetensors");
  std::map<bool, std::vector<at::Tensor>> grads;
  std::map<bool, at::Tensor> after;
  for (bool checkpointing : {false, true}) {
    SdModels models = load_diffusers_folder(kSd + "sd1");
    for (auto& p : models.unet->parameters()) p.requires_grad_(false);
    LoRANetwork network = network_from_file(kNetworks + "lora_sd1.safetensors", models, 1.0);
    for (auto& lora : network->unet_loras) {
      lora->dropout = 0.2;
      lora->rank_dropout = 0.3;
      lora->module_dropout = 0.2;
    }
    for (auto& p : network->parameters()) p.requires_grad_(true);
    network->train();
    models.unet->gradient_checkpointing = checkpointing;
    torch::manual_seed(77);
    models.unet->forward(ref.at("sample"), ref.at("timesteps"), ref.at("context")).pow(2).mean().backward();
    for (auto& lora : network->unet_loras) {
      const at::Tensor g = lora->lora_down_weight().grad();
      grads[checkpointing].push_back(g.defined() ? g.clone() : at::zeros_like(lora->lora_down_weight()));
    }
    after[checkpointing] = at::rand({4});
  }
  ASSERT_EQ(grads[false].size(), grads[true].size());
  int64_t skipped = 0;
  for (size_t i = 0; i < grads[false].size(); ++i) {
    // Recomputation repeats the same fp32 operations: only the order of the gradient sums may differ.
    EXPECT_TRUE(at::allclose(grads[true][i], grads[false][i], 1e-5, 1e-7)) << "module " << i;
    skipped += grads[false][i].abs().sum().item<double>() == 0 ? 1 : 0;
  }
  EXPECT_GT(skipped, 0) << "module_dropout 0.2 skipped no module: the test would not see a wrong replay";
  EXPECT_LT(skipped, static_cast<int64_t>(grads[false].size()));
  EXPECT_TRUE(at::equal(after[true], after[false])) << "the recomputation left the generator elsewhere";
}

TEST(LoRADropout, EvaluationModeDropsNothing) {
  const auto f = read_tensors(kNetworks + "dropout_stats.safetensors");
  Layer layer = fixture_layer(f, "linear", 0.8);
  layer.lora->dropout = 0.5;
  layer.lora->rank_dropout = 0.5;
  layer.lora->module_dropout = 0.5;
  layer.lora->eval();
  torch::NoGradGuard no_grad;
  const at::Tensor first = layer.run(layer.x);
  for (int i = 0; i < 5; ++i) EXPECT_TRUE(at::equal(layer.run(layer.x), first));
  layer.lora->module_dropout = 1.0;
  layer.lora->train();
  EXPECT_TRUE(at::equal(layer.run(layer.x), layer.base)) << "module_dropout 1 skips the LoRA in training";
}

}  // namespace
}  // namespace sdt
