// The T5 encoder (transformers' T5EncoderModel) that FLUX.1, Chroma and SD3 condition on: T5 v1.1 (gated GELU
// feed-forward, untied embeddings; FLUX's T5-XXL: d_model 4096, 24 layers, 64 heads of 64, d_ff 10240). Parameters
// carry transformers' names (`shared.weight`, `encoder.block.0.layer.0.SelfAttention.q.weight` ...), so its state
// dict maps onto named_parameters() one to one (files that hold the embedding as `encoder.embed_tokens.weight` too,
// or only, are read by the loader).
//
// Each layer: RMS-normalised (no mean, no bias) input -> self-attention without the 1/sqrt(d) scaling, plus a
// relative-position bias that the first layer computes from 32 buckets (exact up to 8 apart, logarithmic up to 128)
// and every layer shares; then the gated feed-forward. In fp16 the hidden states are clamped after every layer so an
// overflow does not turn into inf (transformers' guard).
#pragma once

#include <cstdint>

#include <torch/torch.h>

#include "src/models/layers.h"

namespace sdt {

struct T5Config {
  int64_t vocab_size = 32128;
  int64_t d_model = 4096;
  int64_t d_kv = 64;
  int64_t d_ff = 10240;
  int64_t num_layers = 24;
  int64_t num_heads = 64;
  int64_t relative_attention_num_buckets = 32;
  int64_t relative_attention_max_distance = 128;
  double layer_norm_epsilon = 1e-6;

  static T5Config xxl();  // google/t5-v1_1-xxl, FLUX's and SD3's
};

// Reads a transformers T5 config.json; an encoder sdt cannot run (another feed-forward than gated-gelu, ...) is an
// sdt::Error naming the setting.
T5Config read_t5_config(const std::string& config_json);

struct T5LayerNormImpl : torch::nn::Module {
  T5LayerNormImpl(int64_t dim, double eps);
  at::Tensor forward(const at::Tensor& x);
  at::Tensor weight;
  double eps;
};
TORCH_MODULE(T5LayerNorm);

struct T5AttentionImpl : torch::nn::Module {
  T5AttentionImpl(const T5Config& config, bool has_relative_attention_bias);
  // x (B, L, d_model), bias (1 or B, H, L, L) with the mask folded in -> (B, L, d_model).
  at::Tensor forward(const at::Tensor& x, const at::Tensor& bias);
  // The relative-position bias (1, H, L, L) of a sequence of `length` tokens.
  at::Tensor position_bias(int64_t length);

  Linear q{nullptr}, k{nullptr}, v{nullptr}, o{nullptr};
  torch::nn::Embedding relative_attention_bias{nullptr};  // the first layer only
  int64_t heads, d_kv, buckets, max_distance;
};
TORCH_MODULE(T5Attention);

struct T5LayerSelfAttentionImpl : torch::nn::Module {
  T5LayerSelfAttentionImpl(const T5Config& config, bool has_relative_attention_bias);
  T5Attention SelfAttention{nullptr};
  T5LayerNorm layer_norm{nullptr};
};
TORCH_MODULE(T5LayerSelfAttention);

struct T5DenseGatedActDenseImpl : torch::nn::Module {
  explicit T5DenseGatedActDenseImpl(const T5Config& config);
  at::Tensor forward(const at::Tensor& x);  // wo(gelu_new(wi_0 x) * wi_1 x)
  Linear wi_0{nullptr}, wi_1{nullptr}, wo{nullptr};
};
TORCH_MODULE(T5DenseGatedActDense);

struct T5LayerFFImpl : torch::nn::Module {
  explicit T5LayerFFImpl(const T5Config& config);
  T5DenseGatedActDense DenseReluDense{nullptr};
  T5LayerNorm layer_norm{nullptr};
};
TORCH_MODULE(T5LayerFF);

// One encoder layer: `layer.0` self-attention, `layer.1` feed-forward, each residual.
struct T5BlockImpl : torch::nn::Module {
  T5BlockImpl(const T5Config& config, bool has_relative_attention_bias);
  at::Tensor forward(const at::Tensor& x, const at::Tensor& bias);
  T5LayerSelfAttention self_attention{nullptr};
  T5LayerFF feed_forward{nullptr};
  torch::nn::ModuleList layer;
};
TORCH_MODULE(T5Block);

struct T5StackImpl : torch::nn::Module {
  explicit T5StackImpl(const T5Config& config);
  torch::nn::ModuleList block;
  T5LayerNorm final_layer_norm{nullptr};
};
TORCH_MODULE(T5Stack);

struct T5EncoderModelImpl : torch::nn::Module {
  explicit T5EncoderModelImpl(T5Config config);
  // input_ids (B, L) int64, attention_mask (B, L) of 0/1 or undefined (every token attends) -> last_hidden_state
  // (B, L, d_model).
  at::Tensor forward(const at::Tensor& input_ids, const at::Tensor& attention_mask = {});

  T5Config config;
  torch::nn::Embedding shared{nullptr};
  T5Stack encoder{nullptr};
  bool gradient_checkpointing = false;
};
TORCH_MODULE(T5EncoderModel);

// transformers' _relative_position_bucket (bidirectional) of relative positions (memory - query), int64.
at::Tensor t5_relative_position_bucket(const at::Tensor& relative_position, int64_t num_buckets, int64_t max_distance);

}  // namespace sdt
