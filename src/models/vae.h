// The VAE of SD, SDXL and FLUX, diffusers AutoencoderKL: images (B, 3, H, W) in [-1, 1] <-> latents (B, 4 or 16, H/8,
// W/8) (FLUX's autoencoder: 16 channels, no quant convs, a shift before the scale). Parameters carry
// the diffusers names (`encoder.down_blocks.0.resnets.0.conv1.weight` ...), so a diffusers `vae/` state dict maps
// onto named_parameters() one to one.
#pragma once

#include <optional>
#include <vector>

#include <torch/torch.h>

#include "src/models/layers.h"

namespace sdt {

struct VaeConfig {
  int64_t in_channels = 3;
  int64_t out_channels = 3;
  int64_t latent_channels = 4;
  std::vector<int64_t> block_out_channels{128, 256, 512, 512};
  int64_t layers_per_block = 2;
  int64_t norm_num_groups = 32;
  double scaling_factor = 0.18215;  // latents for the denoiser are (sample - shift_factor) * scaling_factor
  double shift_factor = 0.0;
  bool use_quant_conv = true;       // the 1x1 quant_conv after the encoder and post_quant_conv before the decoder

  static VaeConfig sd();
  // FLUX.1's autoencoder (BFL's ae.safetensors, kohya's AutoEncoderParams for FLUX): 16 latent channels.
  static VaeConfig flux();
};

// How to split large inputs. Slicing runs the batch one image at a time (identical results, less memory). Tiling
// (diffusers tiled_encode / tiled_decode) runs overlapping tiles of tile_sample_size pixels and blends the overlaps
// linearly; it changes results slightly and is used only when an input is larger than a tile.
struct VaeSplit {
  bool slice_batch = false;
  bool tile = false;
  int64_t tile_sample_size = 512;
  double tile_overlap = 0.25;
};

// The posterior of one encode: mean and log-variance (clamped to [-30, 20]), each (B, latent_channels, h, w).
struct DiagonalGaussian {
  at::Tensor mean;
  at::Tensor logvar;
  at::Tensor std() const { return at::exp(0.5 * logvar); }
  // mean + std * noise, the noise drawn in the latents' dtype from `generator` (the same numbers torch.randn draws
  // from a torch.Generator with the same seed on the CPU).
  at::Tensor sample(std::optional<at::Generator> generator = std::nullopt) const;
};

// diffusers Attention as the VAE mid block uses it: one head over all pixels, GroupNorm first, residual added.
struct VaeAttentionImpl : torch::nn::Module {
  VaeAttentionImpl(int64_t channels, int64_t groups);
  at::Tensor forward(const at::Tensor& x);  // (B, C, H, W) -> (B, C, H, W)

  torch::nn::GroupNorm group_norm{nullptr};
  Linear to_q{nullptr}, to_k{nullptr}, to_v{nullptr};
  torch::nn::ModuleList to_out;  // [Linear]
};
TORCH_MODULE(VaeAttention);

// UNetMidBlock2D without time embedding: resnet, attention, resnet.
struct VaeMidBlockImpl : torch::nn::Module {
  VaeMidBlockImpl(int64_t channels, int64_t groups);
  at::Tensor forward(const at::Tensor& x);

  torch::nn::ModuleList resnets, attentions;
};
TORCH_MODULE(VaeMidBlock);

// DownEncoderBlock2D / UpDecoderBlock2D: resnets, then an optional resampler.
struct VaeLevelImpl : torch::nn::Module {
  VaeLevelImpl(int64_t in_channels, int64_t out_channels, int64_t num_resnets, int64_t groups, bool down, bool resample);
  at::Tensor forward(const at::Tensor& x);

  torch::nn::ModuleList resnets, downsamplers, upsamplers;
};
TORCH_MODULE(VaeLevel);

struct VaeEncoderImpl : torch::nn::Module {
  explicit VaeEncoderImpl(const VaeConfig& config);
  at::Tensor forward(const at::Tensor& x);  // (B, 3, H, W) -> (B, 2 * latent_channels, H/f, W/f)

  Conv2d conv_in{nullptr}, conv_out{nullptr};
  torch::nn::ModuleList down_blocks;
  VaeMidBlock mid_block{nullptr};
  torch::nn::GroupNorm conv_norm_out{nullptr};
};
TORCH_MODULE(VaeEncoder);

struct VaeDecoderImpl : torch::nn::Module {
  explicit VaeDecoderImpl(const VaeConfig& config);
  at::Tensor forward(const at::Tensor& z);  // (B, latent_channels, h, w) -> (B, 3, h*f, w*f)

  Conv2d conv_in{nullptr}, conv_out{nullptr};
  VaeMidBlock mid_block{nullptr};
  torch::nn::ModuleList up_blocks;
  torch::nn::GroupNorm conv_norm_out{nullptr};
};
TORCH_MODULE(VaeDecoder);

struct AutoencoderKLImpl : torch::nn::Module {
  explicit AutoencoderKLImpl(VaeConfig config);

  DiagonalGaussian encode(const at::Tensor& images, const VaeSplit& split = {});  // (B, 3, H, W) in [-1, 1]
  at::Tensor decode(const at::Tensor& latents, const VaeSplit& split = {});       // unscaled latents -> images
  int64_t downscale_factor() const;                                                // 8 for SD

  VaeConfig config;
  VaeEncoder encoder{nullptr};
  VaeDecoder decoder{nullptr};
  Conv2d quant_conv{nullptr}, post_quant_conv{nullptr};  // with use_quant_conv only

 private:
  at::Tensor encode_moments(const at::Tensor& images, const VaeSplit& split);  // (B, 2 * latent_channels, h, w)
};
TORCH_MODULE(AutoencoderKL);

// What training and caching use: images -> the denoiser's latents (a posterior sample, shifted and scaled), and back.
at::Tensor images_to_latents(AutoencoderKL& vae, const at::Tensor& images, std::optional<at::Generator> generator = std::nullopt,
                             const VaeSplit& split = {});
at::Tensor latents_to_images(AutoencoderKL& vae, const at::Tensor& latents, const VaeSplit& split = {});

}  // namespace sdt
