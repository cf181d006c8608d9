#include "src/models/unet.h"

#include <cmath>

#include "src/core/error.h"

namespace sdt {

namespace nn = torch::nn;

UNetConfig UNetConfig::sd1() { return {}; }

UNetConfig UNetConfig::sd2() {
  UNetConfig c;
  c.num_heads = {5, 10, 20, 20};
  c.cross_attention_dim = 1024;
  c.use_linear_projection = true;
  return c;
}

UNetConfig UNetConfig::sdxl() {
  UNetConfig c;
  c.block_out_channels = {320, 640, 1280};
  c.down_attention = {false, true, true};
  c.up_attention = {true, true, false};
  c.num_heads = {5, 10, 20};
  c.transformer_layers = {1, 2, 10};
  c.cross_attention_dim = 2048;
  c.use_linear_projection = true;
  c.vector_conditioning_dim = 2816;
  return c;
}

CrossAttentionImpl::CrossAttentionImpl(int64_t dim, int64_t context_dim, int64_t heads) : heads(heads) {
  to_q = register_module("to_q", Linear(nn::LinearOptions(dim, dim).bias(false)));
  to_k = register_module("to_k", Linear(nn::LinearOptions(context_dim, dim).bias(false)));
  to_v = register_module("to_v", Linear(nn::LinearOptions(context_dim, dim).bias(false)));
  to_out = register_module("to_out", nn::ModuleList(Linear(dim, dim)));
}

at::Tensor CrossAttentionImpl::forward(const at::Tensor& x, const at::Tensor& context) {
  const at::Tensor& kv = context.defined() ? context : x;
  at::Tensor out = multi_head_attention(to_q(x), to_k(kv), to_v(kv), heads);  // (B, N, C)
  return to_out[0]->as<Linear>()->forward(out);
}

namespace {
// Holds net.0.proj; FeedForward applies the gate itself.
struct GegluImpl : nn::Module {};
}  // namespace

FeedForwardImpl::FeedForwardImpl(int64_t dim) {
  const int64_t inner = 4 * dim;
  auto geglu = std::make_shared<GegluImpl>();
  proj = geglu->register_module("proj", Linear(dim, 2 * inner));
  out = Linear(inner, dim);
  net = register_module("net", nn::ModuleList());
  net->push_back(geglu);
  net->push_back(nn::Dropout(0.0));
  net->push_back(out);
}

at::Tensor FeedForwardImpl::forward(const at::Tensor& x) {
  auto halves = proj(x).chunk(2, -1);  // value, gate: (B, N, 4C) each
  return out(halves[0] * at::gelu(halves[1]));
}

BasicTransformerBlockImpl::BasicTransformerBlockImpl(int64_t dim, int64_t context_dim, int64_t heads) {
  auto ln = [&] { return nn::LayerNorm(nn::LayerNormOptions({dim}).eps(1e-5)); };
  norm1 = register_module("norm1", ln());
  attn1 = register_module("attn1", CrossAttention(dim, dim, heads));
  norm2 = register_module("norm2", ln());
  attn2 = register_module("attn2", CrossAttention(dim, context_dim, heads));
  norm3 = register_module("norm3", ln());
  ff = register_module("ff", FeedForward(dim));
}

at::Tensor BasicTransformerBlockImpl::forward(const at::Tensor& x, const at::Tensor& context) {
  at::Tensor h = x + attn1(norm1(x));
  h = h + attn2(norm2(h), context);
  return h + ff(norm3(h));
}

Transformer2DImpl::Transformer2DImpl(int64_t channels, int64_t context_dim, int64_t heads, int64_t depth,
                                     int64_t groups, bool linear_projection) {
  if (channels % heads != 0) fail("U-Net config", "{} channels do not split into {} attention heads", channels, heads);
  norm = register_module("norm", nn::GroupNorm(nn::GroupNormOptions(groups, channels).eps(1e-6)));
  if (linear_projection) {
    proj_in_linear = register_module("proj_in", Linear(channels, channels));
  } else {
    proj_in_conv = register_module("proj_in", Conv2d(nn::Conv2dOptions(channels, channels, 1)));
  }
  transformer_blocks = register_module("transformer_blocks", nn::ModuleList());
  for (int64_t i = 0; i < depth; ++i) transformer_blocks->push_back(BasicTransformerBlock(channels, context_dim, heads));
  if (linear_projection) {
    proj_out_linear = register_module("proj_out", Linear(channels, channels));
  } else {
    proj_out_conv = register_module("proj_out", Conv2d(nn::Conv2dOptions(channels, channels, 1)));
  }
}

at::Tensor Transformer2DImpl::forward(const at::Tensor& x, const at::Tensor& context) {
  const int64_t b = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  auto to_tokens = [&](const at::Tensor& t) { return t.permute({0, 2, 3, 1}).reshape({b, h * w, c}); };  // (B, HW, C)
  auto to_image = [&](const at::Tensor& t) { return t.reshape({b, h, w, c}).permute({0, 3, 1, 2}); };   // (B, C, H, W)

  at::Tensor tokens = proj_in_linear ? proj_in_linear(to_tokens(norm(x))) : to_tokens(proj_in_conv(norm(x)));
  for (const auto& block : *transformer_blocks) tokens = block->as<BasicTransformerBlock>()->forward(tokens, context);
  // Contiguous, as diffusers makes it: a channels-last result would send the next GroupNorm to PyTorch's channels-last
  // kernel, whose backward crashes when the input needs no gradient but the norm's weights do (a frozen block before
  // a trained one, sdxl_train.py's --block_lr).
  at::Tensor out = proj_out_linear ? to_image(proj_out_linear(tokens)).contiguous() : proj_out_conv(to_image(tokens).contiguous());
  return out + x;
}

TimestepEmbeddingImpl::TimestepEmbeddingImpl(int64_t channels, int64_t dim) {
  linear_1 = register_module("linear_1", Linear(channels, dim));
  linear_2 = register_module("linear_2", Linear(dim, dim));
}

at::Tensor TimestepEmbeddingImpl::forward(const at::Tensor& x) { return linear_2(at::silu(linear_1(x))); }

at::Tensor size_embedding(const at::Tensor& sizes, int64_t dim) {
  if (sizes.dim() != 2) fail("size conditioning", "expected (batch, values), got {}", c10::str(sizes.sizes()));
  return timestep_embedding(sizes.flatten(), dim).reshape({sizes.size(0), sizes.size(1) * dim});
}

namespace {

// Each ResNet and Transformer2D is one block (run_block). The closure holds the module (a shared pointer), so the
// recomputation in backward finds it alive.
template <typename Impl>
at::Tensor run_unit(const std::shared_ptr<Impl>& block, const at::Tensor& x, const at::Tensor& extra, const UNetStep& step) {
  const Block run = [block](const std::vector<at::Tensor>& in) { return std::vector<at::Tensor>{block->forward(in[0], in[1])}; };
  return run_block(step.runner, step.checkpoint, *block, run, {x, extra})[0];
}

}  // namespace

at::Tensor UNetLevelImpl::resnet(size_t i, const at::Tensor& x, const UNetStep& step) {
  return run_unit(resnets->ptr<ResnetBlock2DImpl>(i), x, step.temb, step);
}

at::Tensor UNetLevelImpl::attention(size_t i, const at::Tensor& x, const UNetStep& step) {
  return run_unit(attentions->ptr<Transformer2DImpl>(i), x, step.context, step);
}

UNet2DConditionModelImpl::UNet2DConditionModelImpl(UNetConfig config) : config(std::move(config)) {
  const UNetConfig& c = this->config;
  const auto levels = static_cast<int64_t>(c.block_out_channels.size());
  if (c.down_attention.size() != c.block_out_channels.size() || c.up_attention.size() != c.block_out_channels.size() ||
      c.num_heads.size() != c.block_out_channels.size() || c.transformer_layers.size() != c.block_out_channels.size()) {
    fail("U-Net config", "block types, head counts and transformer depths must have one entry per level ({})", levels);
  }
  const int64_t c0 = c.block_out_channels[0], temb = 4 * c0, groups = c.norm_num_groups;
  auto resnet = [&](int64_t in, int64_t out) { return ResnetBlock2D(in, out, temb, groups, c.norm_eps); };
  auto transformer = [&](int64_t level) {
    return Transformer2D(c.block_out_channels[level], c.cross_attention_dim, c.num_heads[level],
                         c.transformer_layers[level], groups, c.use_linear_projection);
  };

  time_embedding = register_module("time_embedding", TimestepEmbedding(c0, temb));
  if (c.vector_conditioning_dim > 0) {
    add_embedding = register_module("add_embedding", TimestepEmbedding(c.vector_conditioning_dim, temb));
  }
  conv_in = register_module("conv_in", Conv2d(nn::Conv2dOptions(c.in_channels, c0, 3).padding(1)));

  down_blocks = register_module("down_blocks", nn::ModuleList());
  for (int64_t i = 0; i < levels; ++i) {
    const int64_t in = c.block_out_channels[i == 0 ? 0 : i - 1], out = c.block_out_channels[i];
    auto level = UNetLevel();
    level->resnets = level->register_module("resnets", nn::ModuleList());
    if (c.down_attention[i]) level->attentions = level->register_module("attentions", nn::ModuleList());
    for (int64_t j = 0; j < c.layers_per_block; ++j) {
      level->resnets->push_back(resnet(j == 0 ? in : out, out));
      if (c.down_attention[i]) level->attentions->push_back(transformer(i));
    }
    if (i + 1 < levels) level->downsamplers = level->register_module("downsamplers", nn::ModuleList(Downsample2D(out, false)));
    down_blocks->push_back(level);
  }

  const int64_t deepest = c.block_out_channels.back();
  mid_block = register_module("mid_block", UNetLevel());
  mid_block->resnets = mid_block->register_module("resnets", nn::ModuleList(resnet(deepest, deepest), resnet(deepest, deepest)));
  mid_block->attentions = mid_block->register_module("attentions", nn::ModuleList(transformer(levels - 1)));

  // Up level i mirrors down level levels-1-i; its last resnet also takes that down level's input-side skip.
  up_blocks = register_module("up_blocks", nn::ModuleList());
  int64_t prev_out = deepest;
  for (int64_t i = 0; i < levels; ++i) {
    const int64_t mirror = levels - 1 - i;
    const int64_t out = c.block_out_channels[mirror], skip_in = c.block_out_channels[std::max<int64_t>(mirror - 1, 0)];
    auto level = UNetLevel();
    level->resnets = level->register_module("resnets", nn::ModuleList());
    if (c.up_attention[i]) level->attentions = level->register_module("attentions", nn::ModuleList());
    for (int64_t j = 0; j <= c.layers_per_block; ++j) {
      const int64_t skip = j == c.layers_per_block ? skip_in : out;
      level->resnets->push_back(resnet((j == 0 ? prev_out : out) + skip, out));
      if (c.up_attention[i]) level->attentions->push_back(transformer(mirror));
    }
    if (i + 1 < levels) level->upsamplers = level->register_module("upsamplers", nn::ModuleList(Upsample2D(out)));
    up_blocks->push_back(level);
    prev_out = out;
  }

  conv_norm_out = register_module("conv_norm_out", nn::GroupNorm(nn::GroupNormOptions(groups, c0).eps(c.norm_eps)));
  conv_out = register_module("conv_out", Conv2d(nn::Conv2dOptions(c0, c.out_channels, 3).padding(1)));
}

std::vector<std::shared_ptr<torch::nn::Module>> UNet2DConditionModelImpl::blocks() const {
  std::vector<std::shared_ptr<torch::nn::Module>> out;
  auto add_level = [&](const UNetLevelImpl& level, bool interleaved) {
    for (size_t j = 0; j < level.resnets->size(); ++j) {
      out.push_back(level.resnets->ptr(j));
      if (interleaved && j < level.attentions->size()) out.push_back(level.attentions->ptr(j));
    }
  };
  for (const auto& level : *down_blocks) add_level(*level->as<UNetLevel>(), true);
  out.push_back(mid_block->resnets->ptr(0));
  out.push_back(mid_block->attentions->ptr(0));
  out.push_back(mid_block->resnets->ptr(1));
  for (const auto& level : *up_blocks) add_level(*level->as<UNetLevel>(), true);
  return out;
}

at::Tensor UNet2DConditionModelImpl::forward(const at::Tensor& sample, const at::Tensor& timesteps, const at::Tensor& context,
                                             const at::Tensor& vector) {
  const int64_t batch = sample.size(0);
  at::Tensor t = (timesteps.dim() == 0 ? timesteps.expand({batch}) : timesteps).to(sample.device());  // (B)
  at::Tensor t_emb = timestep_embedding(t, config.block_out_channels[0]).to(sample.scalar_type());  // (B, C0)
  at::Tensor emb = time_embedding(t_emb);                                                            // (B, 4 * C0)
  if (add_embedding) {
    if (!vector.defined() || vector.dim() != 2 || vector.size(1) != config.vector_conditioning_dim) {
      fail("U-Net", "expected the vector conditioning (batch, {}), got {}", config.vector_conditioning_dim,
           vector.defined() ? c10::str(vector.sizes()) : "none");
    }
    emb = emb + add_embedding(vector.to(emb.scalar_type()));
  }
  UNetStep step{emb, context, gradient_checkpointing && torch::GradMode::is_enabled(), block_runner};

  at::Tensor h = conv_in(sample);  // (B, C0, h, w)
  std::vector<at::Tensor> skips{h};
  for (const auto& module : *down_blocks) {
    auto* level = module->as<UNetLevel>();
    for (size_t j = 0; j < level->resnets->size(); ++j) {
      h = level->resnet(j, h, step);
      if (!level->attentions->is_empty()) h = level->attention(j, h, step);
      skips.push_back(h);
    }
    if (!level->downsamplers->is_empty()) {
      h = level->downsamplers[0]->as<Downsample2D>()->forward(h);
      skips.push_back(h);
    }
  }

  h = mid_block->resnet(0, h, step);
  h = mid_block->attention(0, h, step);
  h = mid_block->resnet(1, h, step);

  for (const auto& module : *up_blocks) {
    auto* level = module->as<UNetLevel>();
    for (size_t j = 0; j < level->resnets->size(); ++j) {
      h = at::cat({h, skips.back()}, 1);  // (B, C + C_skip, h, w)
      skips.pop_back();
      h = level->resnet(j, h, step);
      if (!level->attentions->is_empty()) h = level->attention(j, h, step);
    }
    if (!level->upsamplers->is_empty()) {
      h = level->upsamplers[0]->as<Upsample2D>()->forward(h, {skips.back().size(2), skips.back().size(3)});
    }
  }
  return conv_out(at::silu(conv_norm_out(h)));  // (B, out, h, w)
}

}  // namespace sdt
