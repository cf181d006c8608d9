// LoRA-GGPO (kohya's lora_flux network args ggpo_sigma, ggpo_beta) against kohya's own LoRAModule
// (tests/fixtures/flux/gen_ggpo_fixtures.py): one training step's norms exactly as kohya computes them, then the
// distribution of the perturbed output over many draws (the perturbation draws from the default generator, which is not
// replayed across languages).
#include <gtest/gtest.h>

#include "tests/networks/lora_fixtures.h"

namespace sdt {
namespace {

using namespace lora_test;
using testing_support::expect_close;

struct GgpoLayer {
  Linear linear{nullptr};
  LoRAModule lora{nullptr};
};

// The fixture's Linear with its LoRA applied, GGPO on with the fixture's sigma and beta, in training mode.
GgpoLayer fixture_layer(const std::map<std::string, at::Tensor>& f, const safetensors::Metadata& m) {
  GgpoLayer layer;
  const at::Tensor weight = f.at("weight");
  layer.linear = Linear(weight.size(1), weight.size(0));
  torch::NoGradGuard no_grad;
  layer.linear->weight.copy_(weight);
  layer.linear->bias.copy_(f.at("bias"));
  layer.lora = LoRAModule("lora_unet_test", layer.linear.ptr(), std::stoll(m.at("dim")), std::stod(m.at("alpha")), seeded(0));
  layer.lora->lora_down_weight().copy_(f.at("lora_down"));
  layer.lora->lora_up_weight().copy_(f.at("lora_up"));
  layer.lora->multiplier = std::stod(m.at("multiplier"));
  layer.lora->ggpo = LoRAModuleImpl::Ggpo{.sigma = std::stod(m.at("sigma")), .beta = std::stod(m.at("beta"))};
  layer.lora->apply_to_target();
  layer.lora->train();
  return layer;
}

TEST(LoRAGgpo, NormsOfAnUpdateAndThePerturbedOutputAreKohyas) {
  const std::string path = SDT_FIXTURES "/flux/ggpo.safetensors";
  const auto f = read_tensors(path);
  const safetensors::File file(path);
  GgpoLayer layer = fixture_layer(f, file.metadata());

  // Before the first update there are no norms: the output is the plain LoRA's.
  const at::Tensor y = layer.linear->forward(f.at("x"));
  expect_close("output before the first update", y, f.at("plain"), 1e-6);
  EXPECT_FALSE(layer.lora->ggpo_perturbation_std().defined());
  (f.at("target") * y).sum().backward();
  expect_close("grad of lora_down", layer.lora->lora_down_weight().grad(), f.at("grad_down"), 1e-6);
  expect_close("grad of lora_up", layer.lora->lora_up_weight().grad(), f.at("grad_up"), 1e-6);

  layer.lora->update_ggpo_norms();
  const LoRAModuleImpl::Ggpo& ggpo = *layer.lora->ggpo;
  // fp32 sums of a few products: 1e-6 of their scale.
  expect_close("the base weight's mean row norm", ggpo.org_weight_norm.reshape({1}), f.at("org_weight_norm_estimate"), 1e-6);
  expect_close("weight_norms", ggpo.weight_norms, f.at("weight_norms"), 1e-6);
  expect_close("combined_weight_norms", ggpo.combined_weight_norms, f.at("combined_weight_norms"), 1e-6);
  // The gradient's norms come out of the device's default autocast (bf16 here), as in kohya: the same bf16 ops give the
  // same values; one bf16 rounding apart would be 2^-8 = 3.9e-3 of the value, which the tolerance stays below.
  EXPECT_EQ(ggpo.grad_norms.scalar_type(), at::kBFloat16);
  expect_close("grad_norms", ggpo.grad_norms.to(at::kFloat), f.at("grad_norms"), 1e-3);
  expect_close("the perturbation's standard deviation per row", layer.lora->ggpo_perturbation_std().to(at::kFloat),
               f.at("scale_factor"), 1e-3);

  torch::NoGradGuard no_grad;
  layer.lora->eval();  // evaluation: no perturbation
  expect_close("output in evaluation mode", layer.linear->forward(f.at("x")), f.at("plain"), 1e-6);
  layer.lora->train();
  const int64_t draws = std::stoll(file.metadata().at("draws"));
  torch::manual_seed(12345);
  std::vector<at::Tensor> outputs;
  for (int64_t i = 0; i < draws; ++i) outputs.push_back(layer.linear->forward(f.at("x")).to(at::kDouble));
  expect_draws_match("[ggpo] perturbed output", at::stack(outputs), f.at("draws_mean"), f.at("draws_var"));
}

}  // namespace
}  // namespace sdt
