// The FLUX.1 transformer (Black Forest Labs' reference, as kohya-ss/sd-scripts' library/flux_models.py holds it) and
// Chroma (library/chroma_models.py), under the BFL checkpoint names:
//
//   packed latents (B, h/2 * w/2, 64) --img_in--> image stream;  T5 states (B, S, 4096) --txt_in--> text stream
//   vec = time_in(t) [+ guidance_in(g)] + vector_in(CLIP-L pooled)          (Chroma: per-block modulations, below)
//   19 double blocks: each stream modulated by vec, its own qkv (QK RMSNorm, RoPE), joint attention, its own MLP
//   38 single blocks over [text, image]: one linear to qkv and the MLP's hidden, attention, one linear back
//   final_layer: modulated LayerNorm, linear to (B, h/2 * w/2, 64)
//
// Positions: RoPE over three axes (16, 56, 56 of a head's 128 dimensions), from ids (B, L, 3): text tokens (0, 0, 0),
// image token (0, row, column).
//
// Chroma drops time_in, vector_in, guidance_in and every block's modulation layer: one "approximator" MLP maps
// (timestep, guidance, the index of each modulation) to all of them at once, without gradients. Its attention puts the
// image first ([image, text]) and each sample attends to its own text tokens plus one padding token only (the rest of
// the text rows come out as zeros), as chroma_models.py trims them.
//
// Blocks run through run_block (src/models/layers.h), so the block engine can shard, swap and recompute them.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include <torch/torch.h>

#include "src/models/layers.h"

namespace sdt {

struct FluxConfig {
  int64_t in_channels = 64;       // 16 latent channels x a 2x2 patch
  int64_t vec_in_dim = 768;       // CLIP-L's pooled output
  int64_t context_in_dim = 4096;  // T5-XXL's hidden size
  int64_t hidden_size = 3072;
  double mlp_ratio = 4.0;
  int64_t num_heads = 24;
  int64_t depth = 19;             // double blocks
  int64_t depth_single_blocks = 38;
  std::vector<int64_t> axes_dim{16, 56, 56};  // RoPE dimensions per id axis; they sum to the head size
  double theta = 10000;
  bool qkv_bias = true;
  bool guidance_embed = true;     // dev (guidance-distilled); schnell has no guidance_in
  bool chroma = false;
  int64_t approximator_in_dim = 64, approximator_depth = 5, approximator_hidden_size = 5120;  // Chroma only

  int64_t head_dim() const { return hidden_size / num_heads; }
  int64_t mlp_hidden() const { return static_cast<int64_t>(static_cast<double>(hidden_size) * mlp_ratio); }
  // Chroma's modulation vectors: 3 per single block, 12 per double block, 2 for the final layer.
  int64_t chroma_modulations() const { return 3 * depth_single_blocks + 12 * depth + 2; }
  static FluxConfig dev();
  static FluxConfig schnell();
  static FluxConfig chroma_base();
};

// RMSNorm over the last dimension in fp32 (eps 1e-6), weight named `scale`.
struct FluxRmsNormImpl : torch::nn::Module {
  explicit FluxRmsNormImpl(int64_t dim);
  at::Tensor forward(const at::Tensor& x);
  at::Tensor scale;
};
TORCH_MODULE(FluxRmsNorm);

struct QkNormImpl : torch::nn::Module {
  explicit QkNormImpl(int64_t head_dim);
  FluxRmsNorm query_norm{nullptr}, key_norm{nullptr};
};
TORCH_MODULE(QkNorm);

struct FluxSelfAttentionImpl : torch::nn::Module {
  FluxSelfAttentionImpl(int64_t dim, int64_t heads, bool qkv_bias);
  Linear qkv{nullptr}, proj{nullptr};
  QkNorm norm{nullptr};
};
TORCH_MODULE(FluxSelfAttention);

// `lin` of vec's SiLU -> 6 (double) or 3 (single) chunks: shift, scale, gate [, shift, scale, gate].
struct FluxModulationImpl : torch::nn::Module {
  FluxModulationImpl(int64_t dim, int64_t chunks);
  Linear lin{nullptr};
};
TORCH_MODULE(FluxModulation);

// Linear ("0") -> GELU (tanh) -> Linear ("2"), nn.Sequential's names.
struct FluxMlpImpl : torch::nn::Module {
  FluxMlpImpl(int64_t dim, int64_t hidden);
  at::Tensor forward(const at::Tensor& x);
  Linear in{nullptr}, out{nullptr};
};
TORCH_MODULE(FluxMlp);

// (img, txt, vec or Chroma's 12 modulations, pe, txt_mask) -> (img, txt). FLUX: the text rows come first in the joint
// attention; Chroma: the image rows.
struct DoubleStreamBlockImpl : torch::nn::Module {
  explicit DoubleStreamBlockImpl(const FluxConfig& config);
  std::pair<at::Tensor, at::Tensor> forward(const at::Tensor& img, const at::Tensor& txt, const at::Tensor& modulation,
                                            const at::Tensor& pe, const at::Tensor& txt_mask);

  FluxModulation img_mod{nullptr}, txt_mod{nullptr};  // FLUX only
  FluxSelfAttention img_attn{nullptr}, txt_attn{nullptr};
  FluxMlp img_mlp{nullptr}, txt_mlp{nullptr};
  int64_t heads;
  bool chroma;
};
TORCH_MODULE(DoubleStreamBlock);

// (x = the joined streams, vec or Chroma's 3 modulations, pe, txt_mask) -> x.
struct SingleStreamBlockImpl : torch::nn::Module {
  explicit SingleStreamBlockImpl(const FluxConfig& config);
  at::Tensor forward(const at::Tensor& x, const at::Tensor& modulation, const at::Tensor& pe, const at::Tensor& txt_mask);

  Linear linear1{nullptr}, linear2{nullptr};
  QkNorm norm{nullptr};
  FluxModulation modulation{nullptr};  // FLUX only
  int64_t hidden, mlp_hidden, heads;
  bool chroma;
};
TORCH_MODULE(SingleStreamBlock);

// in_layer -> SiLU -> out_layer.
struct MlpEmbedderImpl : torch::nn::Module {
  MlpEmbedderImpl(int64_t in_dim, int64_t hidden);
  at::Tensor forward(const at::Tensor& x);
  Linear in_layer{nullptr}, out_layer{nullptr};
};
TORCH_MODULE(MlpEmbedder);

// Chroma's distilled_guidance_layer: in_proj, then residual MlpEmbedders each after an RMSNorm, out_proj.
struct ChromaApproximatorImpl : torch::nn::Module {
  explicit ChromaApproximatorImpl(const FluxConfig& config);
  at::Tensor forward(const at::Tensor& x);
  Linear in_proj{nullptr}, out_proj{nullptr};
  torch::nn::ModuleList layers, norms;
};
TORCH_MODULE(ChromaApproximator);

struct FluxLastLayerImpl : torch::nn::Module {
  explicit FluxLastLayerImpl(const FluxConfig& config);
  at::Tensor forward(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale);
  Linear linear{nullptr};
  Linear adaLN_modulation{nullptr};  // FLUX only; registered as "adaLN_modulation.1" (after a SiLU)
};
TORCH_MODULE(FluxLastLayer);

struct FluxTransformerImpl : torch::nn::Module {
  // With BlockWeights::deferred the double and single blocks are built without weights, one at a time, so building
  // never holds more than one block's.
  explicit FluxTransformerImpl(FluxConfig config, BlockWeights blocks = BlockWeights::allocated);

  // kohya's Flux.forward / Chroma.forward: img (B, N, in_channels) packed latents, img_ids (B, N, 3), txt (B, S,
  // context_in_dim), txt_ids (B, S, 3), timesteps (B) in [0, 1] (kohya's timesteps / 1000), y (B, vec_in_dim) (unused by
  // Chroma), guidance (B) or undefined (schnell), txt_mask (B, S) of 0/1 or undefined (all tokens attend; Chroma
  // requires it) -> (B, N, in_channels).
  at::Tensor forward(const at::Tensor& img, const at::Tensor& img_ids, const at::Tensor& txt, const at::Tensor& txt_ids,
                     const at::Tensor& timesteps, const at::Tensor& y, const at::Tensor& guidance, const at::Tensor& txt_mask);
  // Chroma's modulation vectors (B, chroma_modulations(), hidden) from the approximator, without gradients.
  at::Tensor chroma_modulations(const at::Tensor& timesteps, const at::Tensor& guidance);
  // The double blocks, then the single blocks: the order forward runs them.
  std::vector<std::shared_ptr<torch::nn::Module>> blocks() const;

  FluxConfig config;
  bool gradient_checkpointing = false;
  BlockRunner* block_runner = nullptr;  // not owned
  Linear img_in{nullptr}, txt_in{nullptr};
  MlpEmbedder time_in{nullptr}, vector_in{nullptr}, guidance_in{nullptr};  // FLUX only (guidance_in: dev)
  ChromaApproximator distilled_guidance_layer{nullptr};                    // Chroma only
  torch::nn::ModuleList double_blocks, single_blocks;
  FluxLastLayer final_layer{nullptr};
};
TORCH_MODULE(FluxTransformer);

// FLUX's sinusoidal embedding of t in [0, 1]: timestep_embedding(1000 t, dim), cos first.
at::Tensor flux_timestep_embedding(const at::Tensor& t, int64_t dim);
// RoPE rotation matrices of ids (B, L, axes): (B, 1, L, head_dim / 2, 2, 2), fp32 (computed in fp64).
at::Tensor flux_rope(const at::Tensor& ids, const std::vector<int64_t>& axes_dim, double theta);

// The 2x2 packing of latents and its inverse (kohya's flux_utils): (B, C, 2h, 2w) <-> (B, h * w, 4C).
at::Tensor pack_latents(const at::Tensor& latents);
at::Tensor unpack_latents(const at::Tensor& packed, int64_t packed_height, int64_t packed_width);
// kohya's prepare_img_ids: (B, h * w, 3) of (0, row, column), fp32.
at::Tensor flux_image_ids(int64_t batch, int64_t packed_height, int64_t packed_width);

}  // namespace sdt
