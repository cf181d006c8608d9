#include "src/objectives/flow_matching.h"

#include <cmath>
#include <map>
#include <numbers>
#include <vector>

#include "src/core/error.h"
#include "src/core/train_args.h"

namespace sdt {

namespace {

// kohya's `a / t` for a Python number a and a tensor t: t.reciprocal() * a (so the results match bit for bit).
at::Tensor divide(double a, const at::Tensor& t) { return at::reciprocal(t) * a; }

// shift σ / (1 + (shift - 1) σ), in kohya's operation order.
at::Tensor shifted(const at::Tensor& sigmas, double shift) { return (sigmas * shift) / ((sigmas * (shift - 1)) + 1); }

}  // namespace

FlowMatchingOptions flow_matching_options_from_args(const TrainArgs& args) {
  static const std::map<std::string, TimestepSampling> samplings{{"sigma", TimestepSampling::sigma},
                                                                 {"uniform", TimestepSampling::uniform},
                                                                 {"sigmoid", TimestepSampling::sigmoid},
                                                                 {"shift", TimestepSampling::shift},
                                                                 {"flux_shift", TimestepSampling::flux_shift}};
  static const std::map<std::string, ModelPredictionType> types{{"raw", ModelPredictionType::raw},
                                                                {"additive", ModelPredictionType::additive},
                                                                {"sigma_scaled", ModelPredictionType::sigma_scaled}};
  FlowMatchingOptions o;
  const auto sampling = samplings.find(args.timestep_sampling);
  if (sampling == samplings.end()) fail("--timestep_sampling", "'{}' is not one of sigma, uniform, sigmoid, shift, flux_shift", args.timestep_sampling);
  o.timestep_sampling = sampling->second;
  const auto type = types.find(args.model_prediction_type);
  if (type == types.end()) fail("--model_prediction_type", "'{}' is not one of raw, additive, sigma_scaled", args.model_prediction_type);
  o.model_prediction_type = type->second;
  o.sigmoid_scale = args.sigmoid_scale;
  o.discrete_flow_shift = args.discrete_flow_shift;
  o.weighting_scheme = args.weighting_scheme;
  o.logit_mean = args.logit_mean;
  o.logit_std = args.logit_std;
  o.mode_scale = args.mode_scale;
  o.ip_noise_gamma = args.ip_noise_gamma.value_or(0.0);
  o.ip_noise_gamma_random_strength = args.ip_noise_gamma_random_strength;
  o.loss_type = parse_loss_type(args.loss_type);
  o.huber_schedule = parse_huber_schedule(args.huber_schedule);
  o.huber_c = args.huber_c;
  o.huber_scale = args.huber_scale;
  return o;
}

FlowMatchSchedule make_flow_match_schedule(int64_t num_train_timesteps, double shift) {
  const auto t = static_cast<double>(num_train_timesteps);
  const at::Tensor timesteps = at::linspace(t, 1.0, num_train_timesteps, at::TensorOptions(at::kFloat));  // T .. 1, exact
  const at::Tensor sigmas = shifted(timesteps / t, shift);
  return {sigmas, sigmas * t};
}

at::Tensor flow_loss_weighting(const std::string& weighting_scheme, const at::Tensor& sigmas) {
  if (weighting_scheme == "sigma_sqrt") return at::pow(sigmas, -2.0).to(at::kFloat);
  if (weighting_scheme == "cosmap") {
    const at::Tensor bot = at::rsub(sigmas * 2, 1) + at::pow(sigmas, 2) * 2;
    return divide(2, bot * std::numbers::pi);
  }
  return at::ones_like(sigmas);
}

FlowMatchingObjective::FlowMatchingObjective(const FlowMatchingOptions& options)
    : options_(options), schedule_(make_flow_match_schedule(options.num_train_timesteps, options.discrete_flow_shift)) {
  const std::string& w = options.weighting_scheme;
  if (w != "sigma_sqrt" && w != "logit_normal" && w != "mode" && w != "cosmap" && w != "none" && w != "uniform") {
    fail("--weighting_scheme", "'{}' is not one of sigma_sqrt, logit_normal, mode, cosmap, none, uniform", w);
  }
  if ((options.loss_type == LossType::Huber || options.loss_type == LossType::SmoothL1) && options.huber_schedule == HuberSchedule::Snr) {
    fail("--huber_schedule", "'snr' needs a DDPM noise schedule; flow matching takes 'constant' or 'exponential' (as kohya)");
  }
}

at::Tensor FlowMatchingObjective::draw_sigma(const at::Tensor& latent, const at::Generator& generator) const {
  const auto opts = at::TensorOptions(at::kFloat);
  switch (options_.timestep_sampling) {
    case TimestepSampling::uniform:
      return at::rand({1}, generator, opts);
    case TimestepSampling::sigmoid:
      return at::sigmoid(at::randn({1}, generator, opts) * options_.sigmoid_scale);
    case TimestepSampling::shift:
      return shifted((at::randn({1}, generator, opts) * options_.sigmoid_scale).sigmoid(), options_.discrete_flow_shift);
    case TimestepSampling::flux_shift: {
      const at::Tensor s = (at::randn({1}, generator, opts) * options_.sigmoid_scale).sigmoid();
      // get_lin_function(y1 = 0.5, y2 = 1.15) at the packed token count, then time_shift(mu, 1, s).
      const double m = (1.15 - 0.5) / (4096.0 - 256.0), b = 0.5 - m * 256.0;
      const double tokens = static_cast<double>((latent.size(-2) / 2) * (latent.size(-1) / 2));
      const double e = std::exp(m * tokens + b);
      return divide(e, at::pow(divide(1, s) - 1, 1.0) + e);
    }
    case TimestepSampling::sigma: {
      at::Tensor u;
      if (options_.weighting_scheme == "logit_normal") {
        u = at::sigmoid(at::normal(options_.logit_mean, options_.logit_std, {1}, generator, opts));
      } else if (options_.weighting_scheme == "mode") {
        u = at::rand({1}, generator, opts);
        u = at::rsub(u, 1) - (at::pow(at::cos(u * std::numbers::pi / 2), 2) - 1 + u) * options_.mode_scale;
      } else {
        u = at::rand({1}, generator, opts);
      }
      const at::Tensor index = (u * static_cast<double>(options_.num_train_timesteps)).to(at::kLong);
      return schedule_.sigmas.index_select(0, index);
    }
  }
  fail("--timestep_sampling", "unknown sampling");
}

NoisedBatch FlowMatchingObjective::noise_at(const at::Tensor& latents, const SampleRandoms& randoms,
                                            std::optional<double> fixed_sigma) const {
  if (latents.size(0) == 0) {
    const at::Tensor none = at::empty({0}, latents.options().dtype(at::kFloat));
    return {at::empty_like(latents), none, at::empty_like(latents), none};
  }
  const double t = static_cast<double>(options_.num_train_timesteps);
  std::vector<at::Tensor> inputs, timesteps, targets, sigmas;
  for (int64_t i = 0; i < latents.size(0); ++i) {
    const SampleRandom random = randoms(i);
    const at::Tensor x0 = latents.narrow(0, i, 1);
    // Drawn on the host from the keyed generator and copied, so every device draws the same numbers.
    const at::TensorOptions host = x0.options().device(at::kCPU);
    const at::Tensor noise = at::randn(x0.sizes(), random.torch, host).to(x0.device());
    const at::Tensor sigma =
        (fixed_sigma ? at::full({1}, *fixed_sigma, at::TensorOptions(at::kFloat)) : draw_sigma(x0, random.torch)).to(x0.device());
    // kohya's "sigma" sampling takes the schedule's timestep, the others T · σ: the same numbers.
    const at::Tensor timestep = sigma * t;
    const at::Tensor s = sigma.view({-1, 1, 1, 1}).to(x0.dtype());
    at::Tensor applied = noise;
    if (options_.ip_noise_gamma != 0) {
      const at::Tensor xi = at::randn(x0.sizes(), random.torch, host).to(x0.device());
      applied = options_.ip_noise_gamma_random_strength
                    ? noise + at::rand({1}, random.torch, host).to(x0.device()) * options_.ip_noise_gamma * xi
                                                        : noise + xi * options_.ip_noise_gamma;
    }
    inputs.push_back(at::rsub(s, 1.0) * x0 + s * applied);
    timesteps.push_back(timestep);
    targets.push_back(noise - x0);
    sigmas.push_back(sigma);
  }
  return {at::cat(inputs), at::cat(timesteps), at::cat(targets), at::cat(sigmas)};
}

NoisedBatch FlowMatchingObjective::noise(const at::Tensor& latents, const SampleRandoms& randoms) const {
  return noise_at(latents, randoms, std::nullopt);
}

NoisedBatch FlowMatchingObjective::noise_at_validation_point(const at::Tensor& latents, int point, const SampleRandoms& randoms) const {
  return noise_at(latents, randoms, static_cast<double>(point + 1) / (validation_points() + 1));
}

at::Tensor FlowMatchingObjective::loss(const at::Tensor& prediction, const NoisedBatch& batch, const at::Tensor& loss_weights,
                                       const std::optional<at::Tensor>& mask) const {
  if (prediction.sizes() != batch.target.sizes())
    fail("loss", "prediction {} and target {} differ in shape", c10::str(prediction.sizes()), c10::str(batch.target.sizes()));
  const at::Tensor s = batch.sigmas.view({-1, 1, 1, 1}).to(prediction.dtype());
  at::Tensor pred = prediction;
  std::optional<at::Tensor> weighting;
  switch (options_.model_prediction_type) {
    case ModelPredictionType::raw:
      break;
    case ModelPredictionType::additive:
      pred = pred + batch.model_input;
      break;
    case ModelPredictionType::sigma_scaled:
      pred = pred * (-s) + batch.model_input;
      weighting = flow_loss_weighting(options_.weighting_scheme, s);
      break;
  }
  std::optional<at::Tensor> huber_c;
  if (options_.loss_type == LossType::Huber || options_.loss_type == LossType::SmoothL1) {
    if (options_.huber_schedule == HuberSchedule::Exponential) {
      huber_c = at::exp(batch.timesteps * -(-std::log(options_.huber_c) / static_cast<double>(options_.num_train_timesteps))) * options_.huber_scale;
    } else {
      huber_c = at::full({batch.timesteps.size(0)}, options_.huber_c * options_.huber_scale, at::TensorOptions(at::kFloat));
    }
  }
  at::Tensor loss = elementwise_loss(pred.to(at::kFloat), batch.target.to(at::kFloat), options_.loss_type, huber_c);
  if (weighting) loss = loss * *weighting;
  if (mask) loss = apply_masked_loss(loss, *mask);
  std::vector<int64_t> non_batch_dims;
  for (int64_t d = 1; d < loss.dim(); ++d) non_batch_dims.push_back(d);
  return (loss.mean(non_batch_dims) * loss_weights.to(loss.device())).mean();
}

}  // namespace sdt
