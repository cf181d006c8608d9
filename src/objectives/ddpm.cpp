#include "src/objectives/ddpm.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include <spdlog/spdlog.h>

#include "src/core/error.h"
#include "src/core/train_args.h"

namespace sdt {

namespace {

// Per-sample values of a (T,) schedule tensor at `timesteps`, shaped (B, 1, ..., 1) to broadcast over `like`, in its
// dtype and on its device (diffusers casts ᾱ to the sample's dtype before indexing).
at::Tensor per_sample(const at::Tensor& schedule_values, const at::Tensor& timesteps, const at::Tensor& like) {
  at::Tensor values = schedule_values.to(like.device(), like.scalar_type()).index_select(0, timesteps.to(like.device()));
  std::vector<int64_t> shape(static_cast<size_t>(like.dim()), 1);
  shape[0] = -1;
  return values.view(shape);
}

// all_snr at `timesteps`, (B,) fp32 on the CPU (kohya stacks all_snr[t] per sample).
at::Tensor snr_at(const DdpmSchedule& schedule, const at::Tensor& timesteps) {
  return schedule.all_snr.index_select(0, timesteps.cpu());
}

// min(snr, 1000), kohya's guard against an infinite SNR at t = 0, for every weight but min-SNR. SD's SNR at t = 0 is
// about 1175, so the cap changes the weight there.
at::Tensor capped_snr_at(const DdpmSchedule& schedule, const at::Tensor& timesteps) {
  at::Tensor snr = snr_at(schedule, timesteps);
  return at::minimum(snr, at::ones_like(snr) * 1000);
}

}  // namespace

// ---------------------------------------------------------------- noise schedule

at::Tensor zero_terminal_snr_betas(const at::Tensor& betas) {
  at::Tensor alphas_bar_sqrt = at::sqrt(at::cumprod(1 - betas, 0));  // (T,)
  const at::Tensor first = alphas_bar_sqrt[0].clone(), last = alphas_bar_sqrt[-1].clone();
  // Shift so the last value is zero, then scale so the first keeps its value.
  alphas_bar_sqrt -= last;
  alphas_bar_sqrt *= first / (first - last);
  const at::Tensor alphas_bar = at::square(alphas_bar_sqrt);
  const int64_t steps = alphas_bar.size(0);
  const at::Tensor alphas = at::cat({alphas_bar.slice(0, 0, 1), alphas_bar.slice(0, 1) / alphas_bar.slice(0, 0, steps - 1)});
  return 1 - alphas;
}

DdpmSchedule make_ddpm_schedule(bool zero_terminal_snr, int64_t num_train_timesteps, double beta_start, double beta_end) {
  if (num_train_timesteps < 2) fail("noise schedule", "needs at least 2 timesteps, got {}", num_train_timesteps);
  DdpmSchedule schedule;
  // "scaled_linear": linear in √β, in fp32 as diffusers builds it.
  schedule.betas = at::square(
      at::linspace(std::sqrt(beta_start), std::sqrt(beta_end), num_train_timesteps, at::TensorOptions(at::kFloat)));
  schedule.alphas_cumprod = at::cumprod(1 - schedule.betas, 0);
  // (√ᾱ / √(1 - ᾱ))², in kohya's operation order.
  schedule.all_snr = at::square(at::sqrt(schedule.alphas_cumprod) / at::sqrt(1.0 - schedule.alphas_cumprod));
  if (zero_terminal_snr) {
    schedule.betas = zero_terminal_snr_betas(schedule.betas);
    schedule.alphas_cumprod = at::cumprod(1 - schedule.betas, 0);
  }
  return schedule;
}

// ---------------------------------------------------------------- options

LossType parse_loss_type(std::string_view name) {
  if (name == "l1") return LossType::L1;
  if (name == "l2") return LossType::L2;
  if (name == "huber") return LossType::Huber;
  if (name == "smooth_l1") return LossType::SmoothL1;
  fail("--loss_type", "'{}' is not one of: l1, l2, huber, smooth_l1", name);
}

HuberSchedule parse_huber_schedule(std::string_view name) {
  if (name == "constant") return HuberSchedule::Constant;
  if (name == "exponential") return HuberSchedule::Exponential;
  if (name == "snr") return HuberSchedule::Snr;
  fail("--huber_schedule", "'{}' is not one of: constant, exponential, snr", name);
}

DdpmOptions ddpm_options_from_args(const TrainArgs& args, int64_t num_train_timesteps) {
  if (args.adaptive_noise_scale && !args.noise_offset) fail("--adaptive_noise_scale", "requires --noise_offset");
  if (args.scale_v_pred_loss_like_noise_pred && !args.v_parameterization)
    fail("--scale_v_pred_loss_like_noise_pred", "can be enabled only with --v_parameterization");
  if (args.v_pred_like_loss.value_or(0.0) != 0.0 && args.v_parameterization)
    fail("--v_pred_like_loss", "cannot be enabled with --v_parameterization");
  if ((args.loss_type == "huber" || args.loss_type == "smooth_l1") && args.huber_schedule == "exponential" &&
      args.huber_c <= 0.0)
    fail("--huber_c", "the exponential huber schedule decays to huber_c, which must be positive; got {}", args.huber_c);
  if (args.zero_terminal_snr && !args.v_parameterization)
    spdlog::warn("zero_terminal_snr is enabled, but v_parameterization is not enabled. training will be unexpected");

  // kohya's documented ranges; anything else would index past the schedule.
  const int64_t min_timestep = args.min_timestep.value_or(0);
  const int64_t max_timestep = args.max_timestep.value_or(num_train_timesteps);
  if (min_timestep < 0 || min_timestep >= num_train_timesteps)
    fail("--min_timestep", "must be between 0 and {}, got {}", num_train_timesteps - 1, min_timestep);
  if (max_timestep < 1 || max_timestep > num_train_timesteps)
    fail("--max_timestep", "must be between 1 and {}, got {}", num_train_timesteps, max_timestep);

  DdpmOptions options;
  options.zero_terminal_snr = args.zero_terminal_snr;
  NoiseOptions& noise = options.noise;
  noise.noise_offset = args.noise_offset.value_or(0.0);
  noise.noise_offset_random_strength = args.noise_offset_random_strength;
  noise.adaptive_noise_scale = args.adaptive_noise_scale;
  noise.multires_noise_iterations = args.multires_noise_iterations.value_or(0);
  noise.multires_noise_discount = args.multires_noise_discount;
  noise.ip_noise_gamma = args.ip_noise_gamma.value_or(0.0);
  noise.ip_noise_gamma_random_strength = args.ip_noise_gamma_random_strength;
  noise.min_timestep = args.min_timestep;
  noise.max_timestep = args.max_timestep;
  LossOptions& loss = options.loss;
  loss.v_parameterization = args.v_parameterization;
  loss.loss_type = parse_loss_type(args.loss_type);
  loss.huber_schedule = parse_huber_schedule(args.huber_schedule);
  loss.huber_c = args.huber_c;
  loss.huber_scale = args.huber_scale;
  loss.min_snr_gamma = args.min_snr_gamma.value_or(0.0);
  loss.scale_v_pred_loss_like_noise_pred = args.scale_v_pred_loss_like_noise_pred;
  loss.v_pred_like_loss = args.v_pred_like_loss.value_or(0.0);
  loss.debiased_estimation_loss = args.debiased_estimation_loss;
  return options;
}

// ---------------------------------------------------------------- noise and timesteps

at::Tensor apply_noise_offset(const at::Tensor& latents, const at::Tensor& noise, const at::Tensor& offset,
                              std::optional<double> adaptive_noise_scale, const at::Generator& gen) {
  at::Tensor plane_offset = offset.to(latents.device());
  if (adaptive_noise_scale) {
    const at::Tensor latent_mean = at::abs(latents.mean({2, 3}, /*keepdim=*/true));  // (B, C, 1, 1)
    // A negative adaptive scale could push the offset below zero.
    plane_offset = at::clamp_min(plane_offset + *adaptive_noise_scale * latent_mean, 0.0);
  }
  // fp32 whatever the latents' dtype: kohya draws with torch's default dtype here.
  const at::Tensor plane_noise =
      at::randn({latents.size(0), latents.size(1), 1, 1}, gen, at::TensorOptions(at::kFloat)).to(latents.device());
  return noise + plane_offset * plane_noise;
}

at::Tensor pyramid_noise_like(const at::Tensor& noise, int64_t iterations, double discount, const UniformDraw& uniform,
                              const at::Generator& gen) {
  const int64_t batch = noise.size(0), channels = noise.size(1), height = noise.size(2), width = noise.size(3);
  at::Tensor pyramid = noise.clone();  // kohya adds in place: the sum keeps the noise's dtype
  for (int64_t i = 0; i < iterations; ++i) {
    const double scale = uniform() * 2 + 2;  // r ~ U(2, 4) rather than always 2x
    const double shrink = std::pow(scale, static_cast<double>(i));
    const int64_t level_height = std::max<int64_t>(1, static_cast<int64_t>(static_cast<double>(height) / shrink));
    const int64_t level_width = std::max<int64_t>(1, static_cast<int64_t>(static_cast<double>(width) / shrink));
    const at::Tensor level =
        at::randn({batch, channels, level_height, level_width}, gen, at::TensorOptions(at::kFloat)).to(noise.device());
    pyramid += at::upsample_bilinear2d(level, {height, width}, /*align_corners=*/false) *
               std::pow(discount, static_cast<double>(i));
    if (level_height == 1 || level_width == 1) break;  // the coarsest level is a single row or column
  }
  return pyramid / pyramid.std();  // back to about unit variance
}

at::Tensor sample_timesteps(int64_t min_timestep, int64_t max_timestep, int64_t batch_size, const at::Generator& gen) {
  if (min_timestep < max_timestep) return at::randint(min_timestep, max_timestep, {batch_size}, gen, at::kLong);
  return at::full({batch_size}, max_timestep, at::kLong);
}

at::Tensor add_noise(const DdpmSchedule& schedule, const at::Tensor& latents, const at::Tensor& noise,
                     const at::Tensor& timesteps) {
  const at::Tensor alphas_cumprod = per_sample(schedule.alphas_cumprod, timesteps, latents);  // (B, 1, 1, 1)
  return at::sqrt(alphas_cumprod) * latents + at::sqrt(1 - alphas_cumprod) * noise;
}

at::Tensor get_velocity(const DdpmSchedule& schedule, const at::Tensor& latents, const at::Tensor& noise,
                        const at::Tensor& timesteps) {
  const at::Tensor alphas_cumprod = per_sample(schedule.alphas_cumprod, timesteps, latents);  // (B, 1, 1, 1)
  return at::sqrt(alphas_cumprod) * noise - at::sqrt(1 - alphas_cumprod) * latents;
}

NoisedLatents noise_latents(const DdpmSchedule& schedule, const at::Tensor& latents, const NoiseOptions& options,
                            const at::Generator& gen, const UniformDraw& pyramid_uniform) {
  if (latents.dim() != 4) fail("noise", "expected latents (batch, channels, height, width), got {}", c10::str(latents.sizes()));
  const auto draw_like_latents = [&] {
    return at::randn(latents.sizes(), gen, latents.options().device(at::kCPU)).to(latents.device());
  };
  // One U(0,1) strength per batch, (1,) fp32 as kohya draws it.
  const auto random_strength = [&](double max_strength) {
    return at::rand({1}, gen, at::TensorOptions(at::kFloat)).to(latents.device()) * max_strength;
  };

  NoisedLatents out;
  out.noise = draw_like_latents();  // (B, C, H, W)
  if (options.noise_offset != 0.0) {
    const at::Tensor offset = options.noise_offset_random_strength
                                  ? random_strength(options.noise_offset)
                                  : at::scalar_tensor(options.noise_offset, at::TensorOptions(at::kFloat));
    out.noise = apply_noise_offset(latents, out.noise, offset, options.adaptive_noise_scale, gen);
  }
  if (options.multires_noise_iterations != 0)
    out.noise = pyramid_noise_like(out.noise, options.multires_noise_iterations, options.multires_noise_discount,
                                   pyramid_uniform, gen);

  const int64_t min_timestep = options.min_timestep.value_or(0);
  const int64_t max_timestep = options.max_timestep.value_or(schedule.num_train_timesteps());
  out.timesteps = sample_timesteps(min_timestep, max_timestep, latents.size(0), gen).to(latents.device());

  if (options.ip_noise_gamma != 0.0) {
    // Input perturbation: the model sees extra noise the target does not contain.
    const at::Tensor strength = options.ip_noise_gamma_random_strength
                                    ? random_strength(options.ip_noise_gamma)
                                    : at::scalar_tensor(options.ip_noise_gamma, at::TensorOptions(at::kFloat));
    out.noisy_latents = add_noise(schedule, latents, out.noise + strength * draw_like_latents(), out.timesteps);
  } else {
    out.noisy_latents = add_noise(schedule, latents, out.noise, out.timesteps);
  }
  return out;
}

at::Tensor training_target(const DdpmSchedule& schedule, const at::Tensor& latents, const NoisedLatents& noised,
                           bool v_parameterization) {
  return v_parameterization ? get_velocity(schedule, latents, noised.noise, noised.timesteps) : noised.noise;
}

// ---------------------------------------------------------------- loss

std::optional<at::Tensor> huber_threshold(const DdpmSchedule& schedule, const LossOptions& options,
                                          const at::Tensor& timesteps) {
  if (options.loss_type != LossType::Huber && options.loss_type != LossType::SmoothL1) return std::nullopt;
  switch (options.huber_schedule) {
    case HuberSchedule::Exponential: {
      // c decays from huber_scale at t = 0 to huber_c · huber_scale at t = T.
      const double alpha = -std::log(options.huber_c) / static_cast<double>(schedule.num_train_timesteps());
      return at::exp(-alpha * timesteps) * options.huber_scale;
    }
    case HuberSchedule::Snr: {
      // c = (1 - huber_c) / (1 + σ_t)² + huber_c with σ_t = √((1 - ᾱ_t) / ᾱ_t): near 1 at low noise, huber_c at high.
      const at::Tensor alphas_cumprod = schedule.alphas_cumprod.index_select(0, timesteps.cpu());
      const at::Tensor sigmas = at::sqrt((1.0 - alphas_cumprod) / alphas_cumprod);
      return (at::reciprocal(at::square(1 + sigmas)) * (1 - options.huber_c) + options.huber_c).to(timesteps.device());
    }
    case HuberSchedule::Constant:
      return at::full({timesteps.size(0)}, options.huber_c * options.huber_scale,
                      at::TensorOptions(at::kFloat).device(timesteps.device()));
  }
  fail("--huber_schedule", "unknown schedule");
}

at::Tensor elementwise_loss(const at::Tensor& model_pred, const at::Tensor& target, LossType loss_type,
                            const std::optional<at::Tensor>& huber_c) {
  switch (loss_type) {
    case LossType::L2:
      return at::mse_loss(model_pred, target, at::Reduction::None);
    case LossType::L1:
      return at::l1_loss(model_pred, target, at::Reduction::None);
    case LossType::Huber:
    case LossType::SmoothL1: {
      if (!huber_c) fail("loss", "the huber and smooth_l1 losses need a threshold per sample");
      std::vector<int64_t> shape(static_cast<size_t>(model_pred.dim()), 1);
      shape[0] = -1;
      const at::Tensor c = huber_c->view(shape);  // (B, 1, 1, 1)
      // Pseudo-Huber: quadratic below c, linear above; huber scales by 2c, smooth_l1 by 2.
      const at::Tensor excess = at::sqrt(at::square(model_pred - target) + at::square(c)) - c;
      return loss_type == LossType::Huber ? 2 * c * excess : 2 * excess;
    }
  }
  fail("loss", "unknown loss type");
}

at::Tensor apply_masked_loss(const at::Tensor& loss, const at::Tensor& mask) {
  if (loss.dim() != 4) fail("masked loss", "expected a loss (batch, channels, height, width), got {}", c10::str(loss.sizes()));
  at::Tensor mask_image = mask.to(loss.scalar_type());
  if (mask_image.dim() == 3) mask_image = mask_image.unsqueeze(1);  // (B, H', W') -> (B, 1, H', W')
  if (mask_image.dim() != 4 || mask_image.size(1) != 1 || mask_image.size(0) != loss.size(0))
    fail("masked loss", "expected a mask (batch, height, width) or (batch, 1, height, width) for a batch of {}, got {}",
         loss.size(0), c10::str(mask.sizes()));
  // "area" resizing is adaptive average pooling to the loss's size.
  return loss * at::adaptive_avg_pool2d(mask_image, {loss.size(2), loss.size(3)});
}

at::Tensor mask_from_conditioning_images(const at::Tensor& conditioning_images) {
  return conditioning_images.to(at::kFloat).select(1, 0).unsqueeze(1) / 2 + 0.5;
}

at::Tensor apply_snr_weight(const at::Tensor& loss, const at::Tensor& timesteps, const DdpmSchedule& schedule,
                            double gamma, bool v_parameterization) {
  // Min-SNR-γ (arXiv 2303.09556): caps the weight of low-noise timesteps, whose loss is small and easy.
  const at::Tensor snr = snr_at(schedule, timesteps);  // (B,)
  const at::Tensor min_snr_gamma = at::minimum(snr, at::full_like(snr, gamma));
  const at::Tensor weight = v_parameterization ? at::div(min_snr_gamma, snr + 1) : at::div(min_snr_gamma, snr);
  return loss * weight.to(loss.device());
}

at::Tensor scale_v_prediction_loss_like_noise_prediction(const at::Tensor& loss, const at::Tensor& timesteps,
                                                         const DdpmSchedule& schedule) {
  // A v-prediction loss is an ε loss scaled by (snr + 1) / snr; this undoes that scale.
  const at::Tensor snr = capped_snr_at(schedule, timesteps);
  return loss * (snr / (snr + 1)).to(loss.device());
}

at::Tensor add_v_prediction_like_loss(const at::Tensor& loss, const at::Tensor& timesteps, const DdpmSchedule& schedule,
                                      double v_pred_like_loss) {
  const at::Tensor snr = capped_snr_at(schedule, timesteps);
  const at::Tensor scale = (snr / (snr + 1)).to(loss.device());
  return loss + loss / scale * v_pred_like_loss;
}

at::Tensor apply_debiased_estimation(const at::Tensor& loss, const at::Tensor& timesteps, const DdpmSchedule& schedule,
                                     bool v_parameterization) {
  // Weights 1/√snr (ε) or 1/(snr + 1) (v), as kohya computes `1 / x`: a reciprocal.
  const at::Tensor snr = capped_snr_at(schedule, timesteps);
  const at::Tensor weight = v_parameterization ? at::reciprocal(snr + 1) : at::reciprocal(at::sqrt(snr));
  return weight.to(loss.device()) * loss;
}

at::Tensor post_process_loss(const at::Tensor& loss, const at::Tensor& timesteps, const DdpmSchedule& schedule,
                             const LossOptions& options) {
  at::Tensor weighted = loss;
  if (options.min_snr_gamma != 0.0)
    weighted = apply_snr_weight(weighted, timesteps, schedule, options.min_snr_gamma, options.v_parameterization);
  if (options.scale_v_pred_loss_like_noise_pred)
    weighted = scale_v_prediction_loss_like_noise_prediction(weighted, timesteps, schedule);
  if (options.v_pred_like_loss != 0.0)
    weighted = add_v_prediction_like_loss(weighted, timesteps, schedule, options.v_pred_like_loss);
  if (options.debiased_estimation_loss)
    weighted = apply_debiased_estimation(weighted, timesteps, schedule, options.v_parameterization);
  return weighted;
}

at::Tensor ddpm_batch_loss(const DdpmSchedule& schedule, const LossOptions& options, const at::Tensor& model_pred,
                           const at::Tensor& target, const at::Tensor& timesteps, const at::Tensor& loss_weights,
                           const std::optional<at::Tensor>& mask) {
  if (model_pred.sizes() != target.sizes())
    fail("loss", "prediction {} and target {} differ in shape", c10::str(model_pred.sizes()), c10::str(target.sizes()));
  const std::optional<at::Tensor> huber_c = huber_threshold(schedule, options, timesteps);
  at::Tensor loss = elementwise_loss(model_pred.to(at::kFloat), target.to(at::kFloat), options.loss_type, huber_c);
  if (mask) loss = apply_masked_loss(loss, *mask);
  std::vector<int64_t> non_batch_dims;
  for (int64_t d = 1; d < loss.dim(); ++d) non_batch_dims.push_back(d);
  loss = loss.mean(non_batch_dims) * loss_weights.to(loss.device());  // (B,)
  return post_process_loss(loss, timesteps, schedule, options).mean();
}

// ---------------------------------------------------------------- the objective

DdpmObjective::DdpmObjective(const DdpmOptions& options)
    : options_(options), schedule_(make_ddpm_schedule(options.zero_terminal_snr)) {}

NoisedBatch DdpmObjective::noise_with(const at::Tensor& latents, const NoiseOptions& noise, const SampleRandoms& randoms) const {
  if (latents.size(0) == 0) {
    return {at::empty_like(latents), at::empty({0}, latents.options().dtype(at::kLong)), at::empty_like(latents)};
  }
  std::vector<at::Tensor> inputs, timesteps, targets;
  for (int64_t i = 0; i < latents.size(0); ++i) {
    const SampleRandom random = randoms(i);
    const at::Tensor sample = latents.narrow(0, i, 1);
    const NoisedLatents noised = noise_latents(schedule_, sample, noise, random.torch, random.python_uniform);
    inputs.push_back(noised.noisy_latents);
    timesteps.push_back(noised.timesteps);
    targets.push_back(training_target(schedule_, sample, noised, options_.loss.v_parameterization));
  }
  return {at::cat(inputs), at::cat(timesteps), at::cat(targets)};
}

NoisedBatch DdpmObjective::noise(const at::Tensor& latents, const SampleRandoms& randoms) const {
  return noise_with(latents, options_.noise, randoms);
}

NoisedBatch DdpmObjective::noise_at_validation_point(const at::Tensor& latents, int point, const SampleRandoms& randoms) const {
  const int64_t min_t = options_.noise.min_timestep.value_or(0);
  const int64_t max_t = options_.noise.max_timestep.value_or(schedule_.num_train_timesteps());
  NoiseOptions fixed = options_.noise;
  fixed.min_timestep = fixed.max_timestep =
      min_t + static_cast<int64_t>(static_cast<double>(max_t - min_t) * (point + 1) / (validation_points() + 1.0));
  return noise_with(latents, fixed, randoms);
}

at::Tensor DdpmObjective::loss(const at::Tensor& prediction, const NoisedBatch& batch, const at::Tensor& loss_weights,
                               const std::optional<at::Tensor>& mask) const {
  return ddpm_batch_loss(schedule_, options_.loss, prediction, batch.target, batch.timesteps, loss_weights, mask);
}

}  // namespace sdt
