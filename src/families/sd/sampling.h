// Text-to-image for SD 1.x / 2.x as kohya-ss/sd-scripts makes its sample images: its long-prompt-weighting pipeline
// (library/lpw_stable_diffusion.py) with the schedulers train_util.get_my_scheduler builds from diffusers:
//
//   DDIM            DDIMScheduler: "leading" timesteps (t_i = i * (1000 / steps)), steps_offset 0,
//                   set_alpha_to_one, eta 0, clip_sample (kohya forces it on: the predicted x0 is clamped to [-1, 1])
//   Euler           EulerDiscreteScheduler: "linspace" timesteps over [0, 999] (fractional), sigmas interpolated
//                   linearly from the training schedule, input scaled by 1 / sqrt(sigma^2 + 1)
//   Euler a         EulerAncestralDiscreteScheduler: the same sigmas; each step goes down to sigma_down and adds
//                   fresh noise of sigma_up
//
// all on SD's training schedule: betas "scaled_linear" from 0.00085 to 0.012 over 1000 steps; epsilon or v
// prediction. One torch.Generator-compatible CPU generator, seeded with the seed, draws the initial latents and then
// Euler ancestral's noise, in the reference's order, so a seed gives the image kohya gives on the CPU.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>

#include <torch/torch.h>

#include "src/families/options.h"
#include "src/models/sd_checkpoint.h"
#include "src/tokenizers/kohya_prompt.h"

namespace sdt {

enum class Prediction { epsilon, v };  // what the U-Net outputs: the noise, or v = sqrt(a) * noise - sqrt(1 - a) * x0
enum class SamplerKind { ddim, euler, euler_a };

// kohya's --sample_sampler names: ddim, euler / k_euler, euler_a / k_euler_a. Others are an error naming these.
SamplerKind sampler_from_name(const std::string& name);

// alphas_cumprod of SD's training schedule: (1000) float32, computed in float32 as diffusers does.
at::Tensor sd_alphas_cumprod();

// One denoising schedule of `steps` steps: step i gives the U-Net timesteps()[i] and its scaled input, then turns its
// prediction into the latents of step i + 1.
class Scheduler {
 public:
  virtual ~Scheduler() = default;
  // (steps): int64 for DDIM, float32 for the Euler samplers (fractional timesteps).
  const at::Tensor& timesteps() const { return timesteps_; }
  int64_t steps() const { return timesteps_.size(0); }
  // Initial latents are unit normal noise times this. 0-dim float32.
  virtual at::Tensor init_noise_sigma() const = 0;
  virtual at::Tensor scale_model_input(const at::Tensor& latents, int64_t step) const = 0;
  // The U-Net's output for `latents` at `step` -> the latents after it. Euler ancestral draws its noise from
  // `generator`.
  virtual at::Tensor step(const at::Tensor& model_output, int64_t step, const at::Tensor& latents,
                          at::Generator& generator) const = 0;

 protected:
  at::Tensor timesteps_;
};

std::unique_ptr<Scheduler> make_scheduler(SamplerKind kind, int64_t steps, Prediction prediction);

// Called after each step with its index and the latents it produced.
using StepCallback = std::function<void(int64_t step, const at::Tensor& latents)>;

// What the U-Net is conditioned on for one prompt: its text states (1, S, D) and, for SDXL, its vector (1, V).
struct UNetConditioning {
  at::Tensor context;
  at::Tensor vector;  // undefined for SD 1.x / 2.x
};

// The denoising loop. `noise` (B, 4, h, w) is unit normal noise; `cond` the prompt's conditioning and `uncond` the
// negative prompt's (its context undefined: no classifier-free guidance). With guidance the U-Net runs on the batch
// [uncond, cond] and the prediction is uncond + scale * (cond - uncond). Returns the final latents.
at::Tensor denoise(UNet2DConditionModel& unet, const Scheduler& scheduler, const at::Tensor& noise,
                   const UNetConditioning& cond, const UNetConditioning& uncond, double guidance_scale,
                   at::Generator& generator, const StepCallback& on_step = nullptr);

// kohya's sample-image size: width and height rounded down to a multiple of 8, at least 64.
std::pair<int64_t, int64_t> sample_width_height(const SampleOptions& options);

// kohya's defaults for SD and SDXL sample images: 30 steps, guidance 7.5.
inline int sd_sample_steps(const SampleOptions& options) { return options.steps.value_or(30); }
inline double sd_sample_scale(const SampleOptions& options) { return options.scale.value_or(7.5); }

// The seed a sample image is drawn with: options.seed, or a random one, logged with the image's settings.
uint64_t sample_seed(const SampleOptions& options, int64_t width, int64_t height);

// Decoded images (1, 3, H, W) in [-1, 1] -> (H, W, 3) uint8 RGB on the host, round(255 * clamp(image / 2 + 0.5, 0, 1)).
at::Tensor image_to_rgb8(const at::Tensor& images);

// kohya's sample-image text conditioning (lpw_stable_diffusion.get_weighted_text_embeddings, no_boseos_middle off):
// each 77-id window encoded on its own (clip_skip as in training), the windows concatenated to (1, 77n, D), the hidden
// states multiplied by the token weights and rescaled so that their mean stays what it was.
at::Tensor weighted_prompt_embeddings(ClipTextModel& text_encoder, const WeightedTokenChunks& tokens,
                                      std::optional<int64_t> clip_skip);

// One image for `options`: prompt (and, with guidance, negative prompt) -> embeddings -> noise from the seed ->
// denoise -> VAE decode. Width and height are rounded down to a multiple of 8, at least 64. Returns (H, W, 3) uint8
// RGB, round(255 * clamp(image / 2 + 0.5, 0, 1)).
at::Tensor sample_image(SdModels& models, const ClipTokenizer& tokenizer, const SampleOptions& options,
                        Prediction prediction, std::optional<int64_t> clip_skip);

}  // namespace sdt
