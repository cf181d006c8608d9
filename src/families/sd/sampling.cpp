// The three schedulers, the guided denoising loop, lpw's weighted prompt embeddings and one whole sample image.
// Scheduler arithmetic runs on 0-dim float32 tensors in the reference's order, so each step rounds as diffusers'
// does.
#include "src/families/sd/sampling.h"

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include <ATen/CPUGeneratorImpl.h>
#include <spdlog/spdlog.h>

#include "src/core/error.h"

namespace sdt {
namespace {

constexpr int64_t kTrainTimesteps = 1000;
constexpr double kBetaStart = 0.00085;
constexpr double kBetaEnd = 0.012;

at::Tensor scalar(float value) { return at::scalar_tensor(value, at::kFloat); }

// DDIMScheduler with eta 0: x_prev = sqrt(a_prev) * x0 + sqrt(1 - a_prev) * eps, x0 clamped to [-1, 1].
class DdimScheduler : public Scheduler {
 public:
  DdimScheduler(int64_t steps, Prediction prediction)
      : prediction_(prediction), alphas_cumprod_(sd_alphas_cumprod()), step_ratio_(kTrainTimesteps / steps) {
    // "leading" spacing with steps_offset 0: (steps - 1) * ratio, ..., ratio, 0.
    timesteps_ = at::arange(steps - 1, -1, -1, at::kLong) * step_ratio_;
  }

  at::Tensor init_noise_sigma() const override { return scalar(1.0f); }
  at::Tensor scale_model_input(const at::Tensor& latents, int64_t) const override { return latents; }

  at::Tensor step(const at::Tensor& model_output, int64_t step, const at::Tensor& latents,
                  at::Generator&) const override {
    const int64_t t = timesteps_[step].item<int64_t>();
    const int64_t prev_t = t - step_ratio_;
    const at::Tensor alpha_prod = alphas_cumprod_[t];
    // set_alpha_to_one: the step past timestep 0 lands on a clean image.
    const at::Tensor alpha_prod_prev = prev_t >= 0 ? alphas_cumprod_[prev_t] : scalar(1.0f);
    const at::Tensor beta_prod = 1 - alpha_prod;
    at::Tensor x0, eps;  // (B, C, h, w)
    if (prediction_ == Prediction::epsilon) {
      x0 = (latents - beta_prod.pow(0.5) * model_output) / alpha_prod.pow(0.5);
      eps = model_output;
    } else {
      x0 = alpha_prod.pow(0.5) * latents - beta_prod.pow(0.5) * model_output;
      eps = alpha_prod.pow(0.5) * model_output + beta_prod.pow(0.5) * latents;
    }
    x0 = x0.clamp(-1.0, 1.0);
    return alpha_prod_prev.pow(0.5) * x0 + (1 - alpha_prod_prev).pow(0.5) * eps;
  }

 private:
  Prediction prediction_;
  at::Tensor alphas_cumprod_;  // (1000)
  int64_t step_ratio_;
};

// EulerDiscreteScheduler (ancestral = false) and EulerAncestralDiscreteScheduler: the ODE in sigma = sqrt((1 - a) / a),
// x0 predicted from the model, one Euler step from sigma to the next sigma (ancestral: to sigma_down, plus noise of
// sigma_up, where sigma_down^2 + sigma_up^2 = sigma_next^2).
class EulerScheduler : public Scheduler {
 public:
  EulerScheduler(int64_t steps, Prediction prediction, bool ancestral) : prediction_(prediction), ancestral_(ancestral) {
    // "linspace" spacing: numpy's linspace(0, 999, steps) in float64, stored as float32, descending.
    std::vector<float> timesteps(steps);
    const double stride = steps > 1 ? static_cast<double>(kTrainTimesteps - 1) / static_cast<double>(steps - 1) : 0.0;
    for (int64_t i = 0; i < steps; ++i) timesteps[steps - 1 - i] = static_cast<float>(static_cast<double>(i) * stride);
    if (steps > 1) timesteps[0] = static_cast<float>(kTrainTimesteps - 1);

    // The training sigmas in float32, interpolated linearly at the fractional timesteps in float64 (np.interp),
    // stored as float32, then a final 0.
    const at::Tensor alphas_cumprod = sd_alphas_cumprod();
    const at::Tensor train_sigmas = ((1 - alphas_cumprod) / alphas_cumprod).pow(0.5).contiguous();  // (1000)
    const float* s = train_sigmas.data_ptr<float>();
    std::vector<float> sigmas(steps + 1, 0.0f);
    for (int64_t i = 0; i < steps; ++i) {
      const double t = timesteps[i];
      const auto j = static_cast<int64_t>(std::floor(t));
      double sigma = s[kTrainTimesteps - 1];
      if (j < kTrainTimesteps - 1) {
        sigma = t == static_cast<double>(j) ? s[j] : (static_cast<double>(s[j + 1]) - s[j]) * (t - static_cast<double>(j)) + s[j];
      }
      sigmas[i] = static_cast<float>(sigma);
    }
    timesteps_ = at::tensor(timesteps, at::kFloat);
    sigmas_ = at::tensor(sigmas, at::kFloat);
  }

  // "linspace" spacing starts at sigma_max itself (not sqrt(sigma_max^2 + 1)).
  at::Tensor init_noise_sigma() const override { return sigmas_.max(); }

  at::Tensor scale_model_input(const at::Tensor& latents, int64_t step) const override {
    const at::Tensor sigma = sigmas_[step];
    return latents / (sigma.pow(2) + 1).pow(0.5);
  }

  at::Tensor step(const at::Tensor& model_output, int64_t step, const at::Tensor& latents,
                  at::Generator& generator) const override {
    const at::Tensor sigma = sigmas_[step];
    const at::Tensor sigma_next = sigmas_[step + 1];
    const at::Tensor x0 = prediction_ == Prediction::epsilon
                              ? latents - sigma * model_output
                              : model_output * (-sigma / (sigma.pow(2) + 1).pow(0.5)) + latents / (sigma.pow(2) + 1);
    const at::Tensor derivative = (latents - x0) / sigma;
    if (!ancestral_) return latents + derivative * (sigma_next - sigma);

    const at::Tensor sigma_up = (sigma_next.pow(2) * (sigma.pow(2) - sigma_next.pow(2)) / sigma.pow(2)).pow(0.5);
    const at::Tensor sigma_down = (sigma_next.pow(2) - sigma_up.pow(2)).pow(0.5);
    const at::Tensor moved = latents + derivative * (sigma_down - sigma);
    // Drawn at every step, the last included (where sigma_up is 0), as the reference does: later draws line up.
    const at::Tensor noise = randn_from_host(model_output.sizes(), generator, model_output.options());
    return moved + noise * sigma_up;
  }

 private:
  Prediction prediction_;
  bool ancestral_;
  at::Tensor sigmas_;  // (steps + 1) float32, the last 0
};

// (windows, 77) int64 ids and (1, 77 * windows, 1) float32 weights of a prompt's windows.
std::pair<at::Tensor, at::Tensor> window_tensors(const WeightedTokenChunks& tokens) {
  std::vector<int64_t> ids;
  std::vector<float> weights;
  for (size_t k = 0; k < tokens.ids.size(); ++k) {
    ids.insert(ids.end(), tokens.ids[k].begin(), tokens.ids[k].end());
    weights.insert(weights.end(), tokens.weights[k].begin(), tokens.weights[k].end());
  }
  const auto windows = static_cast<int64_t>(tokens.ids.size());
  return {at::tensor(ids, at::kLong).reshape({windows, -1}), at::tensor(weights, at::kFloat).reshape({1, -1, 1})};
}

}  // namespace

SamplerKind sampler_from_name(const std::string& name) {
  if (name == "ddim") return SamplerKind::ddim;
  if (name == "euler" || name == "k_euler") return SamplerKind::euler;
  if (name == "euler_a" || name == "k_euler_a") return SamplerKind::euler_a;
  fail("sampler", "unknown sampler '{}': expected ddim, euler (k_euler) or euler_a (k_euler_a)", name);
}

at::Tensor sd_alphas_cumprod() {
  const at::Tensor betas = at::linspace(std::sqrt(kBetaStart), std::sqrt(kBetaEnd), kTrainTimesteps, at::kFloat).pow(2);
  return at::cumprod(1 - betas, 0);
}

std::unique_ptr<Scheduler> make_scheduler(SamplerKind kind, int64_t steps, Prediction prediction) {
  if (steps < 1 || steps > kTrainTimesteps) {
    fail("sampler", "steps must be between 1 and {}, got {}", kTrainTimesteps, steps);
  }
  switch (kind) {
    case SamplerKind::ddim:
      return std::make_unique<DdimScheduler>(steps, prediction);
    case SamplerKind::euler:
      return std::make_unique<EulerScheduler>(steps, prediction, false);
    case SamplerKind::euler_a:
      return std::make_unique<EulerScheduler>(steps, prediction, true);
  }
  fail("sampler", "unknown sampler kind");
}

at::Tensor denoise(UNet2DConditionModel& unet, const Scheduler& scheduler, const at::Tensor& noise,
                   const UNetConditioning& cond, const UNetConditioning& uncond, double guidance_scale,
                   at::Generator& generator, const StepCallback& on_step) {
  torch::NoGradGuard no_grad;
  const bool guided = uncond.context.defined();
  const auto batch = [&](const at::Tensor& u, const at::Tensor& c) { return guided && c.defined() ? at::cat({u, c}) : c; };
  const at::Tensor context = batch(uncond.context, cond.context);  // (2B or B, S, D)
  const at::Tensor vector = batch(uncond.vector, cond.vector);     // (2B or B, V), or undefined
  at::Tensor latents = noise * scheduler.init_noise_sigma();       // (B, C, h, w)
  for (int64_t i = 0; i < scheduler.steps(); ++i) {
    const at::Tensor input = scheduler.scale_model_input(guided ? at::cat({latents, latents}) : latents, i);
    at::Tensor prediction = unet->forward(input, scheduler.timesteps()[i], context, vector);
    if (guided) {
      const std::vector<at::Tensor> halves = prediction.chunk(2);  // uncond, cond
      prediction = halves[0] + guidance_scale * (halves[1] - halves[0]);
    }
    latents = scheduler.step(prediction, i, latents, generator);
    if (on_step) on_step(i, latents);
  }
  return latents;
}

std::pair<int64_t, int64_t> sample_width_height(const SampleOptions& options) {
  return {std::max(64, options.width - options.width % 8), std::max(64, options.height - options.height % 8)};
}

uint64_t sample_seed(const SampleOptions& options, int64_t width, int64_t height) {
  const uint64_t seed = options.seed ? *options.seed : std::random_device{}();
  spdlog::info("sampling {}x{}, {} {} steps, guidance {}, seed {}", width, height, sd_sample_steps(options), options.sampler,
               sd_sample_scale(options), seed);
  return seed;
}

at::Tensor image_to_rgb8(const at::Tensor& images) {
  const at::Tensor pixels = (images[0] / 2 + 0.5).clamp(0, 1).permute({1, 2, 0});
  return (pixels * 255).round().to(at::kCPU, at::kByte).contiguous();  // (H, W, 3), on the host
}

at::Tensor weighted_prompt_embeddings(ClipTextModel& text_encoder, const WeightedTokenChunks& tokens,
                                      std::optional<int64_t> clip_skip) {
  torch::NoGradGuard no_grad;
  const auto [ids, weights] = window_tensors(tokens);
  at::Tensor hidden = text_encoder->encode(ids.to(module_device(*text_encoder)), clip_skip);  // (n, 77, D), each window alone
  hidden = hidden.reshape({1, -1, hidden.size(-1)});         // (1, 77n, D)
  const at::Tensor previous_mean = hidden.mean({-2, -1});    // (1)
  hidden = hidden * weights.to(hidden.device(), hidden.scalar_type());
  const at::Tensor current_mean = hidden.mean({-2, -1});
  return hidden * (previous_mean / current_mean).reshape({-1, 1, 1});
}

at::Tensor sample_image(SdModels& models, const ClipTokenizer& tokenizer, const SampleOptions& options,
                        Prediction prediction, std::optional<int64_t> clip_skip) {
  torch::NoGradGuard no_grad;
  const auto [width, height] = sample_width_height(options);
  const bool guided = sd_sample_scale(options) > 1.0;
  const SamplingTokens tokens = tokenize_for_sampling(
      tokenizer, options.prompt, guided ? std::optional<std::string_view>(options.negative_prompt) : std::nullopt);
  const at::Tensor context = weighted_prompt_embeddings(models.text_encoder, tokens.prompt, clip_skip);  // (1, 77n, D)
  const at::Tensor uncond_context =
      guided ? weighted_prompt_embeddings(models.text_encoder, *tokens.negative, clip_skip) : at::Tensor();

  const std::unique_ptr<Scheduler> scheduler = make_scheduler(sampler_from_name(options.sampler), sd_sample_steps(options), prediction);
  at::Generator generator = at::make_generator<at::CPUGeneratorImpl>(sample_seed(options, width, height));
  const int64_t factor = models.vae->downscale_factor();
  const at::Tensor noise = randn_from_host({1, models.vae->config.latent_channels, height / factor, width / factor},
                                           generator, context.options());
  const at::Tensor latents = denoise(models.unet, *scheduler, noise, {context, {}}, {uncond_context, {}}, sd_sample_scale(options), generator,
                                     [&](int64_t step, const at::Tensor&) {
                                       spdlog::debug("step {}/{}", step + 1, scheduler->steps());
                                     });
  return image_to_rgb8(latents_to_images(models.vae, latents));
}

}  // namespace sdt
