// Rectified-flow training as kohya-ss/sd-scripts trains FLUX.1 and Chroma (library/flux_train_utils.py) and the other
// transformer families: noisy latents x_σ = (1 - σ) x0 + σ ε, the target ε - x0 (the velocity), σ drawn by one of
// kohya's timestep samplings, the prediction post-processed by --model_prediction_type, and the loss weighted by
// --weighting_scheme where kohya weights it.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include <ATen/ATen.h>

#include "src/objectives/ddpm.h"
#include "src/objectives/objective.h"

namespace sdt {

// --timestep_sampling: how σ is drawn per sample.
//   sigma       u from the --weighting_scheme density (logit_normal: sigmoid(N(logit_mean, logit_std)); mode: kohya's
//               mode formula; else U(0,1)), then the shifted discrete schedule's step at index ⌊1000 u⌋
//   uniform     σ ~ U(0, 1)
//   sigmoid     σ = sigmoid(sigmoid_scale · N(0, 1))
//   shift       the same, then σ ← shift σ / (1 + (shift - 1) σ) with --discrete_flow_shift
//   flux_shift  the same, then FLUX's resolution-dependent shift: μ linear in the packed token count h/2 · w/2
//               (0.5 at 256 tokens, 1.15 at 4096), σ ← e^μ / (e^μ + 1/σ - 1)
enum class TimestepSampling { sigma, uniform, sigmoid, shift, flux_shift };
// --model_prediction_type: what the model's output means. raw: the velocity itself; additive: velocity minus the
// noisy input; sigma_scaled: x0-like, pred ← noisy - σ · pred, the loss then weighted by --weighting_scheme.
enum class ModelPredictionType { raw, additive, sigma_scaled };

struct FlowMatchingOptions {
  TimestepSampling timestep_sampling = TimestepSampling::sigma;
  double sigmoid_scale = 1.0;
  double discrete_flow_shift = 3.0;
  std::string weighting_scheme = "uniform";  // sigma_sqrt, logit_normal, mode, cosmap, none, uniform
  double logit_mean = 0.0, logit_std = 1.0, mode_scale = 1.29;
  ModelPredictionType model_prediction_type = ModelPredictionType::sigma_scaled;
  double ip_noise_gamma = 0.0;
  bool ip_noise_gamma_random_strength = false;
  LossType loss_type = LossType::L2;
  HuberSchedule huber_schedule = HuberSchedule::Constant;  // kohya's "snr" needs a DDPM schedule: refused
  double huber_c = 0.1, huber_scale = 1.0;
  int64_t num_train_timesteps = 1000;
};

// The options from kohya's arguments (flux_train_network.py's --timestep_sampling ... --discrete_flow_shift, the
// transformer families' --weighting_scheme ..., and the shared loss and --ip_noise_gamma flags). Unknown names and
// kohya's refused combinations are sdt::Errors.
FlowMatchingOptions flow_matching_options_from_args(const TrainArgs& args);

// The discrete schedule kohya's FlowMatchEulerDiscreteScheduler(num_train_timesteps, shift) holds: σ_i for
// t_i = T, T - 1, ..., 1 (σ = t / T, shifted), and the timesteps T · σ_i. fp32, (T,).
struct FlowMatchSchedule {
  at::Tensor sigmas, timesteps;
};
FlowMatchSchedule make_flow_match_schedule(int64_t num_train_timesteps, double shift);

// compute_loss_weighting_for_sd3: σ^-2 (sigma_sqrt), 2 / (π (1 - 2σ + 2σ²)) (cosmap), else 1; the shape of σ.
at::Tensor flow_loss_weighting(const std::string& weighting_scheme, const at::Tensor& sigmas);

class FlowMatchingObjective final : public TrainingObjective {
 public:
  explicit FlowMatchingObjective(const FlowMatchingOptions& options);

  // Per sample, from its own stream in kohya's order: ε, the σ draw(s), [the perturbation strength], the
  // perturbation noise. NoisedBatch::timesteps are T · σ (fp32); sigmas are set.
  NoisedBatch noise(const at::Tensor& latents, const SampleRandoms& randoms) const override;
  // σ = 1/5, 2/5, 3/5, 4/5 (timesteps 200 ... 800), unshifted. (kohya's FLUX validation sets min/max_timestep,
  // which its flow-matching noise ignores, so its validation timesteps are random.)
  int validation_points() const override { return 4; }
  NoisedBatch noise_at_validation_point(const at::Tensor& latents, int point, const SampleRandoms& randoms) const override;
  // kohya's process_batch for FLUX: the prediction type applied, the elementwise loss against ε - x0, × the
  // weighting (sigma_scaled only), × mask, the mean per sample × loss_weights, the mean.
  at::Tensor loss(const at::Tensor& prediction, const NoisedBatch& batch, const at::Tensor& loss_weights,
                  const std::optional<at::Tensor>& mask) const override;

 private:
  at::Tensor draw_sigma(const at::Tensor& latent, const at::Generator& generator) const;  // (1,)
  NoisedBatch noise_at(const at::Tensor& latents, const SampleRandoms& randoms, std::optional<double> fixed_sigma) const;

  FlowMatchingOptions options_;
  FlowMatchSchedule schedule_;
};

}  // namespace sdt
