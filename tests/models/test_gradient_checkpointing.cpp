// Gradient checkpointing recomputes each U-Net ResNet and Transformer2D in backward; the gradients must be the ones
// a plain backward gives, for the inputs and for every parameter. They agree to float rounding, not bit for bit:
// a tensor read by several blocks (a skip connection, the time embedding, the text states) receives its gradient
// contributions in a different order when blocks are recomputed, and float addition is not associative.
#include <gtest/gtest.h>

#include <iostream>

#include "src/models/sd_checkpoint.h"

namespace sdt {
namespace {

constexpr double kRounding = 1e-5;  // measured: about 1e-6 of each gradient's largest element

struct Gradients {
  at::Tensor sample, context;
  std::map<std::string, at::Tensor> params;
};

Gradients backward_once(UNet2DConditionModel& unet, bool checkpointing) {
  unet->gradient_checkpointing = checkpointing;
  unet->zero_grad();
  at::manual_seed(3);
  at::Tensor sample = at::randn({2, 4, 8, 8}).requires_grad_();
  at::Tensor context = at::randn({2, 7, 32}).requires_grad_();
  at::Tensor weights = at::randn({2, 4, 8, 8});
  at::Tensor out = unet->forward(sample, at::tensor({5, 700}), context);
  (out * weights).sum().backward();
  Gradients g{sample.grad(), context.grad(), {}};
  for (const auto& item : unet->named_parameters()) g.params[item.key()] = item.value().grad().clone();
  return g;
}

// max |a - b| / max |b|
double relative_difference(const at::Tensor& a, const at::Tensor& b) {
  return (a - b).abs().max().item<double>() / b.abs().max().item<double>();
}

TEST(GradientCheckpointing, GradientsOfInputsAndEveryParameterAreTheSame) {
  for (const std::string variant : {"sd1", "sd2"}) {
    UNet2DConditionModel unet = load_diffusers_folder(SDT_FIXTURES "/sd/" + variant).unet;
    const Gradients plain = backward_once(unet, false);
    const Gradients recomputed = backward_once(unet, true);
    ASSERT_EQ(plain.params.size(), recomputed.params.size());
    double worst = std::max(relative_difference(recomputed.sample, plain.sample),
                            relative_difference(recomputed.context, plain.context));
    for (const auto& [name, grad] : plain.params) {
      ASSERT_GT(grad.abs().max().item<double>(), 0.0) << variant << " " << name << " got no gradient";
      const double d = relative_difference(recomputed.params.at(name), grad);
      EXPECT_LE(d, kRounding) << variant << " " << name;
      worst = std::max(worst, d);
    }
    EXPECT_LE(relative_difference(recomputed.sample, plain.sample), kRounding) << variant;
    EXPECT_LE(relative_difference(recomputed.context, plain.context), kRounding) << variant;
    std::cout << "[checkpointing] " << variant << ": " << plain.params.size() << " parameter gradients and 2 input "
              << "gradients, largest relative difference " << worst << "\n";
  }
}

TEST(GradientCheckpointing, AlsoWorksWithAutogradGrad) {
  UNet2DConditionModel unet = load_diffusers_folder(SDT_FIXTURES "/sd/sd1").unet;
  at::Tensor sample = at::randn({1, 4, 8, 8}).requires_grad_();
  at::Tensor context = at::randn({1, 7, 32});
  const at::Tensor& weight = unet->down_blocks[0]->as<UNetLevel>()->resnets[0]->as<ResnetBlock2D>()->conv1->weight;
  auto grads_of = [&](bool checkpointing) {
    unet->gradient_checkpointing = checkpointing;
    return torch::autograd::grad({unet->forward(sample, at::tensor({5}), context).sum()}, {sample, weight});
  };
  const auto recomputed = grads_of(true), plain = grads_of(false);
  EXPECT_LE(relative_difference(recomputed[0], plain[0]), kRounding);
  EXPECT_LE(relative_difference(recomputed[1], plain[1]), kRounding);
}

TEST(GradientCheckpointing, DoesNothingWithoutGradMode) {
  UNet2DConditionModel unet = load_diffusers_folder(SDT_FIXTURES "/sd/sd2").unet;
  unet->gradient_checkpointing = true;
  torch::NoGradGuard no_grad;
  at::Tensor sample = at::randn({1, 4, 8, 8}), context = at::randn({1, 7, 32});
  at::Tensor with = unet->forward(sample, at::tensor({5}), context);
  unet->gradient_checkpointing = false;
  EXPECT_TRUE(at::equal(with, unet->forward(sample, at::tensor({5}), context)));
}

}  // namespace
}  // namespace sdt
