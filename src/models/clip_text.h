// The CLIP text transformer (transformers' CLIPTextModel, and CLIPTextModelWithProjection with a projection_dim):
// SD 1.x's OpenAI ViT-L/14 text tower (quick_gelu), SD 2.x's OpenCLIP ViT-H text tower (gelu, 23 of its 24 layers,
// i.e. the penultimate layer), SDXL's ViT-L/14 and OpenCLIP ViT-bigG/14 with its projection. Parameters carry the
// transformers names, `text_model.embeddings.token_embedding.weight` ..., `text_projection.weight`, so a diffusers
// `text_encoder/` state dict maps onto named_parameters() one to one.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "src/models/layers.h"

namespace sdt {

struct ClipTextConfig {
  int64_t vocab_size = 49408;
  int64_t hidden_size = 768;
  int64_t intermediate_size = 3072;
  int64_t num_layers = 12;
  int64_t num_heads = 12;
  int64_t max_positions = 77;
  std::string act = "quick_gelu";  // "quick_gelu" (SD1) or "gelu" (SD2)
  double layer_norm_eps = 1e-5;
  // Pooling picks the EOS position: with the legacy eos id 2 (SD1 configs) it is the argmax of the ids (EOS is the
  // largest id), otherwise the first position holding eos_token_id, as transformers does.
  int64_t eos_token_id = 2;
  // CLIPTextModelWithProjection: text_projection (hidden -> projection_dim, no bias) on the pooled output; 0: none.
  int64_t projection_dim = 0;

  static ClipTextConfig sd1();        // openai/clip-vit-large-patch14 (also SDXL's first text encoder)
  static ClipTextConfig sd2();        // OpenCLIP ViT-H/14 minus its last layer, as stabilityai/stable-diffusion-2 ships it
  static ClipTextConfig sdxl_bigg();  // OpenCLIP ViT-bigG/14 with its projection, SDXL's second text encoder
};

struct ClipTextOutput {
  at::Tensor last_hidden_state;             // (B, S, D) after final_layer_norm
  at::Tensor pooled;                        // (B, D) last_hidden_state at each sequence's EOS
  at::Tensor text_embeds;                   // (B, projection_dim) text_projection(pooled); undefined without one
  std::vector<at::Tensor> hidden_states;    // num_layers + 1 tensors (B, S, D): embeddings, then each layer's output
};

struct ClipAttentionImpl : torch::nn::Module {
  ClipAttentionImpl(int64_t hidden, int64_t heads);
  at::Tensor forward(const at::Tensor& x);  // (B, S, D) -> (B, S, D), causal

  Linear q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr}, out_proj{nullptr};
  int64_t heads;
};
TORCH_MODULE(ClipAttention);

struct ClipMlpImpl : torch::nn::Module {
  ClipMlpImpl(int64_t hidden, int64_t intermediate, std::string act);
  at::Tensor forward(const at::Tensor& x);

  Linear fc1{nullptr}, fc2{nullptr};
  std::string act;
};
TORCH_MODULE(ClipMlp);

// Pre-LayerNorm encoder layer: x + attn(ln1(x)), then x + mlp(ln2(x)).
struct ClipEncoderLayerImpl : torch::nn::Module {
  explicit ClipEncoderLayerImpl(const ClipTextConfig& config);
  at::Tensor forward(const at::Tensor& x);

  torch::nn::LayerNorm layer_norm1{nullptr}, layer_norm2{nullptr};
  ClipAttention self_attn{nullptr};
  ClipMlp mlp{nullptr};
};
TORCH_MODULE(ClipEncoderLayer);

struct ClipEmbeddingsImpl : torch::nn::Module {
  explicit ClipEmbeddingsImpl(const ClipTextConfig& config);
  at::Tensor forward(const at::Tensor& ids);  // (B, S) int64 -> (B, S, D)

  torch::nn::Embedding token_embedding{nullptr}, position_embedding{nullptr};
};
TORCH_MODULE(ClipEmbeddings);

struct ClipEncoderImpl : torch::nn::Module {
  explicit ClipEncoderImpl(const ClipTextConfig& config);
  torch::nn::ModuleList layers;
};
TORCH_MODULE(ClipEncoder);

// `text_model.{embeddings, encoder, final_layer_norm}`, the layout of transformers' CLIPTextModel.
struct ClipTextTransformerImpl : torch::nn::Module {
  explicit ClipTextTransformerImpl(const ClipTextConfig& config);

  ClipEmbeddings embeddings{nullptr};
  ClipEncoder encoder{nullptr};
  torch::nn::LayerNorm final_layer_norm{nullptr};
};
TORCH_MODULE(ClipTextTransformer);

struct ClipTextModelImpl : torch::nn::Module {
  explicit ClipTextModelImpl(ClipTextConfig config);
  ClipTextOutput forward(const at::Tensor& ids);  // (B, S) int64, S <= max_positions

  // What the U-Net is conditioned on, as kohya's SdTextEncodingStrategy computes it: without clip_skip the last
  // layer's output after final_layer_norm; with clip_skip = k the output of hidden_states[-k] after final_layer_norm
  // (k = 1 is the same as none). (B, S) -> (B, S, D).
  at::Tensor encode(const at::Tensor& ids, std::optional<int64_t> clip_skip = std::nullopt);

  ClipTextConfig config;
  ClipTextTransformer text_model{nullptr};
  Linear text_projection{nullptr};  // with config.projection_dim only
};
TORCH_MODULE(ClipTextModel);

// kohya's long prompts: ids (B, n, 77) from a tokenizer with max_token_length 75n are encoded as B*n sequences of 77
// and stitched back to (B, 2 + 75n, D): the first chunk's BOS, tokens 1..75 of every chunk, the last chunk's final
// token. n = 1 gives the plain (B, 77, D).
at::Tensor encode_prompt_chunks(ClipTextModel& model, const at::Tensor& ids, std::optional<int64_t> clip_skip = std::nullopt);

// The stitching of encode_prompt_chunks on states already computed: (B * n, 77, D) -> (B, 2 + 75n, D); n = 1 gives
// (B, 77, D).
at::Tensor stitch_prompt_chunks(const at::Tensor& hidden, int64_t batch);

// kohya's encode_tokens_with_weights on stitched states (B, 2 + 75n, D) with the tokenizer's per-id weights
// (B, n, 77): one window's weights multiply all 77 positions; with several windows each window's 75 text weights
// multiply its stretch of the stitched states, whose first and last positions keep weight 1.
at::Tensor weight_prompt_chunks(const at::Tensor& hidden, const at::Tensor& weights);

}  // namespace sdt
