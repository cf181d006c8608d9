// A training objective: how a family turns a batch of clean latents into what its denoiser sees and what the
// prediction is compared with, and the loss (kohya's get_noise_pred_and_target and loss computation, without the
// denoiser call, which the family makes). DDPM (src/objectives/ddpm.h) for SD 1.x/2.x and SDXL; flow matching for the
// transformer families.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>

#include <ATen/ATen.h>

namespace sdt {

// Where one sample's random draws come from: torch's stream and Python's `random` (kohya draws from both). The trainer
// keys both by the sample's place in its optimizer update, so how samples are split among ranks changes nothing.
struct SampleRandom {
  at::Generator torch;
  std::function<double()> python_uniform;  // U[0, 1)
};
using SampleRandoms = std::function<SampleRandom(int64_t sample)>;

// One batch, noised: the denoiser's input and the target of its prediction.
struct NoisedBatch {
  at::Tensor model_input;  // (B, C, h, w): the noised latents, as the denoiser takes them
  at::Tensor timesteps;    // (B): the timestep the denoiser is told
  at::Tensor target;       // (B, C, h, w): what the prediction is compared with
  at::Tensor sigmas;       // (B): flow matching's noise level per sample (undefined for DDPM)
};

class TrainingObjective {
 public:
  virtual ~TrainingObjective() = default;

  // Noise, timesteps, model input and target for latents (B, C, h, w) in fp32; sample i draws only from randoms(i).
  virtual NoisedBatch noise(const at::Tensor& latents, const SampleRandoms& randoms) const = 0;

  // Validation uses fixed points of the timestep range, the same at every validation (kohya's validation loss), each
  // with its own noise: validation_points() of them; noise_at_validation_point draws the noise from randoms(i).
  virtual int validation_points() const = 0;
  virtual NoisedBatch noise_at_validation_point(const at::Tensor& latents, int point, const SampleRandoms& randoms) const = 0;

  // The batch's mean loss in fp32 (the loss type, its per-timestep weighting, the per-sample loss weights of the
  // data layer and the optional mask (B, 1, H, W) of --masked_loss, as kohya computes it).
  virtual at::Tensor loss(const at::Tensor& prediction, const NoisedBatch& batch, const at::Tensor& loss_weights,
                          const std::optional<at::Tensor>& mask) const = 0;
};

}  // namespace sdt
