// The samplers against diffusers' DDIMScheduler, EulerDiscreteScheduler and EulerAncestralDiscreteScheduler as kohya
// builds them, run step by step on the tiny SD1 model (tests/fixtures/sd/sampling, made by gen_sampling_fixtures.py):
// schedules, initial noise from the seed, the latents after every step (Euler ancestral's noise drawn from the same
// seeded generator as the reference's), and lpw's weighted prompt embeddings. fp32, 1e-4 of each output's scale.
#include <gtest/gtest.h>

#include <cmath>
#include <map>

#include <ATen/CPUGeneratorImpl.h>

#include "src/core/error.h"
#include "src/core/tensor_io.h"
#include "src/families/sd/sampling.h"
#include "tests/models/compare.h"

namespace sdt {
namespace {

using testing_support::expect_close;

const std::string kFixtures = SDT_FIXTURES "/sd/";

struct Reference {
  SdModels models;
  std::map<std::string, at::Tensor> tensors;
  const at::Tensor& at(const std::string& name) const { return tensors.at(name); }
};

const Reference& reference() {
  static const Reference r = [] {
    Reference loaded;
    loaded.models = load_diffusers_folder(kFixtures + "sd1", at::kFloat);
    safetensors::File file(kFixtures + "sampling/reference.safetensors");
    for (const auto& info : file.tensors()) loaded.tensors[info.name] = load_tensor(file, info.name).clone();
    return loaded;
  }();
  return r;
}

struct SamplerCase {
  std::string sampler;  // the fixture's name, also kohya's
  Prediction prediction;
  std::string prediction_name;
};

// How ctest lists the cases.
void PrintTo(const SamplerCase& c, std::ostream* os) { *os << c.sampler << " " << c.prediction_name; }

class SamplerConformance : public ::testing::TestWithParam<SamplerCase> {};

TEST_P(SamplerConformance, EveryStepMatchesDiffusers) {
  const SamplerCase& c = GetParam();
  const Reference& r = reference();
  const std::string key = c.sampler + "." + c.prediction_name + ".";
  const std::unique_ptr<Scheduler> scheduler = make_scheduler(sampler_from_name(c.sampler), 6, c.prediction);
  EXPECT_TRUE(at::equal(scheduler->timesteps(), r.at(key + "timesteps")))
      << scheduler->timesteps() << " vs " << r.at(key + "timesteps");

  // The same seed gives the reference's initial latents: bit for bit with the vectorised (AVX2/AVX-512) normal kernel
  // the reference was made with; the scalar one (ATEN_CPU_CAPABILITY=default) rounds its Box-Muller differently, by at
  // most 2 ulp of draws below 8 in size (2e-6), scaled by init_noise_sigma.
  at::Generator generator = at::make_generator<at::CPUGeneratorImpl>(42);
  const at::Tensor noise = at::randn({1, 4, 8, 6}, generator);
  const double sigma = scheduler->init_noise_sigma().item<double>();
  EXPECT_TRUE(at::allclose(noise * scheduler->init_noise_sigma(), r.at(key + "initial"), 0.0, 2e-6 * sigma));

  UNet2DConditionModel unet = r.models.unet;
  // diffusers' U-Net and ours differ by fp32 rounding (about 1e-6 relative, some 16 ulp, per evaluation); how much a
  // trajectory amplifies such differences depends on the sampler and the step (DDIM with guidance 7.5 at the noisy
  // end: by orders of magnitude). It is measured here: the same sampling from noise changed by one ulp (relative
  // 2^-23). Each step may then differ from diffusers by 1e-4 (a well-conditioned step) plus 16 times that divergence.
  std::vector<at::Tensor> one_ulp_trajectory;
  {
    at::Generator same = at::make_generator<at::CPUGeneratorImpl>(42);
    (void)at::randn({1, 4, 8, 6}, same);
    denoise(unet, *scheduler, noise * (1.0 + 1.0 / (1 << 23)), {r.at("cond"), {}}, {r.at("uncond"), {}}, 7.5, same,
            [&](int64_t, const at::Tensor& latents) { one_ulp_trajectory.push_back(latents.clone()); });
  }
  int64_t steps_seen = 0;
  const at::Tensor final_latents = denoise(unet, *scheduler, noise, {r.at("cond"), {}}, {r.at("uncond"), {}}, 7.5, generator,
                                           [&](int64_t step, const at::Tensor& latents) {
                                             const std::string name = key + "step" + std::to_string(step);
                                             const at::Tensor& expected = r.at(name);
                                             const double divergence =
                                                 ((one_ulp_trajectory.at(step) - latents).abs().max() / expected.abs().max())
                                                     .item<double>();
                                             expect_close(name, latents, expected, 1e-4 + 16 * divergence);
                                             ++steps_seen;
                                           });
  EXPECT_EQ(steps_seen, 6);
  EXPECT_EQ(final_latents.sizes(), at::IntArrayRef({1, 4, 8, 6}));
}

INSTANTIATE_TEST_SUITE_P(
    KohyaSamplers, SamplerConformance,
    ::testing::Values(SamplerCase{"ddim", Prediction::epsilon, "epsilon"}, SamplerCase{"ddim", Prediction::v, "v_prediction"},
                      SamplerCase{"euler", Prediction::epsilon, "epsilon"}, SamplerCase{"euler", Prediction::v, "v_prediction"},
                      SamplerCase{"euler_a", Prediction::epsilon, "epsilon"},
                      SamplerCase{"euler_a", Prediction::v, "v_prediction"}),
    [](const ::testing::TestParamInfo<SamplerCase>& info) { return info.param.sampler + "_" + info.param.prediction_name; });

TEST(SamplerSchedules, TimestepsAndSigmasMatchDiffusersForStepCountsThatRoundDifferently) {
  const Reference& r = reference();
  const at::Tensor ones = at::ones({1});
  for (int64_t steps : {1, 7, 30, 50, 1000}) {
    const std::string n = std::to_string(steps);
    EXPECT_TRUE(at::equal(make_scheduler(SamplerKind::ddim, steps, Prediction::epsilon)->timesteps(),
                          r.at("schedule.ddim.timesteps." + n)))
        << "ddim, " << n << " steps";
    const at::Tensor sigmas = r.at("schedule.euler.sigmas." + n);  // (steps + 1)
    // Sigmas are fp32 results of a few roundings each (sqrt((1 - a) / a), interpolation), computed by other kernels
    // than the reference's: 8 ulp relative. Neighbouring steps' sigmas differ by far more, so the index is pinned.
    const double tolerance = 8.0 / (1 << 23);
    for (SamplerKind kind : {SamplerKind::euler, SamplerKind::euler_a}) {
      const std::unique_ptr<Scheduler> euler = make_scheduler(kind, steps, Prediction::epsilon);
      EXPECT_TRUE(at::equal(euler->timesteps(), r.at("schedule.euler.timesteps." + n))) << "euler, " << n << " steps";
      EXPECT_NEAR(euler->init_noise_sigma().item<double>() / sigmas.max().item<double>(), 1.0, tolerance) << "euler, " << n << " steps";
      // Each step's input scale 1 / sqrt(sigma^2 + 1) pins that step's sigma.
      for (int64_t i = 0; i < steps; ++i) {
        const double expected = 1.0 / std::sqrt(sigmas[i].item<double>() * sigmas[i].item<double>() + 1.0);
        ASSERT_NEAR(euler->scale_model_input(ones, i).item<double>() / expected, 1.0, tolerance) << "euler, " << n << " steps, step " << i;
      }
    }
  }
}

TEST(SamplerSchedules, StepCountsOutsideTheTrainingScheduleAreErrors) {
  EXPECT_THROW(make_scheduler(SamplerKind::ddim, 0, Prediction::epsilon), Error);
  EXPECT_THROW(make_scheduler(SamplerKind::euler, 1001, Prediction::epsilon), Error);
}

TEST(SamplerNames, KohyaNamesMapAndOthersAreErrorsListingTheChoices) {
  EXPECT_EQ(sampler_from_name("k_euler"), SamplerKind::euler);
  EXPECT_EQ(sampler_from_name("k_euler_a"), SamplerKind::euler_a);
  try {
    sampler_from_name("dpmsolver++");
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("unknown sampler 'dpmsolver++': expected ddim"), std::string::npos) << e.what();
  }
}

TEST(PromptEmbeddings, LpwWeightingAndRescalingMatchTheReference) {
  const Reference& r = reference();
  WeightedTokenChunks chunks;
  const at::Tensor ids = r.at("lpw.ids").to(at::kInt).contiguous(), weights = r.at("lpw.weights").contiguous();  // (2, 77)
  for (int64_t k = 0; k < ids.size(0); ++k) {
    chunks.ids.emplace_back(ids[k].data_ptr<int32_t>(), ids[k].data_ptr<int32_t>() + ids.size(1));
    chunks.weights.emplace_back(weights[k].data_ptr<float>(), weights[k].data_ptr<float>() + weights.size(1));
  }
  ClipTextModel text_encoder = r.models.text_encoder;
  expect_close("lpw.embeddings", weighted_prompt_embeddings(text_encoder, chunks, std::nullopt), r.at("lpw.embeddings"));
  expect_close("lpw.embeddings_clip_skip2", weighted_prompt_embeddings(text_encoder, chunks, 2),
               r.at("lpw.embeddings_clip_skip2"));
}

}  // namespace
}  // namespace sdt
