#include "src/models/t5.h"

#include <cmath>
#include <fstream>
#include <limits>

#include <nlohmann/json.hpp>

#include "src/core/error.h"

namespace sdt {

T5Config T5Config::xxl() { return {}; }

T5Config read_t5_config(const std::string& path) {
  std::ifstream in(path);
  if (!in) fail(path, "cannot read the T5 config");
  const nlohmann::json j = nlohmann::json::parse(in, nullptr, false);
  if (j.is_discarded()) fail(path, "not valid JSON");
  const std::string feed_forward = j.value("feed_forward_proj", std::string("relu"));
  if (feed_forward != "gated-gelu") {
    fail(path + ": feed_forward_proj", "'{}': sdt runs T5 v1.1 encoders (gated-gelu, as FLUX's and SD3's T5-XXL)", feed_forward);
  }
  T5Config c;
  c.vocab_size = j.value("vocab_size", c.vocab_size);
  c.d_model = j.value("d_model", c.d_model);
  c.d_kv = j.value("d_kv", c.d_kv);
  c.d_ff = j.value("d_ff", c.d_ff);
  c.num_layers = j.value("num_layers", c.num_layers);
  c.num_heads = j.value("num_heads", c.num_heads);
  c.relative_attention_num_buckets = j.value("relative_attention_num_buckets", c.relative_attention_num_buckets);
  c.relative_attention_max_distance = j.value("relative_attention_max_distance", c.relative_attention_max_distance);
  c.layer_norm_epsilon = j.value("layer_norm_epsilon", c.layer_norm_epsilon);
  return c;
}

at::Tensor t5_relative_position_bucket(const at::Tensor& relative_position, int64_t num_buckets, int64_t max_distance) {
  const int64_t half = num_buckets / 2;  // one half for keys after the query, one for keys before
  at::Tensor buckets = (relative_position > 0).to(at::kLong) * half;
  const at::Tensor distance = relative_position.abs();
  const int64_t max_exact = half / 2;
  // Exact buckets up to max_exact apart, then logarithmic bins up to max_distance, the last bin for everything beyond.
  at::Tensor large = max_exact + (at::log(distance.to(at::kFloat) / static_cast<double>(max_exact)) /
                                  std::log(static_cast<double>(max_distance) / static_cast<double>(max_exact)) *
                                  static_cast<double>(half - max_exact)).to(at::kLong);
  large = at::minimum(large, at::full_like(large, half - 1));
  return buckets + at::where(distance < max_exact, distance, large);
}

T5LayerNormImpl::T5LayerNormImpl(int64_t dim, double eps) : eps(eps) { weight = register_parameter("weight", at::ones({dim})); }

at::Tensor T5LayerNormImpl::forward(const at::Tensor& x) {
  const at::Tensor variance = x.to(at::kFloat).pow(2).mean(-1, true);
  at::Tensor normed = x * at::rsqrt(variance + eps);
  if (weight.scalar_type() == at::kHalf || weight.scalar_type() == at::kBFloat16) normed = normed.to(weight.scalar_type());
  return weight * normed;
}

T5AttentionImpl::T5AttentionImpl(const T5Config& c, bool has_relative_attention_bias)
    : heads(c.num_heads), d_kv(c.d_kv), buckets(c.relative_attention_num_buckets), max_distance(c.relative_attention_max_distance) {
  const int64_t inner = c.num_heads * c.d_kv;
  q = register_module("q", Linear(torch::nn::LinearOptions(c.d_model, inner).bias(false)));
  k = register_module("k", Linear(torch::nn::LinearOptions(c.d_model, inner).bias(false)));
  v = register_module("v", Linear(torch::nn::LinearOptions(c.d_model, inner).bias(false)));
  o = register_module("o", Linear(torch::nn::LinearOptions(inner, c.d_model).bias(false)));
  if (has_relative_attention_bias) {
    relative_attention_bias = register_module("relative_attention_bias", torch::nn::Embedding(buckets, heads));
  }
}

at::Tensor T5AttentionImpl::position_bias(int64_t length) {
  const at::Tensor positions = at::arange(length, relative_attention_bias->weight.options().dtype(at::kLong));
  const at::Tensor relative = positions.unsqueeze(0) - positions.unsqueeze(1);  // memory - query
  return relative_attention_bias(t5_relative_position_bucket(relative, buckets, max_distance)).permute({2, 0, 1}).unsqueeze(0);
}

at::Tensor T5AttentionImpl::forward(const at::Tensor& x, const at::Tensor& bias) {
  const auto heads_of = [&](const at::Tensor& t) { return t.unflatten(-1, {heads, d_kv}).transpose(1, 2); };  // (B, H, L, D)
  const at::Tensor scores = at::matmul(heads_of(q(x)), heads_of(k(x)).transpose(2, 3)) + bias;  // T5 does not scale
  const at::Tensor out = at::matmul(at::softmax(scores, -1), heads_of(v(x)));
  return o(out.transpose(1, 2).flatten(2));
}

T5LayerSelfAttentionImpl::T5LayerSelfAttentionImpl(const T5Config& c, bool has_relative_attention_bias) {
  SelfAttention = register_module("SelfAttention", T5Attention(c, has_relative_attention_bias));
  layer_norm = register_module("layer_norm", T5LayerNorm(c.d_model, c.layer_norm_epsilon));
}

T5DenseGatedActDenseImpl::T5DenseGatedActDenseImpl(const T5Config& c) {
  wi_0 = register_module("wi_0", Linear(torch::nn::LinearOptions(c.d_model, c.d_ff).bias(false)));
  wi_1 = register_module("wi_1", Linear(torch::nn::LinearOptions(c.d_model, c.d_ff).bias(false)));
  wo = register_module("wo", Linear(torch::nn::LinearOptions(c.d_ff, c.d_model).bias(false)));
}

at::Tensor T5DenseGatedActDenseImpl::forward(const at::Tensor& x) {
  // transformers' gelu_new, written out as it writes it.
  const at::Tensor g = wi_0(x);
  const at::Tensor gelu = 0.5 * g * (1.0 + at::tanh(std::sqrt(2.0 / M_PI) * (g + 0.044715 * at::pow(g, 3.0))));
  at::Tensor hidden = gelu * wi_1(x);
  // transformers casts to the output weight's dtype; not to fp8 storage, which autocast widens (kohya's fp8 forward).
  const at::ScalarType out = wo->weight.scalar_type();
  if (hidden.scalar_type() != out && !at::isFloat8Type(out)) hidden = hidden.to(out);
  return wo(hidden);
}

T5LayerFFImpl::T5LayerFFImpl(const T5Config& c) {
  DenseReluDense = register_module("DenseReluDense", T5DenseGatedActDense(c));
  layer_norm = register_module("layer_norm", T5LayerNorm(c.d_model, c.layer_norm_epsilon));
}

namespace {

// transformers' fp16 guard: clamp to the largest finite value (less 1000 once something overflowed).
at::Tensor clamp_fp16(const at::Tensor& x) {
  if (x.scalar_type() != at::kHalf) return x;
  const double max = std::numeric_limits<c10::Half>::max();
  const double limit = at::isinf(x).any().item<bool>() ? max - 1000 : max;
  return at::clamp(x, -limit, limit);
}

}  // namespace

T5BlockImpl::T5BlockImpl(const T5Config& c, bool has_relative_attention_bias) {
  self_attention = T5LayerSelfAttention(c, has_relative_attention_bias);
  feed_forward = T5LayerFF(c);
  layer->push_back(self_attention);
  layer->push_back(feed_forward);
  register_module("layer", layer);
}

at::Tensor T5BlockImpl::forward(const at::Tensor& x, const at::Tensor& bias) {
  at::Tensor h = clamp_fp16(x + self_attention->SelfAttention(self_attention->layer_norm(x), bias));
  return clamp_fp16(h + feed_forward->DenseReluDense(feed_forward->layer_norm(h)));
}

T5StackImpl::T5StackImpl(const T5Config& c) {
  for (int64_t i = 0; i < c.num_layers; ++i) block->push_back(T5Block(c, i == 0));
  register_module("block", block);
  final_layer_norm = register_module("final_layer_norm", T5LayerNorm(c.d_model, c.layer_norm_epsilon));
}

T5EncoderModelImpl::T5EncoderModelImpl(T5Config c) : config(std::move(c)) {
  shared = register_module("shared", torch::nn::Embedding(config.vocab_size, config.d_model));
  encoder = register_module("encoder", T5Stack(config));
}

at::Tensor T5EncoderModelImpl::forward(const at::Tensor& input_ids, const at::Tensor& attention_mask) {
  const c10::Device device = shared->weight.device();
  at::Tensor x = shared(input_ids.to(device));
  // The first layer's relative-position bias, shared by every layer; masked keys get the dtype's lowest value.
  at::Tensor bias = encoder->block[0]->as<T5BlockImpl>()->self_attention->SelfAttention->position_bias(input_ids.size(1)).to(x.scalar_type());
  if (attention_mask.defined()) {
    const double lowest = x.scalar_type() == at::kHalf       ? static_cast<double>(std::numeric_limits<c10::Half>::lowest())
                          : x.scalar_type() == at::kBFloat16 ? static_cast<double>(std::numeric_limits<c10::BFloat16>::lowest())
                                                             : std::numeric_limits<float>::lowest();
    const at::Tensor masked = (1.0 - attention_mask.to(device, x.scalar_type())) * lowest;
    bias = bias + masked.unsqueeze(1).unsqueeze(1);
  }
  for (const auto& module : *encoder->block) {
    auto* block = module->as<T5BlockImpl>();
    const Block run = [block, bias](const std::vector<at::Tensor>& in) { return std::vector<at::Tensor>{block->forward(in[0], bias)}; };
    x = run_block(nullptr, gradient_checkpointing, *module, run, {x})[0];
  }
  return encoder->final_layer_norm(x);
}

}  // namespace sdt
