// The DDPM training math against kohya-ss/sd-scripts' own functions (tests/fixtures/train/diffusion_fixtures.safetensors,
// made by gen_diffusion_fixtures.py): each noise case seeds our at::Generator as the generator seeded torch and
// replays its recorded Python-`random` draws, so every tensor is compared with kohya's, fp32, 1e-6 of its scale.
#include <gtest/gtest.h>

#include <iostream>
#include <map>
#include <string>
#include <vector>

#include <ATen/CPUGeneratorImpl.h>
#include <nlohmann/json.hpp>

#include "src/core/error.h"
#include "src/core/tensor_io.h"
#include "src/core/train_args.h"
#include "src/objectives/ddpm.h"

namespace sdt {
namespace {

using nlohmann::json;

constexpr double kRelTol = 1e-6;

// Fixture tensors and case descriptions, loaded once.
struct Fixtures {
  std::map<std::string, at::Tensor> tensors;
  json cases;

  const at::Tensor& operator[](const std::string& name) const {
    auto it = tensors.find(name);
    if (it == tensors.end()) fail("diffusion fixtures", "no tensor '{}'", name);
    return it->second;
  }
};

const Fixtures& fixtures() {
  static const Fixtures loaded = [] {
    Fixtures f;
    safetensors::File file(SDT_FIXTURES "/train/diffusion_fixtures.safetensors");
    for (const auto& info : file.tensors()) f.tensors[info.name] = load_tensor(file, info.name).clone();
    f.cases = json::parse(file.metadata().at("cases"));
    return f;
  }();
  return loaded;
}

const DdpmSchedule& schedule(bool zero_terminal_snr) {
  static const DdpmSchedule plain = make_ddpm_schedule(false), zero_terminal = make_ddpm_schedule(true);
  return zero_terminal_snr ? zero_terminal : plain;
}

// Passes when max |actual - expected| <= rel_tol * max |expected| (an elementwise ratio is meaningless where the
// reference is near zero). Prints both errors so they can be quoted.
void expect_close(const std::string& what, const at::Tensor& actual, const at::Tensor& expected, double rel_tol = kRelTol) {
  ASSERT_EQ(actual.sizes(), expected.sizes()) << what;
  ASSERT_EQ(actual.scalar_type(), expected.scalar_type()) << what;
  const at::Tensor a = actual.to(at::kDouble), e = expected.to(at::kDouble);
  const double max_abs = (a - e).abs().max().item<double>();
  const double scale = e.abs().max().item<double>();
  std::cout << "[diffusion] " << what << ": max abs err " << max_abs << ", max rel err " << max_abs / scale << "\n";
  EXPECT_GT(scale, 0.0) << what << ": an all-zero reference proves nothing";
  EXPECT_LE(max_abs, rel_tol * scale) << what;
}

at::Generator seeded_generator(uint64_t seed) { return at::make_generator<at::CPUGeneratorImpl>(seed); }

// Replays recorded U[0,1) draws, failing on a draw kohya did not make.
struct ReplayedUniform {
  std::vector<double> draws;
  size_t used = 0;
  double operator()() {
    if (used == draws.size()) fail("pyramid noise", "drew more than the {} values kohya drew", draws.size());
    return draws[used++];
  }
};

NoiseOptions noise_options(const json& c) {
  NoiseOptions o;
  o.noise_offset = c.value("noise_offset", 0.0);
  o.noise_offset_random_strength = c.value("noise_offset_random_strength", false);
  if (c.contains("adaptive_noise_scale")) o.adaptive_noise_scale = c["adaptive_noise_scale"].get<double>();
  o.multires_noise_iterations = c.value("multires_noise_iterations", int64_t{0});
  o.multires_noise_discount = c.value("multires_noise_discount", 0.3);
  o.ip_noise_gamma = c.value("ip_noise_gamma", 0.0);
  o.ip_noise_gamma_random_strength = c.value("ip_noise_gamma_random_strength", false);
  if (c.contains("min_timestep")) o.min_timestep = c["min_timestep"].get<int64_t>();
  if (c.contains("max_timestep")) o.max_timestep = c["max_timestep"].get<int64_t>();
  return o;
}

LossOptions loss_options(const json& c) {
  LossOptions o;
  o.v_parameterization = c.value("v_parameterization", false);
  o.loss_type = parse_loss_type(c.value("loss_type", std::string("l2")));
  o.huber_schedule = parse_huber_schedule(c.value("huber_schedule", std::string("snr")));
  o.huber_c = c.value("huber_c", 0.1);
  o.huber_scale = c.value("huber_scale", 1.0);
  o.min_snr_gamma = c.value("min_snr_gamma", 0.0);
  o.scale_v_pred_loss_like_noise_pred = c.value("scale_v_pred_loss_like_noise_pred", false);
  o.v_pred_like_loss = c.value("v_pred_like_loss", 0.0);
  o.debiased_estimation_loss = c.value("debiased_estimation_loss", false);
  return o;
}

TEST(DdpmSchedule, BetasAlphasCumprodAndSnrMatchDiffusersAsKohyaPreparesIt) {
  const Fixtures& f = fixtures();
  // The zero-terminal-SNR betas are 1 - a_t / a_(t-1) with a_t = (k (s_t - s_T))^2, s = sqrt(alphas_cumprod): near the
  // end s_t - s_T cancels, so a rounding of s_t (2^-24 relative; the reference's linspace and ours round differently)
  // moves a_t by up to 2 s_t / (s_t - s_T) times that. A few roundings of the largest such factor bound the betas.
  const at::Tensor s = schedule(false).alphas_cumprod.to(at::kDouble).sqrt();
  const int64_t last = s.size(0) - 1;
  const double amplification = (2 * s.slice(0, 0, last - 1) / (s.slice(0, 0, last - 1) - s[last])).max().item<double>();
  const double zt_betas_tolerance = 4 * amplification / (1 << 24);
  std::cout << "[diffusion] zero-terminal-SNR betas: cancellation amplifies a rounding by up to " << amplification
            << "; tolerance " << zt_betas_tolerance << "\n";
  for (bool zt : {false, true}) {
    const std::string prefix = zt ? "schedule_zt/" : "schedule/";
    expect_close(prefix + "betas", schedule(zt).betas, f[prefix + "betas"], zt ? zt_betas_tolerance : kRelTol);
    expect_close(prefix + "alphas_cumprod", schedule(zt).alphas_cumprod, f[prefix + "alphas_cumprod"]);
    expect_close(prefix + "all_snr", schedule(zt).all_snr, f[prefix + "all_snr"]);
  }
  // The fix reaches zero SNR at the last step; all_snr stays the original schedule's (kohya computes it first).
  EXPECT_EQ(schedule(true).alphas_cumprod[-1].item<float>(), 0.0f);
  EXPECT_TRUE(at::equal(schedule(true).all_snr, schedule(false).all_snr));
  EXPECT_EQ(schedule(false).num_train_timesteps(), 1000);
}

TEST(DdpmNoise, SeededGeneratorDrawsWhatTorchManualSeedDraws) {
  const Fixtures& f = fixtures();
  const at::Generator gen = seeded_generator(1234);
  // torch's normal kernel is vectorised on AVX2/AVX-512 and scalar otherwise (ATEN_CPU_CAPABILITY=default); the two
  // Box-Muller paths round log, sqrt and cos differently, by at most 2 ulp of draws below 8 in size: 2 x 2^-20 < 2e-6.
  // A wrong seed or stream differs by O(1).
  EXPECT_TRUE(at::allclose(at::randn({2, 4, 8, 8}, gen, at::kFloat), f["stream/randn"], 0.0, 2e-6));
  EXPECT_TRUE(at::equal(at::rand({1}, gen, at::kFloat), f["stream/rand"]));
  EXPECT_TRUE(at::equal(at::randint(0, 1000, {5}, gen, at::kLong), f["stream/randint"]));
}

TEST(DdpmNoise, NoisedLatentsAndTargetsMatchKohyaInEveryNoiseVariant) {
  const Fixtures& f = fixtures();
  for (const json& c : f.cases["noise"]) {
    const std::string name = c["name"], p = "noise/" + name + "/";
    SCOPED_TRACE(name);
    const DdpmSchedule& s = schedule(c["zero_terminal_snr"].get<bool>());
    const at::Tensor& latents = f[p + "latents"];
    const at::Tensor recorded = f[p + "pyramid_uniform"].contiguous();
    ReplayedUniform uniform{std::vector<double>(recorded.data_ptr<double>(), recorded.data_ptr<double>() + recorded.numel())};

    const NoisedLatents noised =
        noise_latents(s, latents, noise_options(c), seeded_generator(c["seed"].get<uint64_t>()), std::ref(uniform));
    EXPECT_EQ(uniform.used, uniform.draws.size()) << "pyramid draws";
    EXPECT_TRUE(at::equal(noised.timesteps, f[p + "timesteps"])) << noised.timesteps << f[p + "timesteps"];
    expect_close(p + "noise", noised.noise, f[p + "noise"]);
    expect_close(p + "noisy_latents", noised.noisy_latents, f[p + "noisy_latents"]);
    expect_close(p + "velocity", training_target(s, latents, noised, true), f[p + "velocity"]);
    EXPECT_TRUE(training_target(s, latents, noised, false).is_same(noised.noise));
  }
}

TEST(DdpmNoise, SameSeedDrawsTheSameNoiseRunToRun) {
  NoiseOptions o;
  o.noise_offset = 0.1;
  o.noise_offset_random_strength = true;
  o.adaptive_noise_scale = 0.05;
  o.multires_noise_iterations = 6;
  o.ip_noise_gamma = 0.1;
  o.ip_noise_gamma_random_strength = true;
  const at::Tensor latents = at::randn({2, 4, 16, 16}, seeded_generator(1), at::kFloat);
  const auto run = [&](uint64_t seed) {
    const at::Generator pyramid_gen = seeded_generator(seed + 1);
    const UniformDraw uniform = [pyramid_gen] { return at::rand({1}, pyramid_gen, at::kDouble).item<double>(); };
    return noise_latents(schedule(false), latents, o, seeded_generator(seed), uniform);
  };
  const NoisedLatents first = run(42), again = run(42), other = run(43);
  EXPECT_TRUE(at::equal(first.noise, again.noise));
  EXPECT_TRUE(at::equal(first.noisy_latents, again.noisy_latents));
  EXPECT_TRUE(at::equal(first.timesteps, again.timesteps));
  EXPECT_FALSE(at::equal(first.noise, other.noise));
}

TEST(DdpmLoss, SnrWeightsMatchKohyaPostProcessLoss) {
  const Fixtures& f = fixtures();
  for (const json& c : f.cases["weights"]) {
    const std::string name = c["name"];
    const at::Tensor weighted = post_process_loss(f["weights/loss"], f["weights/timesteps"], schedule(false), loss_options(c));
    expect_close("weights/" + name, weighted, f["weights/" + name]);
  }
}

TEST(DdpmLoss, HuberThresholdsMatchKohyaInEverySchedule) {
  const Fixtures& f = fixtures();
  for (const json& c : f.cases["huber"]) {
    const std::string name = c["name"];
    LossOptions o = loss_options(c);
    o.loss_type = LossType::Huber;
    const std::optional<at::Tensor> c_t = huber_threshold(schedule(c["zero_terminal_snr"].get<bool>()), o, f["weights/timesteps"]);
    ASSERT_TRUE(c_t.has_value()) << name;
    expect_close("huber/" + name, *c_t, f["huber/" + name]);
  }
  LossOptions l2;
  EXPECT_FALSE(huber_threshold(schedule(false), l2, f["weights/timesteps"]).has_value());
}

TEST(DdpmLoss, ElementwiseLossesMatchKohyaConditionalLoss) {
  const Fixtures& f = fixtures();
  for (const json& c : f.cases["loss"]) {
    const std::string name = c["name"];
    const LossOptions o = loss_options(c);
    const std::optional<at::Tensor> huber_c = huber_threshold(schedule(false), o, f["loss/timesteps"]);
    expect_close("loss/" + name, elementwise_loss(f["loss/pred"], f["loss/target"], o.loss_type, huber_c), f["loss/" + name]);
  }
}

TEST(DdpmLoss, MaskedLossMatchesKohyaForAlphaMasksAndConditioningImages) {
  const Fixtures& f = fixtures();
  const at::Tensor& loss = f["mask/loss"];
  for (const std::string name : {"alpha_32x32", "alpha_20x28"})
    expect_close("mask/" + name, apply_masked_loss(loss, f["mask/" + name + "/alpha_masks"]), f["mask/" + name + "/masked"]);
  const at::Tensor mask = mask_from_conditioning_images(f["mask/conditioning_24x24/conditioning_images"]);
  expect_close("mask/conditioning_24x24", apply_masked_loss(loss, mask), f["mask/conditioning_24x24/masked"]);
}

TEST(DdpmLoss, BatchLossMatchesKohyaProcessBatch) {
  const Fixtures& f = fixtures();
  for (const json& c : f.cases["batch"]) {
    const std::string name = c["name"];
    const std::optional<at::Tensor> mask =
        c["masked"].get<bool>() ? std::optional<at::Tensor>(f["mask/alpha_32x32/alpha_masks"]) : std::nullopt;
    const at::Tensor loss = ddpm_batch_loss(schedule(false), loss_options(c), f["loss/pred"], f["loss/target"],
                                            f["loss/timesteps"], f["batch/loss_weights"], mask);
    EXPECT_EQ(loss.dim(), 0) << name;
    expect_close("batch/" + name, loss, f["batch/" + name]);
  }
}

TEST(DdpmLoss, RejectsMissingHuberThresholdAndMismatchedMasks) {
  const at::Tensor pred = at::zeros({2, 4, 8, 8}), target = at::ones({2, 4, 8, 8});
  EXPECT_THROW(elementwise_loss(pred, target, LossType::Huber, std::nullopt), Error);
  EXPECT_THROW(apply_masked_loss(pred, at::ones({3, 64, 64})), Error);
  EXPECT_THROW(apply_masked_loss(pred, at::ones({2, 3, 64, 64})), Error);
  EXPECT_THROW(parse_loss_type("l3"), Error);
  EXPECT_THROW(parse_huber_schedule("cosine"), Error);
}

TEST(DdpmOptions, FromArgsMapsKohyaNamesAndRejectsKohyasInvalidCombinations) {
  TrainArgs args;
  args.noise_offset = 0.1;
  args.adaptive_noise_scale = 0.02;
  args.multires_noise_iterations = 6;
  args.ip_noise_gamma = 0.05;
  args.min_timestep = 100;
  args.v_parameterization = true;
  args.zero_terminal_snr = true;
  args.loss_type = "smooth_l1";
  args.huber_schedule = "exponential";
  args.min_snr_gamma = 5.0;
  args.scale_v_pred_loss_like_noise_pred = true;
  const DdpmOptions o = ddpm_options_from_args(args);
  EXPECT_TRUE(o.zero_terminal_snr);
  EXPECT_EQ(o.noise.noise_offset, 0.1);
  EXPECT_EQ(o.noise.adaptive_noise_scale, 0.02);
  EXPECT_EQ(o.noise.multires_noise_iterations, 6);
  EXPECT_EQ(o.noise.multires_noise_discount, 0.3);
  EXPECT_EQ(o.noise.ip_noise_gamma, 0.05);
  EXPECT_EQ(o.noise.min_timestep, 100);
  EXPECT_FALSE(o.noise.max_timestep.has_value());
  EXPECT_TRUE(o.loss.v_parameterization);
  EXPECT_EQ(o.loss.loss_type, LossType::SmoothL1);
  EXPECT_EQ(o.loss.huber_schedule, HuberSchedule::Exponential);
  EXPECT_EQ(o.loss.min_snr_gamma, 5.0);
  EXPECT_TRUE(o.loss.scale_v_pred_loss_like_noise_pred);

  const auto rejects = [](auto change) {
    TrainArgs bad;
    change(bad);
    EXPECT_THROW(ddpm_options_from_args(bad), Error);
  };
  rejects([](TrainArgs& a) { a.adaptive_noise_scale = 0.1; });
  rejects([](TrainArgs& a) { a.scale_v_pred_loss_like_noise_pred = true; });
  rejects([](TrainArgs& a) { a.v_parameterization = true, a.v_pred_like_loss = 0.1; });
  rejects([](TrainArgs& a) { a.max_timestep = 1001; });
  rejects([](TrainArgs& a) { a.min_timestep = -1; });
  rejects([](TrainArgs& a) { a.min_timestep = 1000; });
  rejects([](TrainArgs& a) { a.loss_type = "huber", a.huber_schedule = "exponential", a.huber_c = 0.0; });
}

}  // namespace
}  // namespace sdt
