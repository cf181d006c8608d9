// Flow matching against kohya's own functions (tests/fixtures/objectives/gen_flow_matching_fixtures.py): every
// timestep sampling, weighting scheme, prediction type and the input perturbation, with l2, huber and smooth_l1
// losses. Each sample draws from a generator seeded as kohya's torch.manual_seed, in kohya's order.
#include <gtest/gtest.h>

#include <ATen/CPUGeneratorImpl.h>
#include <nlohmann/json.hpp>

#include "src/core/error.h"
#include "src/core/tensor_io.h"
#include "src/core/train_args.h"
#include "src/objectives/flow_matching.h"
#include "tests/models/compare.h"

namespace sdt {
namespace {

using testing_support::expect_close;

struct Fixture {
  std::map<std::string, at::Tensor> tensors;
  nlohmann::json cases;
  std::vector<uint64_t> seeds;
  const at::Tensor& at(const std::string& name) const { return tensors.at(name); }
};

const Fixture& fixture() {
  static const Fixture f = [] {
    Fixture out;
    safetensors::File file(SDT_FIXTURES "/objectives/flow_matching.safetensors");
    for (const auto& info : file.tensors()) out.tensors[info.name] = load_tensor(file, info.name).clone();
    out.cases = nlohmann::json::parse(file.metadata().at("cases"));
    out.seeds = nlohmann::json::parse(file.metadata().at("seeds")).get<std::vector<uint64_t>>();
    return out;
  }();
  return f;
}

// The case's kohya arguments, read as `sdt train` reads them.
FlowMatchingOptions options_of(const nlohmann::json& c) {
  TrainArgs args;
  args.timestep_sampling = c.at("timestep_sampling");
  args.sigmoid_scale = c.at("sigmoid_scale");
  args.discrete_flow_shift = c.at("discrete_flow_shift");
  args.weighting_scheme = c.at("weighting_scheme");
  args.logit_mean = c.at("logit_mean");
  args.logit_std = c.at("logit_std");
  args.mode_scale = c.at("mode_scale");
  args.model_prediction_type = c.at("model_prediction_type");
  if (!c.at("ip_noise_gamma").is_null()) args.ip_noise_gamma = c.at("ip_noise_gamma").get<double>();
  args.ip_noise_gamma_random_strength = c.at("ip_noise_gamma_random_strength");
  args.loss_type = c.at("loss_type");
  args.huber_schedule = c.at("huber_schedule");
  args.huber_c = c.at("huber_c");
  args.huber_scale = c.at("huber_scale");
  return flow_matching_options_from_args(args);
}

class KohyaFlowMatching : public ::testing::TestWithParam<std::string> {};

// The same fp32 operations in kohya's order, element by element; only the transcendental functions (exp, sigmoid,
// cos, pow) may round differently in another build or CPU, by an ulp (6e-8) each, a few of them in a chain: 1e-6
// relative. The loss is a mean of 2,304 such elements: the same bound.
TEST_P(KohyaFlowMatching, NoiseTimestepsTargetAndLossMatchKohya) {
  const Fixture& f = fixture();
  nlohmann::json c;
  for (const auto& entry : f.cases) {
    if (entry.at("name") == GetParam()) c = entry;
  }
  const FlowMatchingObjective objective(options_of(c));
  const SampleRandoms randoms = [&](int64_t i) {
    return SampleRandom{at::make_generator<at::CPUGeneratorImpl>(f.seeds.at(static_cast<size_t>(i))), [] { return 0.0; }};
  };
  const NoisedBatch noised = objective.noise(f.at("latents"), randoms);
  const std::string name = GetParam();
  expect_close(name + " sigmas", noised.sigmas, f.at(name + ".sigmas"), 1e-6);
  expect_close(name + " timesteps", noised.timesteps, f.at(name + ".timesteps"), 1e-6);
  expect_close(name + " noisy input", noised.model_input, f.at(name + ".noisy"), 1e-6);
  expect_close(name + " target", noised.target, f.at(name + ".target"), 1e-6);
  const at::Tensor loss = objective.loss(f.at("prediction"), noised, f.at("loss_weights"), std::nullopt);
  expect_close(name + " loss", loss.reshape({1}), f.at(name + ".loss"), 1e-6);
}

INSTANTIATE_TEST_SUITE_P(Cases, KohyaFlowMatching,
                         ::testing::Values("sigma_uniform", "sigma_logit_normal", "sigma_mode", "uniform_raw", "sigmoid_additive",
                                           "shift_cosmap", "flux_shift_sigma_sqrt", "ip_noise_huber", "ip_noise_random_smooth_l1"));

TEST(FlowMatching, ValidationPointsAreFixedSigmasAndTheirTimesteps) {
  const FlowMatchingObjective objective({});
  const at::Tensor latents = at::randn({2, 4, 8, 8});
  const SampleRandoms randoms = [](int64_t i) { return SampleRandom{at::make_generator<at::CPUGeneratorImpl>(i), [] { return 0.0; }}; };
  ASSERT_EQ(objective.validation_points(), 4);
  for (int k = 0; k < 4; ++k) {
    const NoisedBatch b = objective.noise_at_validation_point(latents, k, randoms);
    EXPECT_TRUE(at::allclose(b.sigmas, at::full({2}, (k + 1) / 5.0, at::kFloat)));
    EXPECT_TRUE(at::allclose(b.timesteps, at::full({2}, 200.0 * (k + 1), at::kFloat)));
  }
}

TEST(FlowMatching, TheSnrHuberScheduleAndUnknownWeightingsAreRefused) {
  FlowMatchingOptions o;
  o.loss_type = LossType::Huber;
  o.huber_schedule = HuberSchedule::Snr;
  EXPECT_THROW(FlowMatchingObjective{o}, Error);
  FlowMatchingOptions w;
  w.weighting_scheme = "logit";
  EXPECT_THROW(FlowMatchingObjective{w}, Error);
}

}  // namespace
}  // namespace sdt
