// The SD 1.x / 2.x and SDXL denoiser, diffusers UNet2DConditionModel: noisy latents (B, 4, h, w), timesteps (B), text
// states (B, S, D) and, for SDXL, the vector conditioning (B, 2816) -> the noise (or v) prediction (B, 4, h, w).
// Parameters carry the diffusers names
// (`down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight` ...), so a diffusers `unet/` state dict maps
// onto named_parameters() one to one.
#pragma once

#include <vector>

#include <torch/torch.h>

#include "src/models/layers.h"

namespace sdt {

struct UNetConfig {
  int64_t in_channels = 4;
  int64_t out_channels = 4;
  std::vector<int64_t> block_out_channels{320, 640, 1280, 1280};
  // Per level: CrossAttnDownBlock2D (true) or DownBlock2D; per up level: CrossAttnUpBlock2D or UpBlock2D.
  std::vector<bool> down_attention{true, true, true, false};
  std::vector<bool> up_attention{false, true, true, true};
  int64_t layers_per_block = 2;
  // Attention heads per level (the mid block uses the last). diffusers' config calls this `attention_head_dim`, but
  // UNet2DConditionModel uses it as the head count: SD1's 8 gives 8 heads of 40..160 channels, SD2's [5, 10, 20, 20]
  // gives heads of 64 channels.
  std::vector<int64_t> num_heads{8, 8, 8, 8};
  // BasicTransformerBlocks per Transformer2D, per level (diffusers' transformer_layers_per_block; the mid block uses
  // the last, an up level its mirror's): SDXL's [1, 2, 10].
  std::vector<int64_t> transformer_layers{1, 1, 1, 1};
  int64_t cross_attention_dim = 768;
  bool use_linear_projection = false;  // SD2: proj_in / proj_out are Linear instead of 1x1 Conv2d
  int64_t norm_num_groups = 32;
  double norm_eps = 1e-5;
  // SDXL's vector conditioning (diffusers' addition_embed_type "text_time"): a (B, vector_conditioning_dim) vector
  // through `add_embedding` (SGM's label_emb) added to the time embedding; 0: none. SDXL's 2816 is the pooled text
  // embedding (1280) and six sizes embedded with addition_time_embed_dim (256) channels each.
  int64_t vector_conditioning_dim = 0;
  int64_t addition_time_embed_dim = 256;

  static UNetConfig sd1();
  static UNetConfig sd2();   // SD 2.0 / 2.1 (512 and 768-v use the same U-Net)
  static UNetConfig sdxl();  // SDXL base 1.0 and its fine-tunes
};

// diffusers Attention without biases on q/k/v: self-attention (context undefined) or cross-attention.
struct CrossAttentionImpl : torch::nn::Module {
  CrossAttentionImpl(int64_t dim, int64_t context_dim, int64_t heads);
  at::Tensor forward(const at::Tensor& x, const at::Tensor& context = {});  // (B, N, C), (B, S, D) -> (B, N, C)

  Linear to_q{nullptr}, to_k{nullptr}, to_v{nullptr};
  torch::nn::ModuleList to_out;  // [Linear]
  int64_t heads;
};
TORCH_MODULE(CrossAttention);

// GEGLU feed-forward: `net.0.proj` (C -> 2 * 4C), gelu-gated, `net.2` (4C -> C); net.1 is diffusers' dropout.
struct FeedForwardImpl : torch::nn::Module {
  explicit FeedForwardImpl(int64_t dim);
  at::Tensor forward(const at::Tensor& x);

  torch::nn::ModuleList net;
  Linear proj{nullptr}, out{nullptr};  // net[0].proj, net[2]
};
TORCH_MODULE(FeedForward);

// x + self-attn(LN x), x + cross-attn(LN x, context), x + ff(LN x).
struct BasicTransformerBlockImpl : torch::nn::Module {
  BasicTransformerBlockImpl(int64_t dim, int64_t context_dim, int64_t heads);
  at::Tensor forward(const at::Tensor& x, const at::Tensor& context);

  torch::nn::LayerNorm norm1{nullptr}, norm2{nullptr}, norm3{nullptr};
  CrossAttention attn1{nullptr}, attn2{nullptr};
  FeedForward ff{nullptr};
};
TORCH_MODULE(BasicTransformerBlock);

// Transformer2DModel: GroupNorm, proj_in, `depth` BasicTransformerBlocks over the h*w pixels, proj_out, residual.
struct Transformer2DImpl : torch::nn::Module {
  Transformer2DImpl(int64_t channels, int64_t context_dim, int64_t heads, int64_t depth, int64_t groups,
                    bool linear_projection);
  at::Tensor forward(const at::Tensor& x, const at::Tensor& context);  // (B, C, H, W), (B, S, D) -> (B, C, H, W)

  torch::nn::GroupNorm norm{nullptr};
  Conv2d proj_in_conv{nullptr}, proj_out_conv{nullptr};        // SD1, registered as proj_in / proj_out
  Linear proj_in_linear{nullptr}, proj_out_linear{nullptr};    // SD2, registered as proj_in / proj_out
  torch::nn::ModuleList transformer_blocks;
};
TORCH_MODULE(Transformer2D);

// linear_1 -> SiLU -> linear_2 on the sinusoidal embedding: (B, C0) -> (B, 4 * C0).
struct TimestepEmbeddingImpl : torch::nn::Module {
  TimestepEmbeddingImpl(int64_t channels, int64_t dim);
  at::Tensor forward(const at::Tensor& x);

  Linear linear_1{nullptr}, linear_2{nullptr};
};
TORCH_MODULE(TimestepEmbedding);

// What every block of one forward needs besides its input.
struct UNetStep {
  at::Tensor temb;      // (B, 4 * C0)
  at::Tensor context;   // (B, S, D)
  bool checkpoint;      // recompute each ResNet and Transformer2D in backward instead of keeping activations
  BlockRunner* runner;  // when set, runs each ResNet and Transformer2D (sharded weights); else plain or checkpointed
};

// A down level (CrossAttnDownBlock2D / DownBlock2D) or an up level (CrossAttnUpBlock2D / UpBlock2D).
struct UNetLevelImpl : torch::nn::Module {
  torch::nn::ModuleList resnets, attentions, downsamplers, upsamplers;

  at::Tensor resnet(size_t i, const at::Tensor& x, const UNetStep& step);
  at::Tensor attention(size_t i, const at::Tensor& x, const UNetStep& step);
};
TORCH_MODULE(UNetLevel);

struct UNet2DConditionModelImpl : torch::nn::Module {
  explicit UNet2DConditionModelImpl(UNetConfig config);

  // sample (B, in, h, w), timesteps (B) or a single value, context (B, S, cross_attention_dim), and with
  // config.vector_conditioning_dim the vector (B, vector_conditioning_dim) -> (B, out, h, w). Any h, w: upsampling
  // follows the skip connections' sizes.
  at::Tensor forward(const at::Tensor& sample, const at::Tensor& timesteps, const at::Tensor& context,
                     const at::Tensor& vector = {});

  // The ResNets and Transformer2Ds in the order forward runs them: the blocks a BlockRunner runs, which hold all
  // weights but the stem, the head and the down/upsamplers.
  std::vector<std::shared_ptr<torch::nn::Module>> blocks() const;

  UNetConfig config;
  bool gradient_checkpointing = false;  // only acts while grad mode is on
  BlockRunner* block_runner = nullptr;  // not owned; see BlockRunner

  TimestepEmbedding time_embedding{nullptr};
  TimestepEmbedding add_embedding{nullptr};  // with vector conditioning only
  Conv2d conv_in{nullptr}, conv_out{nullptr};
  torch::nn::ModuleList down_blocks, up_blocks;
  UNetLevel mid_block{nullptr};
  torch::nn::GroupNorm conv_norm_out{nullptr};
};
TORCH_MODULE(UNet2DConditionModel);

// SDXL's size conditioning (kohya's get_size_embeddings, diffusers' add_time_proj): each of the k values of a row
// (original height and width, crop top and left, target height and width) through timestep_embedding with `dim`
// channels, concatenated: (B, k) -> (B, k * dim) in fp32.
at::Tensor size_embedding(const at::Tensor& sizes, int64_t dim);

}  // namespace sdt
