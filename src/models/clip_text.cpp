#include "src/models/clip_text.h"

#include "src/core/error.h"
#include "src/models/layers.h"

namespace sdt {

namespace nn = torch::nn;

ClipTextConfig ClipTextConfig::sd1() { return {}; }

ClipTextConfig ClipTextConfig::sd2() {
  ClipTextConfig c;
  c.hidden_size = 1024;
  c.intermediate_size = 4096;
  c.num_layers = 23;
  c.num_heads = 16;
  c.act = "gelu";
  return c;
}

ClipTextConfig ClipTextConfig::sdxl_bigg() {
  ClipTextConfig c;
  c.hidden_size = 1280;
  c.intermediate_size = 5120;
  c.num_layers = 32;
  c.num_heads = 20;
  c.act = "gelu";
  c.projection_dim = 1280;
  return c;
}

ClipAttentionImpl::ClipAttentionImpl(int64_t hidden, int64_t heads) : heads(heads) {
  q_proj = register_module("q_proj", Linear(hidden, hidden));
  k_proj = register_module("k_proj", Linear(hidden, hidden));
  v_proj = register_module("v_proj", Linear(hidden, hidden));
  out_proj = register_module("out_proj", Linear(hidden, hidden));
}

at::Tensor ClipAttentionImpl::forward(const at::Tensor& x) {
  return out_proj(multi_head_attention(q_proj(x), k_proj(x), v_proj(x), heads, /*causal=*/true));
}

ClipMlpImpl::ClipMlpImpl(int64_t hidden, int64_t intermediate, std::string act) : act(std::move(act)) {
  if (this->act != "quick_gelu" && this->act != "gelu") fail("CLIP text config", "hidden_act '{}' is not quick_gelu or gelu", this->act);
  fc1 = register_module("fc1", Linear(hidden, intermediate));
  fc2 = register_module("fc2", Linear(intermediate, hidden));
}

at::Tensor ClipMlpImpl::forward(const at::Tensor& x) {
  at::Tensor h = fc1(x);  // (B, S, I)
  h = act == "gelu" ? at::gelu(h) : h * at::sigmoid(1.702 * h);
  return fc2(h);
}

ClipEncoderLayerImpl::ClipEncoderLayerImpl(const ClipTextConfig& c) {
  auto ln = [&] { return nn::LayerNorm(nn::LayerNormOptions({c.hidden_size}).eps(c.layer_norm_eps)); };
  self_attn = register_module("self_attn", ClipAttention(c.hidden_size, c.num_heads));
  layer_norm1 = register_module("layer_norm1", ln());
  mlp = register_module("mlp", ClipMlp(c.hidden_size, c.intermediate_size, c.act));
  layer_norm2 = register_module("layer_norm2", ln());
}

at::Tensor ClipEncoderLayerImpl::forward(const at::Tensor& x) {
  at::Tensor h = x + self_attn(layer_norm1(x));
  return h + mlp(layer_norm2(h));
}

ClipEmbeddingsImpl::ClipEmbeddingsImpl(const ClipTextConfig& c) {
  token_embedding = register_module("token_embedding", nn::Embedding(c.vocab_size, c.hidden_size));
  position_embedding = register_module("position_embedding", nn::Embedding(c.max_positions, c.hidden_size));
}

at::Tensor ClipEmbeddingsImpl::forward(const at::Tensor& ids) {
  at::Tensor positions = at::arange(ids.size(1), ids.options().dtype(at::kLong));  // (S)
  return token_embedding(ids) + position_embedding(positions);                     // (B, S, D) + (S, D)
}

ClipEncoderImpl::ClipEncoderImpl(const ClipTextConfig& c) {
  layers = register_module("layers", nn::ModuleList());
  for (int64_t i = 0; i < c.num_layers; ++i) layers->push_back(ClipEncoderLayer(c));
}

ClipTextTransformerImpl::ClipTextTransformerImpl(const ClipTextConfig& c) {
  embeddings = register_module("embeddings", ClipEmbeddings(c));
  encoder = register_module("encoder", ClipEncoder(c));
  final_layer_norm =
      register_module("final_layer_norm", nn::LayerNorm(nn::LayerNormOptions({c.hidden_size}).eps(c.layer_norm_eps)));
}

ClipTextModelImpl::ClipTextModelImpl(ClipTextConfig config) : config(std::move(config)) {
  text_model = register_module("text_model", ClipTextTransformer(this->config));
  if (this->config.projection_dim > 0) {
    text_projection = register_module(
        "text_projection", Linear(nn::LinearOptions(this->config.hidden_size, this->config.projection_dim).bias(false)));
  }
}

ClipTextOutput ClipTextModelImpl::forward(const at::Tensor& ids) {
  if (ids.dim() != 2 || ids.size(1) > config.max_positions) {
    fail("CLIP text encoder", "expected ids of shape (batch, <= {}), got {}", config.max_positions, c10::str(ids.sizes()));
  }
  ClipTextOutput out;
  at::Tensor h = text_model->embeddings(ids);  // (B, S, D)
  out.hidden_states.push_back(h);
  for (const auto& layer : *text_model->encoder->layers) {
    h = layer->as<ClipEncoderLayer>()->forward(h);
    out.hidden_states.push_back(h);
  }
  out.last_hidden_state = text_model->final_layer_norm(h);

  at::Tensor eos_position = config.eos_token_id == 2 ? ids.argmax(-1) : (ids == config.eos_token_id).to(at::kInt).argmax(-1);  // (B)
  at::Tensor batch = at::arange(ids.size(0), eos_position.options());
  out.pooled = out.last_hidden_state.index({batch, eos_position});  // (B, D)
  if (text_projection) out.text_embeds = text_projection(out.pooled);
  return out;
}

at::Tensor ClipTextModelImpl::encode(const at::Tensor& ids, std::optional<int64_t> clip_skip) {
  ClipTextOutput out = forward(ids);
  if (!clip_skip) return out.last_hidden_state;
  const auto layers = static_cast<int64_t>(out.hidden_states.size());
  if (*clip_skip < 1 || *clip_skip >= layers) fail("--clip_skip", "must be between 1 and {}, got {}", layers - 1, *clip_skip);
  return text_model->final_layer_norm(out.hidden_states[layers - *clip_skip]);
}

at::Tensor encode_prompt_chunks(ClipTextModel& model, const at::Tensor& ids, std::optional<int64_t> clip_skip) {
  if (ids.dim() != 3) fail("CLIP text encoder", "expected chunked ids (batch, chunks, tokens), got {} dims", ids.dim());
  return stitch_prompt_chunks(model->encode(ids.flatten(0, 1), clip_skip), ids.size(0));
}

at::Tensor stitch_prompt_chunks(const at::Tensor& hidden, int64_t batch) {
  const int64_t chunks = hidden.size(0) / batch, tokens = hidden.size(1);
  const at::Tensor joined = hidden.reshape({batch, chunks * tokens, hidden.size(-1)});  // (B, n*77, D)
  if (chunks == 1) return joined;
  // kohya has a separate SD2 branch meant to patch chunks that start with EOS, but it compares a token id with the
  // EOS *string*, which is never equal, so both versions stitch the same way; so do we.
  std::vector<at::Tensor> parts{joined.slice(1, 0, 1)};
  for (int64_t c = 0; c < chunks; ++c) parts.push_back(joined.slice(1, c * tokens + 1, c * tokens + tokens - 1));
  parts.push_back(joined.slice(1, -1));
  return at::cat(parts, 1);  // (B, 2 + (tokens - 2) * n, D)
}

at::Tensor weight_prompt_chunks(const at::Tensor& hidden, const at::Tensor& weights) {
  const at::Tensor w = weights.to(hidden.device(), hidden.scalar_type());  // (B, n, 77)
  const int64_t batch = w.size(0), windows = w.size(1), text = w.size(2) - 2;
  at::Tensor per_position = w.select(1, 0);                                // (B, 77)
  if (windows > 1) {
    const at::Tensor one = at::ones({batch, 1}, w.options());
    per_position = at::cat({one, w.slice(2, 1, -1).reshape({batch, windows * text}), one}, 1);  // (B, 2 + 75n)
  }
  return hidden * per_position.unsqueeze(-1);
}

}  // namespace sdt
