#include "src/models/flux.h"

#include <cmath>
#include <numeric>

#include "src/core/error.h"

namespace sdt {

FluxConfig FluxConfig::dev() { return {}; }

FluxConfig FluxConfig::schnell() {
  FluxConfig c;
  c.guidance_embed = false;
  return c;
}

FluxConfig FluxConfig::chroma_base() {
  FluxConfig c;
  c.chroma = true;
  return c;
}

// ---------------------------------------------------------------- embeddings and attention

at::Tensor flux_timestep_embedding(const at::Tensor& t, int64_t dim) {
  const at::Tensor embedding = timestep_embedding(t * 1000.0, dim);
  return t.is_floating_point() ? embedding.to(t.scalar_type()) : embedding;
}

at::Tensor flux_rope(const at::Tensor& ids, const std::vector<int64_t>& axes_dim, double theta) {
  std::vector<at::Tensor> axes;
  for (size_t i = 0; i < axes_dim.size(); ++i) {
    const int64_t dim = axes_dim[i];
    const at::Tensor scale = at::arange(0, dim, 2, ids.options().dtype(at::kDouble)) / static_cast<double>(dim);
    const at::Tensor omega = 1.0 / at::pow(theta, scale);
    const at::Tensor angles = ids.select(-1, static_cast<int64_t>(i)).to(at::kDouble).unsqueeze(-1) * omega;  // (B, L, d/2)
    const at::Tensor cos = at::cos(angles), sin = at::sin(angles);
    axes.push_back(at::stack({cos, -sin, sin, cos}, -1).unflatten(-1, {2, 2}));  // (B, L, d/2, 2, 2)
  }
  return at::cat(axes, -3).to(at::kFloat).unsqueeze(1);
}

namespace {

// Each (even, odd) pair of a head's dimensions rotated by its matrix of `pe`, in fp32.
at::Tensor apply_rope(const at::Tensor& x, const at::Tensor& pe) {
  std::vector<int64_t> pairs(x.sizes().begin(), x.sizes().end() - 1);
  pairs.insert(pairs.end(), {-1, 1, 2});
  const at::Tensor x_ = x.to(at::kFloat).reshape(pairs);
  const at::Tensor rotated = pe.select(-1, 0) * x_.select(-1, 0) + pe.select(-1, 1) * x_.select(-1, 1);
  return rotated.reshape(x.sizes()).to(x.scalar_type());
}

// q, k, v (B, H, L, D) with RoPE on q and k; `key_mask` (B, L) of booleans (true: attend) or undefined -> (B, L, H*D).
at::Tensor rope_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& pe, const at::Tensor& key_mask) {
  std::optional<at::Tensor> mask;
  if (key_mask.defined()) mask = key_mask.unsqueeze(1).unsqueeze(1);  // (B, 1, 1, L): every head and query
  const at::Tensor out = at::scaled_dot_product_attention(apply_rope(q, pe), apply_rope(k, pe), v, mask);
  return out.transpose(1, 2).flatten(2);
}

// "B L (K H D) -> K B H L D": q, k, v, each (B, H, L, D).
std::vector<at::Tensor> split_heads(const at::Tensor& qkv, int64_t heads) {
  const at::Tensor t = qkv.unflatten(-1, {3, heads, -1}).permute({2, 0, 3, 1, 4});
  return {t[0], t[1], t[2]};
}

at::Tensor layer_norm(const at::Tensor& x) { return at::layer_norm(x, {x.size(-1)}, {}, {}, 1e-6); }

at::Tensor modulate(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale) { return (1 + scale) * x + shift; }

// Rows [first, first + count) of modulation vectors (B, M, D) as count tensors (B, 1, D).
std::vector<at::Tensor> rows(const at::Tensor& modulations, int64_t first, int64_t count) {
  std::vector<at::Tensor> out;
  for (int64_t i = 0; i < count; ++i) out.push_back(modulations.narrow(1, first + i, 1));
  return out;
}

// FLUX's modulation of a block: lin(SiLU(vec)) in `chunks` pieces (B, 1, D).
std::vector<at::Tensor> modulation_of(FluxModulationImpl& modulation, const at::Tensor& vec, int64_t chunks) {
  return modulation.lin(at::silu(vec)).unsqueeze(1).chunk(chunks, -1);
}

}  // namespace

// ---------------------------------------------------------------- layers

FluxRmsNormImpl::FluxRmsNormImpl(int64_t dim) { scale = register_parameter("scale", at::ones({dim})); }

at::Tensor FluxRmsNormImpl::forward(const at::Tensor& x) {
  const at::Tensor x32 = x.to(at::kFloat);
  const at::Tensor rrms = at::rsqrt(x32.pow(2).mean(-1, true) + 1e-6);
  return (x32 * rrms * scale.to(at::kFloat)).to(x.scalar_type());
}

QkNormImpl::QkNormImpl(int64_t head_dim) {
  query_norm = register_module("query_norm", FluxRmsNorm(head_dim));
  key_norm = register_module("key_norm", FluxRmsNorm(head_dim));
}

FluxSelfAttentionImpl::FluxSelfAttentionImpl(int64_t dim, int64_t heads, bool qkv_bias) {
  qkv = register_module("qkv", Linear(torch::nn::LinearOptions(dim, 3 * dim).bias(qkv_bias)));
  norm = register_module("norm", QkNorm(dim / heads));
  proj = register_module("proj", Linear(dim, dim));
}

FluxModulationImpl::FluxModulationImpl(int64_t dim, int64_t chunks) { lin = register_module("lin", Linear(dim, chunks * dim)); }

FluxMlpImpl::FluxMlpImpl(int64_t dim, int64_t hidden) {
  in = register_module("0", Linear(dim, hidden));
  out = register_module("2", Linear(hidden, dim));
}

at::Tensor FluxMlpImpl::forward(const at::Tensor& x) { return out(at::gelu(in(x), "tanh")); }

MlpEmbedderImpl::MlpEmbedderImpl(int64_t in_dim, int64_t hidden) {
  in_layer = register_module("in_layer", Linear(in_dim, hidden));
  out_layer = register_module("out_layer", Linear(hidden, hidden));
}

at::Tensor MlpEmbedderImpl::forward(const at::Tensor& x) { return out_layer(at::silu(in_layer(x))); }

ChromaApproximatorImpl::ChromaApproximatorImpl(const FluxConfig& c) {
  in_proj = register_module("in_proj", Linear(c.approximator_in_dim, c.approximator_hidden_size));
  for (int64_t i = 0; i < c.approximator_depth; ++i) {
    layers->push_back(MlpEmbedder(c.approximator_hidden_size, c.approximator_hidden_size));
    norms->push_back(FluxRmsNorm(c.approximator_hidden_size));
  }
  register_module("layers", layers);
  register_module("norms", norms);
  out_proj = register_module("out_proj", Linear(c.approximator_hidden_size, c.hidden_size));
}

at::Tensor ChromaApproximatorImpl::forward(const at::Tensor& input) {
  at::Tensor x = in_proj(input);
  for (size_t i = 0; i < layers->size(); ++i) x = x + layers[i]->as<MlpEmbedderImpl>()->forward(norms[i]->as<FluxRmsNormImpl>()->forward(x));
  return out_proj(x);
}

FluxLastLayerImpl::FluxLastLayerImpl(const FluxConfig& c) {
  linear = register_module("linear", Linear(c.hidden_size, c.in_channels));
  if (!c.chroma) {
    auto sequential = register_module("adaLN_modulation", std::make_shared<torch::nn::Module>());
    adaLN_modulation = sequential->register_module("1", Linear(c.hidden_size, 2 * c.hidden_size));
  }
}

at::Tensor FluxLastLayerImpl::forward(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale) {
  return linear(modulate(layer_norm(x), shift, scale));
}

// ---------------------------------------------------------------- blocks

DoubleStreamBlockImpl::DoubleStreamBlockImpl(const FluxConfig& c) : heads(c.num_heads), chroma(c.chroma) {
  if (!chroma) img_mod = register_module("img_mod", FluxModulation(c.hidden_size, 6));
  img_attn = register_module("img_attn", FluxSelfAttention(c.hidden_size, c.num_heads, c.qkv_bias));
  img_mlp = register_module("img_mlp", FluxMlp(c.hidden_size, c.mlp_hidden()));
  if (!chroma) txt_mod = register_module("txt_mod", FluxModulation(c.hidden_size, 6));
  txt_attn = register_module("txt_attn", FluxSelfAttention(c.hidden_size, c.num_heads, c.qkv_bias));
  txt_mlp = register_module("txt_mlp", FluxMlp(c.hidden_size, c.mlp_hidden()));
}

std::pair<at::Tensor, at::Tensor> DoubleStreamBlockImpl::forward(const at::Tensor& img_in, const at::Tensor& txt_in,
                                                                 const at::Tensor& modulation, const at::Tensor& pe,
                                                                 const at::Tensor& txt_mask) {
  // Six per stream: shift, scale, gate of the attention, then of the MLP.
  const std::vector<at::Tensor> im = chroma ? rows(modulation, 0, 6) : modulation_of(*img_mod, modulation, 6);
  const std::vector<at::Tensor> tm = chroma ? rows(modulation, 6, 6) : modulation_of(*txt_mod, modulation, 6);
  const auto qkv_of = [&](FluxSelfAttentionImpl& attn, const at::Tensor& x, const std::vector<at::Tensor>& m) {
    std::vector<at::Tensor> q_k_v = split_heads(attn.qkv(modulate(layer_norm(x), m[0], m[1])), heads);
    q_k_v[0] = attn.norm->query_norm(q_k_v[0]).to(q_k_v[2].scalar_type());
    q_k_v[1] = attn.norm->key_norm(q_k_v[1]).to(q_k_v[2].scalar_type());
    return q_k_v;
  };
  const std::vector<at::Tensor> iq = qkv_of(*img_attn, img_in, im), tq = qkv_of(*txt_attn, txt_in, tm);
  const int64_t n_img = img_in.size(1), n_txt = txt_in.size(1);
  at::Tensor img_attention, txt_attention;
  if (!chroma) {
    // [text, image]; a text mask hides padding keys.
    const at::Tensor key_mask = txt_mask.defined()
        ? at::cat({txt_mask.to(at::kBool), at::ones({txt_mask.size(0), n_img}, txt_mask.options().dtype(at::kBool))}, 1)
        : at::Tensor();
    const at::Tensor attn = rope_attention(at::cat({tq[0], iq[0]}, 2), at::cat({tq[1], iq[1]}, 2), at::cat({tq[2], iq[2]}, 2), pe, key_mask);
    txt_attention = attn.narrow(1, 0, n_txt);
    img_attention = attn.narrow(1, n_txt, n_img);
  } else {
    // [image, text]; each sample sees its own text tokens (txt_mask), and its other text rows come out as zeros.
    const at::Tensor key_mask = at::cat({at::ones({txt_mask.size(0), n_img}, txt_mask.options()), txt_mask}, 1);
    const at::Tensor attn = rope_attention(at::cat({iq[0], tq[0]}, 2), at::cat({iq[1], tq[1]}, 2), at::cat({iq[2], tq[2]}, 2), pe, key_mask);
    img_attention = attn.narrow(1, 0, n_img);
    txt_attention = attn.narrow(1, n_img, n_txt) * txt_mask.unsqueeze(-1).to(attn.scalar_type());
  }
  at::Tensor img = img_in + im[2] * img_attn->proj(img_attention);
  img = img + im[5] * img_mlp(modulate(layer_norm(img), im[3], im[4]));
  at::Tensor txt = txt_in + tm[2] * txt_attn->proj(txt_attention);
  txt = txt + tm[5] * txt_mlp(modulate(layer_norm(txt), tm[3], tm[4]));
  return {img, txt};
}

SingleStreamBlockImpl::SingleStreamBlockImpl(const FluxConfig& c)
    : hidden(c.hidden_size), mlp_hidden(c.mlp_hidden()), heads(c.num_heads), chroma(c.chroma) {
  linear1 = register_module("linear1", Linear(hidden, 3 * hidden + mlp_hidden));
  linear2 = register_module("linear2", Linear(hidden + mlp_hidden, hidden));
  norm = register_module("norm", QkNorm(c.head_dim()));
  if (!chroma) modulation = register_module("modulation", FluxModulation(hidden, 3));
}

at::Tensor SingleStreamBlockImpl::forward(const at::Tensor& x, const at::Tensor& modulation_input, const at::Tensor& pe,
                                          const at::Tensor& txt_mask) {
  const std::vector<at::Tensor> m = chroma ? rows(modulation_input, 0, 3) : modulation_of(*modulation, modulation_input, 3);
  const std::vector<at::Tensor> parts = linear1(modulate(layer_norm(x), m[0], m[1])).split_with_sizes({3 * hidden, mlp_hidden}, -1);
  std::vector<at::Tensor> q_k_v = split_heads(parts[0], heads);
  q_k_v[0] = norm->query_norm(q_k_v[0]).to(q_k_v[2].scalar_type());
  q_k_v[1] = norm->key_norm(q_k_v[1]).to(q_k_v[2].scalar_type());
  at::Tensor key_mask, attn;
  if (!chroma) {
    if (txt_mask.defined()) {
      key_mask = at::cat({txt_mask.to(at::kBool), at::ones({x.size(0), x.size(1) - txt_mask.size(1)}, txt_mask.options().dtype(at::kBool))}, 1);
    }
    attn = rope_attention(q_k_v[0], q_k_v[1], q_k_v[2], pe, key_mask);
  } else {
    // [image, text]: the rows past a sample's own text come out as zeros.
    key_mask = at::cat({at::ones({x.size(0), x.size(1) - txt_mask.size(1)}, txt_mask.options()), txt_mask}, 1);
    attn = rope_attention(q_k_v[0], q_k_v[1], q_k_v[2], pe, key_mask) * key_mask.unsqueeze(-1).to(x.scalar_type());
  }
  return x + m[2] * linear2(at::cat({attn, at::gelu(parts[1], "tanh")}, 2));
}

// ---------------------------------------------------------------- the transformer

FluxTransformerImpl::FluxTransformerImpl(FluxConfig c, BlockWeights blocks) : config(std::move(c)) {
  if (config.hidden_size % config.num_heads != 0) {
    fail("FLUX config", "hidden size {} is not a multiple of the {} heads", config.hidden_size, config.num_heads);
  }
  if (std::accumulate(config.axes_dim.begin(), config.axes_dim.end(), int64_t{0}) != config.head_dim()) {
    fail("FLUX config", "the RoPE axes {} do not sum to the head size {}", c10::str(config.axes_dim), config.head_dim());
  }
  img_in = register_module("img_in", Linear(config.in_channels, config.hidden_size));
  if (!config.chroma) {
    time_in = register_module("time_in", MlpEmbedder(256, config.hidden_size));
    vector_in = register_module("vector_in", MlpEmbedder(config.vec_in_dim, config.hidden_size));
    if (config.guidance_embed) guidance_in = register_module("guidance_in", MlpEmbedder(256, config.hidden_size));
  } else {
    distilled_guidance_layer = register_module("distilled_guidance_layer", ChromaApproximator(config));
  }
  txt_in = register_module("txt_in", Linear(config.context_in_dim, config.hidden_size));
  const auto add = [&](torch::nn::ModuleList& list, std::shared_ptr<torch::nn::Module> block) {
    if (blocks == BlockWeights::deferred) defer_weights(*block);
    list->push_back(block);
  };
  for (int64_t i = 0; i < config.depth; ++i) add(double_blocks, DoubleStreamBlock(config).ptr());
  for (int64_t i = 0; i < config.depth_single_blocks; ++i) add(single_blocks, SingleStreamBlock(config).ptr());
  register_module("double_blocks", double_blocks);
  register_module("single_blocks", single_blocks);
  final_layer = register_module("final_layer", FluxLastLayer(config));
}

at::Tensor FluxTransformerImpl::chroma_modulations(const at::Tensor& timesteps, const at::Tensor& guidance) {
  torch::NoGradGuard no_grad;
  const int64_t batch = timesteps.size(0), count = config.chroma_modulations(), quarter = config.approximator_in_dim / 4;
  const at::Tensor index = flux_timestep_embedding(at::arange(count, timesteps.options().dtype(at::kLong)), 2 * quarter);
  const at::Tensor time_guidance = at::cat({flux_timestep_embedding(timesteps, quarter), flux_timestep_embedding(guidance, quarter)}, 1);
  const at::Tensor input = at::cat({time_guidance.unsqueeze(1).expand({batch, count, 2 * quarter}),
                                    index.unsqueeze(0).expand({batch, count, 2 * quarter}).to(time_guidance.scalar_type())}, -1);
  return distilled_guidance_layer->forward(input);
}

at::Tensor FluxTransformerImpl::forward(const at::Tensor& img_tokens, const at::Tensor& img_ids, const at::Tensor& txt_states,
                                        const at::Tensor& txt_ids, const at::Tensor& timesteps, const at::Tensor& y,
                                        const at::Tensor& guidance, const at::Tensor& txt_mask) {
  if (img_tokens.dim() != 3 || txt_states.dim() != 3) fail("FLUX", "img and txt must be (batch, tokens, features)");
  at::Tensor img = img_in(img_tokens), txt = txt_in(txt_states);
  at::Tensor vec, modulations, mask = txt_mask, ids;
  if (!config.chroma) {
    vec = time_in(flux_timestep_embedding(timesteps, 256));
    if (config.guidance_embed) {
      if (!guidance.defined()) fail("FLUX", "this guidance-distilled model (dev) needs a guidance value per sample");
      vec = vec + guidance_in(flux_timestep_embedding(guidance, 256));
    }
    vec = vec + vector_in(y);
    ids = at::cat({txt_ids, img_ids}, 1);
  } else {
    if (!txt_mask.defined()) fail("Chroma", "needs the T5 attention mask (kohya: --apply_t5_attn_mask)");
    modulations = chroma_modulations(timesteps, guidance).to(img.scalar_type());
    // Each sample's text tokens and one padding token; the text beyond the longest of them is dropped.
    const int64_t n_txt = txt.size(1);
    const at::Tensor lengths = (txt_mask.narrow(1, 0, n_txt).sum(-1).to(at::kLong) + 1).clamp(0, n_txt);
    const int64_t longest = lengths.max().item<int64_t>();
    txt = txt.narrow(1, 0, longest);
    mask = at::arange(longest, lengths.options()).unsqueeze(0) < lengths.unsqueeze(1);
    ids = at::cat({img_ids, txt_ids.narrow(1, 0, longest)}, 1);
  }
  const at::Tensor pe = flux_rope(ids, config.axes_dim, config.theta);
  const int64_t n_single = config.depth_single_blocks, n_double = config.depth;
  for (int64_t i = 0; i < n_double; ++i) {
    const auto module = double_blocks[static_cast<size_t>(i)];
    auto* block = module->as<DoubleStreamBlockImpl>();
    const Block run = [block, mask](const std::vector<at::Tensor>& in) {
      auto [img_out, txt_out] = block->forward(in[0], in[1], in[2], in[3], mask);
      return std::vector<at::Tensor>{img_out, txt_out};
    };
    // Chroma's rows: image modulations of double block i after the single blocks', text ones after all image ones.
    const at::Tensor modulation = !config.chroma ? vec
        : at::cat({modulations.narrow(1, 3 * n_single + 6 * i, 6), modulations.narrow(1, 3 * n_single + 6 * n_double + 6 * i, 6)}, 1);
    const std::vector<at::Tensor> streams = run_block(block_runner, gradient_checkpointing, *module, run, {img, txt, modulation, pe});
    img = streams[0];
    txt = streams[1];
  }
  const int64_t n_txt = txt.size(1), n_img = img.size(1);
  at::Tensor x = config.chroma ? at::cat({img, txt}, 1) : at::cat({txt, img}, 1);
  for (int64_t i = 0; i < n_single; ++i) {
    const auto module = single_blocks[static_cast<size_t>(i)];
    auto* block = module->as<SingleStreamBlockImpl>();
    const Block run = [block, mask](const std::vector<at::Tensor>& in) { return std::vector<at::Tensor>{block->forward(in[0], in[1], in[2], mask)}; };
    const at::Tensor modulation = config.chroma ? modulations.narrow(1, 3 * i, 3) : vec;
    x = run_block(block_runner, gradient_checkpointing, *module, run, {x, modulation, pe})[0];
  }
  img = config.chroma ? x.narrow(1, 0, n_img) : x.narrow(1, n_txt, n_img);
  if (config.chroma) {
    const int64_t last = config.chroma_modulations() - 2;
    return final_layer(img, modulations.narrow(1, last, 1), modulations.narrow(1, last + 1, 1));
  }
  const std::vector<at::Tensor> shift_scale = final_layer->adaLN_modulation(at::silu(vec)).unsqueeze(1).chunk(2, -1);
  return final_layer(img, shift_scale[0], shift_scale[1]);
}

std::vector<std::shared_ptr<torch::nn::Module>> FluxTransformerImpl::blocks() const {
  std::vector<std::shared_ptr<torch::nn::Module>> all;
  for (const auto& m : *double_blocks) all.push_back(m);
  for (const auto& m : *single_blocks) all.push_back(m);
  return all;
}

// ---------------------------------------------------------------- packing

at::Tensor pack_latents(const at::Tensor& latents) {
  const int64_t b = latents.size(0), c = latents.size(1), h = latents.size(2) / 2, w = latents.size(3) / 2;
  if (latents.size(2) % 2 || latents.size(3) % 2) fail("FLUX", "latents {} do not pack into 2x2 patches", c10::str(latents.sizes()));
  return latents.view({b, c, h, 2, w, 2}).permute({0, 2, 4, 1, 3, 5}).reshape({b, h * w, c * 4});
}

at::Tensor unpack_latents(const at::Tensor& packed, int64_t packed_height, int64_t packed_width) {
  const int64_t b = packed.size(0), c = packed.size(2) / 4;
  return packed.view({b, packed_height, packed_width, c, 2, 2}).permute({0, 3, 1, 4, 2, 5}).reshape({b, c, 2 * packed_height, 2 * packed_width});
}

at::Tensor flux_image_ids(int64_t batch, int64_t packed_height, int64_t packed_width) {
  const at::Tensor rows = at::arange(packed_height, at::kFloat).unsqueeze(1).expand({packed_height, packed_width});
  const at::Tensor cols = at::arange(packed_width, at::kFloat).unsqueeze(0).expand({packed_height, packed_width});
  const at::Tensor ids = at::stack({at::zeros_like(rows), rows, cols}, -1).reshape({1, packed_height * packed_width, 3});
  return ids.expand({batch, packed_height * packed_width, 3}).contiguous();
}

}  // namespace sdt
