// The DDPM training math of SD 1.x/2.x and SDXL, as kohya-ss/sd-scripts does it: the noise schedule, the noise
// variants, timestep sampling, noisy latents and targets, the loss types and the SNR-based loss weights.
//
// Every function repeats kohya's operations in kohya's order (including where Python computes `k / x` as a reciprocal
// times k), so fp32 results match kohya's bit for bit on the same LibTorch. Every random draw comes from a generator
// the caller passes, in the order kohya draws from torch's global generator: a run replays exactly, and a CPU
// generator seeded like `torch.manual_seed(s)` reproduces kohya's draws.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string_view>

#include <ATen/ATen.h>

#include "src/objectives/objective.h"

namespace sdt {

struct TrainArgs;

// ---------------------------------------------------------------- noise schedule

// diffusers' DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, 1000 steps) as kohya
// prepares it. All tensors are fp32, (T,), on the CPU.
struct DdpmSchedule {
  at::Tensor betas;
  at::Tensor alphas_cumprod;  // ᾱ_t = Π_{s<=t} (1 - β_s); after the zero-terminal-SNR fix when asked
  // ᾱ / (1 - ᾱ) of the schedule *before* the zero-terminal-SNR fix: kohya computes it first and never updates it, so
  // the SNR loss weights always see the original schedule (whose last SNR is small, not zero).
  at::Tensor all_snr;

  int64_t num_train_timesteps() const { return betas.size(0); }
};

DdpmSchedule make_ddpm_schedule(bool zero_terminal_snr, int64_t num_train_timesteps = 1000, double beta_start = 0.00085,
                                double beta_end = 0.012);

// Rescales betas so the last timestep has zero SNR, keeping ᾱ_0 (arXiv 2305.08891; kohya's
// fix_noise_scheduler_betas_for_zero_terminal_snr).
at::Tensor zero_terminal_snr_betas(const at::Tensor& betas);  // (T,) -> (T,)

// ---------------------------------------------------------------- options (kohya's argument names)

enum class LossType { L1, L2, Huber, SmoothL1 };
enum class HuberSchedule { Constant, Exponential, Snr };

LossType parse_loss_type(std::string_view name);            // "l1" | "l2" | "huber" | "smooth_l1"
HuberSchedule parse_huber_schedule(std::string_view name);  // "constant" | "exponential" | "snr"

// Zero turns a feature off, as kohya's truthiness tests do.
struct NoiseOptions {
  double noise_offset = 0.0;
  bool noise_offset_random_strength = false;    // offset <- U(0,1) * offset, one draw per batch
  std::optional<double> adaptive_noise_scale;   // offset_bc += scale * |mean_hw(latents_bc)|
  int64_t multires_noise_iterations = 0;
  double multires_noise_discount = 0.3;
  double ip_noise_gamma = 0.0;                  // input perturbation: only the model input gets the extra noise
  bool ip_noise_gamma_random_strength = false;  // gamma <- U(0,1) * gamma, one draw per batch
  std::optional<int64_t> min_timestep;          // default 0
  std::optional<int64_t> max_timestep;          // default num_train_timesteps; exclusive
};

struct LossOptions {
  bool v_parameterization = false;
  LossType loss_type = LossType::L2;
  HuberSchedule huber_schedule = HuberSchedule::Snr;
  double huber_c = 0.1;
  double huber_scale = 1.0;
  double min_snr_gamma = 0.0;
  bool scale_v_pred_loss_like_noise_pred = false;
  double v_pred_like_loss = 0.0;
  bool debiased_estimation_loss = false;
};

struct DdpmOptions {
  bool zero_terminal_snr = false;
  NoiseOptions noise;
  LossOptions loss;
};

// The options from kohya's arguments, with kohya's checks (verify_training_args) on their combinations, and checks
// that the timestep range fits the schedule and that the exponential huber schedule has a positive huber_c.
DdpmOptions ddpm_options_from_args(const TrainArgs& args, int64_t num_train_timesteps = 1000);

// ---------------------------------------------------------------- noise and timesteps

// One draw in [0, 1). kohya draws the pyramid noise's scale factors from Python's `random`, a stream apart from
// torch's; the caller supplies that stream (tests replay recorded values), so the torch stream stays in kohya's order.
using UniformDraw = std::function<double()>;

// noise + offset * N(0,1) per (sample, channel) plane, so the model can learn to change an image's mean brightness.
// `offset` is a scalar tensor (the constant offset) or (1,) (one random strength per batch). With an adaptive scale
// the offset becomes (B, C, 1, 1): offset + scale * |mean_hw(latents)|, clamped at zero.
at::Tensor apply_noise_offset(const at::Tensor& latents, const at::Tensor& noise, const at::Tensor& offset,
                              std::optional<double> adaptive_noise_scale, const at::Generator& gen);

// Multi-resolution ("pyramid") noise: adds bilinearly upsampled N(0,1) at sizes (H, W) / r^i, r ~ U(2, 4) drawn from
// `uniform`, weighted by discount^i, until a side reaches 1; then rescales to unit std over the whole tensor.
at::Tensor pyramid_noise_like(const at::Tensor& noise, int64_t iterations, double discount, const UniformDraw& uniform,
                              const at::Generator& gen);  // (B, C, H, W) -> (B, C, H, W)

// randint(min, max) per sample (max exclusive); when min >= max every sample gets max, as kohya does. int64, (B,).
at::Tensor sample_timesteps(int64_t min_timestep, int64_t max_timestep, int64_t batch_size, const at::Generator& gen);

// x_t = √ᾱ_t · x0 + √(1 - ᾱ_t) · ε (diffusers' add_noise), in the latents' dtype.
at::Tensor add_noise(const DdpmSchedule& schedule, const at::Tensor& latents, const at::Tensor& noise,
                     const at::Tensor& timesteps);
// v = √ᾱ_t · ε - √(1 - ᾱ_t) · x0 (diffusers' get_velocity), the v-prediction target.
at::Tensor get_velocity(const DdpmSchedule& schedule, const at::Tensor& latents, const at::Tensor& noise,
                        const at::Tensor& timesteps);

struct NoisedLatents {
  at::Tensor noise;          // (B, C, H, W) ε after offset / pyramid: the target of ε-prediction, the ε of v
  at::Tensor noisy_latents;  // (B, C, H, W) the model input, with the input-perturbation noise when asked
  at::Tensor timesteps;      // (B,) int64
};

// kohya's get_noise_noisy_latents_and_timesteps, drawing in its order: ε, [offset strength], offset noise,
// pyramid levels, timesteps, [perturbation strength], perturbation noise. Draws are made on the CPU in the latents'
// dtype and moved to the latents' device.
NoisedLatents noise_latents(const DdpmSchedule& schedule, const at::Tensor& latents, const NoiseOptions& options,
                            const at::Generator& gen, const UniformDraw& pyramid_uniform);

// ε, or v with v-parameterization.
at::Tensor training_target(const DdpmSchedule& schedule, const at::Tensor& latents, const NoisedLatents& noised,
                           bool v_parameterization);

// ---------------------------------------------------------------- loss

// The per-sample threshold c of the huber and smooth_l1 losses, (B,) fp32; nullopt for l1 and l2.
std::optional<at::Tensor> huber_threshold(const DdpmSchedule& schedule, const LossOptions& options,
                                          const at::Tensor& timesteps);

// Elementwise loss (kohya's conditional_loss with reduction "none"); `huber_c` (B,) is needed by huber / smooth_l1.
at::Tensor elementwise_loss(const at::Tensor& model_pred, const at::Tensor& target, LossType loss_type,
                            const std::optional<at::Tensor>& huber_c);

// Multiplies a (B, C, H, W) loss by a mask in [0, 1], given as (B, H', W') (kohya's alpha masks) or (B, 1, H', W') and
// area-resized to (H, W). Masked-out elements still count in the later mean (kohya does not divide by the mask area).
at::Tensor apply_masked_loss(const at::Tensor& loss, const at::Tensor& mask);
// The mask kohya takes from a ControlNet-style conditioning image in [-1, 1]: its R channel mapped to [0, 1].
at::Tensor mask_from_conditioning_images(const at::Tensor& conditioning_images);  // (B, 3, H, W) -> (B, 1, H, W)

// SNR-based per-sample weights, each applied to a (B,) loss as kohya's functions of the same names.
at::Tensor apply_snr_weight(const at::Tensor& loss, const at::Tensor& timesteps, const DdpmSchedule& schedule,
                            double gamma, bool v_parameterization);
at::Tensor scale_v_prediction_loss_like_noise_prediction(const at::Tensor& loss, const at::Tensor& timesteps,
                                                         const DdpmSchedule& schedule);
at::Tensor add_v_prediction_like_loss(const at::Tensor& loss, const at::Tensor& timesteps, const DdpmSchedule& schedule,
                                      double v_pred_like_loss);
at::Tensor apply_debiased_estimation(const at::Tensor& loss, const at::Tensor& timesteps, const DdpmSchedule& schedule,
                                     bool v_parameterization);
// The weights enabled in `options`, in kohya's order (post_process_loss).
at::Tensor post_process_loss(const at::Tensor& loss, const at::Tensor& timesteps, const DdpmSchedule& schedule,
                             const LossOptions& options);

// The scalar training loss of a batch, kohya's process_batch from the prediction on: elementwise loss in fp32,
// × mask, mean over all but the batch dim, × loss_weights (B,) (the prior-preservation weights), SNR weights, mean.
at::Tensor ddpm_batch_loss(const DdpmSchedule& schedule, const LossOptions& options, const at::Tensor& model_pred,
                           const at::Tensor& target, const at::Tensor& timesteps, const at::Tensor& loss_weights,
                           const std::optional<at::Tensor>& mask = std::nullopt);

// ---------------------------------------------------------------- the objective

// DDPM as kohya trains SD 1.x/2.x and SDXL: the noise variants and timesteps of `options`, ε or v targets, the loss
// type and weights. Sample i of a batch is noised with randoms(i) alone. Validation points: the timesteps
// linspace(min_t, max_t, 6)[1:-1] (200, 400, 600, 800 by default), as kohya's validation loss.
class DdpmObjective final : public TrainingObjective {
 public:
  explicit DdpmObjective(const DdpmOptions& options);

  NoisedBatch noise(const at::Tensor& latents, const SampleRandoms& randoms) const override;
  int validation_points() const override { return 4; }
  NoisedBatch noise_at_validation_point(const at::Tensor& latents, int point, const SampleRandoms& randoms) const override;
  at::Tensor loss(const at::Tensor& prediction, const NoisedBatch& batch, const at::Tensor& loss_weights,
                  const std::optional<at::Tensor>& mask) const override;

  const DdpmSchedule& schedule() const { return schedule_; }

 private:
  NoisedBatch noise_with(const at::Tensor& latents, const NoiseOptions& noise, const SampleRandoms& randoms) const;

  DdpmOptions options_;
  DdpmSchedule schedule_;
};

}  // namespace sdt
