#include "src/models/vae.h"

#include "src/core/error.h"

namespace sdt {

namespace nn = torch::nn;

namespace {
constexpr double kVaeEps = 1e-6;  // every GroupNorm of the SD VAE
}

VaeConfig VaeConfig::sd() { return {}; }

VaeConfig VaeConfig::flux() {
  VaeConfig c;
  c.latent_channels = 16;
  c.scaling_factor = 0.3611;
  c.shift_factor = 0.1159;
  c.use_quant_conv = false;
  return c;
}

at::Tensor DiagonalGaussian::sample(std::optional<at::Generator> generator) const {
  if (!generator) return mean + std() * at::randn(mean.sizes(), mean.options());
  return mean + std() * randn_from_host(mean.sizes(), *generator, mean.options());
}

VaeAttentionImpl::VaeAttentionImpl(int64_t channels, int64_t groups) {
  group_norm = register_module("group_norm", nn::GroupNorm(nn::GroupNormOptions(groups, channels).eps(kVaeEps)));
  to_q = register_module("to_q", Linear(channels, channels));
  to_k = register_module("to_k", Linear(channels, channels));
  to_v = register_module("to_v", Linear(channels, channels));
  to_out = register_module("to_out", nn::ModuleList(Linear(channels, channels)));
}

at::Tensor VaeAttentionImpl::forward(const at::Tensor& x) {
  const int64_t b = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  at::Tensor tokens = group_norm(x).view({b, c, h * w}).transpose(1, 2);  // (B, HW, C)
  at::Tensor out = multi_head_attention(to_q(tokens), to_k(tokens), to_v(tokens), /*heads=*/1);
  out = to_out[0]->as<Linear>()->forward(out);                        // (B, HW, C)
  return out.transpose(1, 2).reshape({b, c, h, w}) + x;
}

VaeMidBlockImpl::VaeMidBlockImpl(int64_t channels, int64_t groups) {
  resnets = register_module("resnets", nn::ModuleList(ResnetBlock2D(channels, channels, 0, groups, kVaeEps),
                                                      ResnetBlock2D(channels, channels, 0, groups, kVaeEps)));
  attentions = register_module("attentions", nn::ModuleList(VaeAttention(channels, groups)));
}

at::Tensor VaeMidBlockImpl::forward(const at::Tensor& x) {
  at::Tensor h = resnets[0]->as<ResnetBlock2D>()->forward(x);
  h = attentions[0]->as<VaeAttention>()->forward(h);
  return resnets[1]->as<ResnetBlock2D>()->forward(h);
}

VaeLevelImpl::VaeLevelImpl(int64_t in_channels, int64_t out_channels, int64_t num_resnets, int64_t groups, bool down,
                           bool resample) {
  resnets = register_module("resnets", nn::ModuleList());
  for (int64_t i = 0; i < num_resnets; ++i) {
    resnets->push_back(ResnetBlock2D(i == 0 ? in_channels : out_channels, out_channels, 0, groups, kVaeEps));
  }
  if (resample && down) downsamplers = register_module("downsamplers", nn::ModuleList(Downsample2D(out_channels, true)));
  if (resample && !down) upsamplers = register_module("upsamplers", nn::ModuleList(Upsample2D(out_channels)));
}

at::Tensor VaeLevelImpl::forward(const at::Tensor& x) {
  at::Tensor h = x;
  for (const auto& resnet : *resnets) h = resnet->as<ResnetBlock2D>()->forward(h);
  if (!downsamplers->is_empty()) h = downsamplers[0]->as<Downsample2D>()->forward(h);
  if (!upsamplers->is_empty()) h = upsamplers[0]->as<Upsample2D>()->forward(h);
  return h;
}

VaeEncoderImpl::VaeEncoderImpl(const VaeConfig& c) {
  const auto& channels = c.block_out_channels;
  const auto levels = static_cast<int64_t>(channels.size());
  conv_in = register_module("conv_in", Conv2d(nn::Conv2dOptions(c.in_channels, channels[0], 3).padding(1)));
  down_blocks = register_module("down_blocks", nn::ModuleList());
  for (int64_t i = 0; i < levels; ++i) {
    down_blocks->push_back(VaeLevel(channels[i == 0 ? 0 : i - 1], channels[i], c.layers_per_block, c.norm_num_groups,
                                    /*down=*/true, /*resample=*/i + 1 < levels));
  }
  mid_block = register_module("mid_block", VaeMidBlock(channels.back(), c.norm_num_groups));
  conv_norm_out =
      register_module("conv_norm_out", nn::GroupNorm(nn::GroupNormOptions(c.norm_num_groups, channels.back()).eps(kVaeEps)));
  conv_out = register_module("conv_out",
                             Conv2d(nn::Conv2dOptions(channels.back(), 2 * c.latent_channels, 3).padding(1)));
}

at::Tensor VaeEncoderImpl::forward(const at::Tensor& x) {
  at::Tensor h = conv_in(x);
  for (const auto& level : *down_blocks) h = level->as<VaeLevel>()->forward(h);
  h = mid_block(h);
  return conv_out(at::silu(conv_norm_out(h)));
}

VaeDecoderImpl::VaeDecoderImpl(const VaeConfig& c) {
  const std::vector<int64_t> channels(c.block_out_channels.rbegin(), c.block_out_channels.rend());  // deepest first
  const auto levels = static_cast<int64_t>(channels.size());
  conv_in = register_module("conv_in", Conv2d(nn::Conv2dOptions(c.latent_channels, channels[0], 3).padding(1)));
  mid_block = register_module("mid_block", VaeMidBlock(channels[0], c.norm_num_groups));
  up_blocks = register_module("up_blocks", nn::ModuleList());
  for (int64_t i = 0; i < levels; ++i) {
    up_blocks->push_back(VaeLevel(channels[i == 0 ? 0 : i - 1], channels[i], c.layers_per_block + 1, c.norm_num_groups,
                                  /*down=*/false, /*resample=*/i + 1 < levels));
  }
  conv_norm_out =
      register_module("conv_norm_out", nn::GroupNorm(nn::GroupNormOptions(c.norm_num_groups, channels.back()).eps(kVaeEps)));
  conv_out = register_module("conv_out", Conv2d(nn::Conv2dOptions(channels.back(), c.out_channels, 3).padding(1)));
}

at::Tensor VaeDecoderImpl::forward(const at::Tensor& z) {
  at::Tensor h = mid_block(conv_in(z));
  for (const auto& level : *up_blocks) h = level->as<VaeLevel>()->forward(h);
  return conv_out(at::silu(conv_norm_out(h)));
}

AutoencoderKLImpl::AutoencoderKLImpl(VaeConfig config) : config(std::move(config)) {
  const int64_t latent = this->config.latent_channels;
  encoder = register_module("encoder", VaeEncoder(this->config));
  decoder = register_module("decoder", VaeDecoder(this->config));
  if (this->config.use_quant_conv) {
    quant_conv = register_module("quant_conv", Conv2d(nn::Conv2dOptions(2 * latent, 2 * latent, 1)));
    post_quant_conv = register_module("post_quant_conv", Conv2d(nn::Conv2dOptions(latent, latent, 1)));
  }
}

int64_t AutoencoderKLImpl::downscale_factor() const { return int64_t{1} << (config.block_out_channels.size() - 1); }

namespace {

// Runs `run` on overlapping tiles of `x` (tile `in_tile` pixels, stride in_tile * (1 - overlap)) and assembles the
// outputs (tiles of `out_tile`), blending each tile into the one above and the one to the left over `out_tile *
// overlap` rows/columns, then keeping its first out_tile - blend rows and columns. This is diffusers' tiled_encode /
// tiled_decode step for step, including that blending writes into the tiles, so later tiles blend with already
// blended neighbours.
at::Tensor run_tiled(const at::Tensor& x, int64_t in_tile, int64_t out_tile, double overlap,
                     const std::function<at::Tensor(const at::Tensor&)>& run) {
  const auto stride = static_cast<int64_t>(static_cast<double>(in_tile) * (1 - overlap));
  const auto blend = static_cast<int64_t>(static_cast<double>(out_tile) * overlap);
  const int64_t keep = out_tile - blend;
  std::vector<std::vector<at::Tensor>> rows;
  for (int64_t i = 0; i < x.size(2); i += stride) {
    std::vector<at::Tensor> row;
    for (int64_t j = 0; j < x.size(3); j += stride) {
      row.push_back(run(x.slice(2, i, i + in_tile).slice(3, j, j + in_tile)).clone());
    }
    rows.push_back(std::move(row));
  }
  // b's first rows (dim 2) or columns (dim 3) fade from a's last ones into b's own.
  auto blend_into = [](const at::Tensor& a, at::Tensor& b, int64_t dim, int64_t extent) {
    extent = std::min({a.size(dim), b.size(dim), extent});
    for (int64_t y = 0; y < extent; ++y) {
      const double t = static_cast<double>(y) / static_cast<double>(extent);
      b.select(dim, y).copy_(a.select(dim, a.size(dim) - extent + y) * (1 - t) + b.select(dim, y) * t);
    }
  };
  std::vector<at::Tensor> result_rows;
  for (size_t i = 0; i < rows.size(); ++i) {
    std::vector<at::Tensor> kept;
    for (size_t j = 0; j < rows[i].size(); ++j) {
      at::Tensor& tile = rows[i][j];
      if (i > 0) blend_into(rows[i - 1][j], tile, 2, blend);
      if (j > 0) blend_into(rows[i][j - 1], tile, 3, blend);
      kept.push_back(tile.slice(2, 0, keep).slice(3, 0, keep));
    }
    result_rows.push_back(at::cat(kept, 3));
  }
  return at::cat(result_rows, 2);
}

// Applies `run` to each image of the batch separately when slicing, else to the whole batch.
at::Tensor per_image(const at::Tensor& x, bool slice, const std::function<at::Tensor(const at::Tensor&)>& run) {
  if (!slice || x.size(0) == 1) return run(x);
  std::vector<at::Tensor> outs;
  for (const at::Tensor& one : x.split(1)) outs.push_back(run(one));
  return at::cat(outs);
}

}  // namespace

at::Tensor AutoencoderKLImpl::encode_moments(const at::Tensor& images, const VaeSplit& split) {
  if (images.dim() != 4 || images.size(1) != config.in_channels) {
    fail("VAE encode", "expected images (batch, {}, height, width), got {}", config.in_channels, c10::str(images.sizes()));
  }
  auto whole = [&](const at::Tensor& x) { return config.use_quant_conv ? quant_conv(encoder(x)) : encoder(x); };
  return per_image(images, split.slice_batch, [&](const at::Tensor& x) {
    if (split.tile && (x.size(2) > split.tile_sample_size || x.size(3) > split.tile_sample_size)) {
      return run_tiled(x, split.tile_sample_size, split.tile_sample_size / downscale_factor(), split.tile_overlap, whole);
    }
    return whole(x);
  });
}

DiagonalGaussian AutoencoderKLImpl::encode(const at::Tensor& images, const VaeSplit& split) {
  auto moments = encode_moments(images, split).chunk(2, 1);  // 2 x (B, latent, h, w)
  return {moments[0], at::clamp(moments[1], -30.0, 20.0)};
}

at::Tensor AutoencoderKLImpl::decode(const at::Tensor& latents, const VaeSplit& split) {
  if (latents.dim() != 4 || latents.size(1) != config.latent_channels) {
    fail("VAE decode", "expected latents (batch, {}, height, width), got {}", config.latent_channels, c10::str(latents.sizes()));
  }
  auto whole = [&](const at::Tensor& z) { return decoder(config.use_quant_conv ? post_quant_conv(z) : z); };
  const int64_t latent_tile = split.tile_sample_size / downscale_factor();
  return per_image(latents, split.slice_batch, [&](const at::Tensor& z) {
    if (split.tile && (z.size(2) > latent_tile || z.size(3) > latent_tile)) {
      return run_tiled(z, latent_tile, split.tile_sample_size, split.tile_overlap, whole);
    }
    return whole(z);
  });
}

at::Tensor images_to_latents(AutoencoderKL& vae, const at::Tensor& images, std::optional<at::Generator> generator,
                             const VaeSplit& split) {
  return (vae->encode(images, split).sample(std::move(generator)) - vae->config.shift_factor) * vae->config.scaling_factor;
}

at::Tensor latents_to_images(AutoencoderKL& vae, const at::Tensor& latents, const VaeSplit& split) {
  return vae->decode(latents / vae->config.scaling_factor + vae->config.shift_factor, split);
}

}  // namespace sdt
