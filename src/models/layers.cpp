#include "src/models/layers.h"

#include <ATen/autocast_mode.h>

#include <cmath>
#include <mutex>

#include <spdlog/spdlog.h>

namespace sdt {

namespace nn = torch::nn;
namespace F = torch::nn::functional;

at::Tensor LinearImpl::forward(const at::Tensor& x) {
  // at::linear, as PyTorch's F.linear: one op that autocast casts whole (weight and bias; fp8-stored weights too),
  // where the C++ frontend's Linear adds the bias after a matmul.
  at::Tensor y = at::linear(x, weight, bias);
  if (!adapter) return y;
  at::Tensor d = adapter->delta(x);
  return d.defined() ? y + d : y;
}

at::Tensor Conv2dImpl::forward(const at::Tensor& x) {
  at::Tensor y = torch::nn::Conv2dImpl::forward(x);
  if (!adapter) return y;
  at::Tensor d = adapter->delta(x);
  return d.defined() ? y + d : y;
}

void defer_weights(torch::nn::Module& module) {
  torch::NoGradGuard no_grad;
  for (auto& p : module.parameters()) set_parameter_data(p, at::empty(p.sizes(), p.options().device(at::kMeta)));
}

void set_parameter_data(at::Tensor& parameter, const at::Tensor& data) {
  if (parameter.is_meta() == data.is_meta()) {
    parameter.set_data(data);
  } else {
    parameter.unsafeGetTensorImpl()->shallow_copy_from(data.getIntrusivePtr());
  }
}

ResnetBlock2DImpl::ResnetBlock2DImpl(int64_t in_channels, int64_t out_channels, int64_t temb_channels, int64_t groups,
                                     double eps) {
  norm1 = register_module("norm1", nn::GroupNorm(nn::GroupNormOptions(groups, in_channels).eps(eps)));
  conv1 = register_module("conv1", Conv2d(nn::Conv2dOptions(in_channels, out_channels, 3).padding(1)));
  if (temb_channels > 0) time_emb_proj = register_module("time_emb_proj", Linear(temb_channels, out_channels));
  norm2 = register_module("norm2", nn::GroupNorm(nn::GroupNormOptions(groups, out_channels).eps(eps)));
  conv2 = register_module("conv2", Conv2d(nn::Conv2dOptions(out_channels, out_channels, 3).padding(1)));
  if (in_channels != out_channels) {
    conv_shortcut = register_module("conv_shortcut", Conv2d(nn::Conv2dOptions(in_channels, out_channels, 1)));
  }
}

at::Tensor ResnetBlock2DImpl::forward(const at::Tensor& x, const at::Tensor& temb) {
  at::Tensor h = conv1(at::silu(norm1(x)));                                 // (B, C_out, H, W)
  if (time_emb_proj) h = h + time_emb_proj(at::silu(temb)).unsqueeze(-1).unsqueeze(-1);  // + (B, C_out, 1, 1)
  h = conv2(at::silu(norm2(h)));
  return (conv_shortcut ? conv_shortcut(x) : x) + h;
}

Downsample2DImpl::Downsample2DImpl(int64_t channels, bool asymmetric_padding) : asymmetric_padding(asymmetric_padding) {
  conv = register_module(
      "conv", Conv2d(nn::Conv2dOptions(channels, channels, 3).stride(2).padding(asymmetric_padding ? 0 : 1)));
}

at::Tensor Downsample2DImpl::forward(const at::Tensor& x) {
  if (!asymmetric_padding) return conv(x);
  return conv(at::constant_pad_nd(x, {0, 1, 0, 1}, 0));  // (left, right, top, bottom)
}

Upsample2DImpl::Upsample2DImpl(int64_t channels) {
  conv = register_module("conv", Conv2d(nn::Conv2dOptions(channels, channels, 3).padding(1)));
}

at::Tensor Upsample2DImpl::forward(const at::Tensor& x, std::vector<int64_t> size) {
  if (size.empty()) size = {x.size(2) * 2, x.size(3) * 2};
  return conv(F::interpolate(x, F::InterpolateFuncOptions().size(size).mode(torch::kNearest)));
}

c10::Device module_device(const torch::nn::Module& module) {
  for (const auto& p : module.parameters()) return p.device();
  for (const auto& b : module.buffers()) return b.device();
  return c10::Device(c10::kCPU);
}

at::Tensor timestep_embedding(const at::Tensor& timesteps, int64_t dim) {
  const int64_t half = dim / 2;
  // Same operation order as diffusers, so the fp32 frequencies are bit-identical (t reaches ~1000 rad).
  at::Tensor exponent = at::arange(half, timesteps.options().dtype(at::kFloat)) * -std::log(10000.0) / half;
  at::Tensor angles = timesteps.to(at::kFloat).unsqueeze(1) * at::exp(exponent).unsqueeze(0);  // (B, half)
  return at::cat({at::cos(angles), at::sin(angles)}, -1);                                          // (B, dim)
}

at::Tensor randn_from_host(at::IntArrayRef sizes, at::Generator& generator, const at::TensorOptions& options) {
  return at::randn(sizes, generator, options.device(c10::kCPU)).to(options.device());
}

namespace {

// kohya's --sdpa, --xformers and --mem_eff_attn all come to scaled_dot_product_attention here, which picks its kernel
// per call from the device, dtype and shapes. The first attention on a GPU says which it picked.
void log_attention_kernel_once(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal) {
  static std::once_flag once;
  if (q.device().is_cpu()) return;
  std::call_once(once, [&] {
    static const char* const names[] = {"the math path", "flash attention", "memory-efficient attention", "cuDNN attention"};
    const int64_t choice = at::_fused_sdp_choice(q, k, v, {}, 0.0, causal);
    spdlog::info("attention: scaled_dot_product_attention on {} picked {} for {} heads of {} in {}", q.device().str(),
                 choice >= 0 && choice < 4 ? names[choice] : "an unlisted kernel", q.size(1), q.size(3), c10::toString(q.scalar_type()));
  });
}

}  // namespace

at::Tensor multi_head_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t heads,
                                bool causal) {
  const int64_t batch = q.size(0), inner = q.size(2), head_dim = inner / heads;
  auto split = [&](const at::Tensor& t) { return t.view({batch, t.size(1), heads, head_dim}).transpose(1, 2); };
  const at::Tensor q_heads = split(q), k_heads = split(k), v_heads = split(v);
  log_attention_kernel_once(q_heads, k_heads, v_heads, causal);
  at::Tensor out = at::scaled_dot_product_attention(q_heads, k_heads, v_heads, /*attn_mask=*/{}, /*dropout_p=*/0.0,
                                                    /*is_causal=*/causal);  // (B, heads, Nq, D)
  return out.transpose(1, 2).reshape({batch, q.size(1), inner});
}

AutocastState AutocastState::current(c10::DeviceType device) {
  return {device, at::autocast::is_autocast_enabled(device), at::autocast::get_autocast_dtype(device)};
}

AutocastRestore::AutocastRestore(const AutocastState& state) : state_(state), previous_(AutocastState::current(state.device)) {
  at::autocast::set_autocast_enabled(state_.device, state_.enabled);
  at::autocast::set_autocast_dtype(state_.device, state_.dtype);
  if (state_.enabled) at::autocast::increment_nesting();
}

AutocastRestore::~AutocastRestore() {
  if (state_.enabled && at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
  at::autocast::set_autocast_enabled(previous_.device, previous_.enabled);
  at::autocast::set_autocast_dtype(previous_.device, previous_.dtype);
}

namespace {

// The default generator of a device (the CPU's, or a GPU's); its mutex guards its state.
at::Tensor rng_state(c10::Device device) {
  at::Generator generator = at::globalContext().defaultGenerator(device);
  std::lock_guard<std::mutex> lock(generator.mutex());
  return generator.get_state();
}

void set_rng_state(c10::Device device, const at::Tensor& state) {
  at::Generator generator = at::globalContext().defaultGenerator(device);
  std::lock_guard<std::mutex> lock(generator.mutex());
  generator.set_state(state);
}

}  // namespace

RecomputeState RecomputeState::capture(c10::Device device) {
  RecomputeState state{AutocastState::current(device.type()), rng_state(at::kCPU), std::nullopt, {}};
  if (!device.is_cpu()) {
    state.device = device;
    state.device_rng = rng_state(device);
  }
  return state;
}

RecomputeState::Replay::Replay(const RecomputeState& state)
    : autocast_(state.autocast), device_(state.device), saved_cpu_rng_(rng_state(at::kCPU)) {
  set_rng_state(at::kCPU, state.cpu_rng);
  if (device_) {
    saved_device_rng_ = rng_state(*device_);
    set_rng_state(*device_, state.device_rng);
  }
}

RecomputeState::Replay::~Replay() {
  set_rng_state(at::kCPU, saved_cpu_rng_);
  if (device_) set_rng_state(*device_, saved_device_rng_);
}

namespace {

struct BlockHolder : torch::CustomClassHolder {
  BlockHolder(Block block, RecomputeState state, std::shared_ptr<RecomputeHooks> hooks)
      : block(std::move(block)), state(std::move(state)), hooks(std::move(hooks)) {}
  Block block;
  RecomputeState state;
  std::shared_ptr<RecomputeHooks> hooks;
};

// The recompute-in-backward node. Its variable inputs are the block's inputs, the parameters, and the anchor if any,
// so autograd routes the parameter gradients it returns into .grad (or to torch::autograd::grad) like any other.
struct RecomputeInBackward : torch::autograd::Function<RecomputeInBackward> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, c10::IValue holder,
                                                int64_t num_inputs, int64_t num_params, at::TensorList tensors) {
    // Grad mode is off here (autograd::Function runs forward without recording), so nothing is kept but the inputs.
    ctx->saved_data["block"] = holder;
    ctx->saved_data["num_inputs"] = num_inputs;
    ctx->saved_data["num_tensors"] = static_cast<int64_t>(tensors.size());
    ctx->save_for_backward(std::vector<at::Tensor>(tensors.begin(), tensors.begin() + num_inputs + num_params));
    auto* block = static_cast<BlockHolder*>(holder.toCapsule().get());
    if (block->hooks) block->hooks->before_run(false);
    std::vector<at::Tensor> outputs = block->block(std::vector<at::Tensor>(tensors.begin(), tensors.begin() + num_inputs));
    if (block->hooks) block->hooks->after_forward();
    return outputs;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    auto* block = static_cast<BlockHolder*>(ctx->saved_data["block"].toCapsule().get());
    const int64_t num_inputs = ctx->saved_data["num_inputs"].toInt();
    std::vector<at::Tensor> saved = ctx->get_saved_variables();
    RecomputeState::Replay replay(block->state);
    if (block->hooks) block->hooks->before_run(true);

    // Fresh leaves for the inputs, so the recomputed graph ends at them; parameters are leaves already.
    std::vector<at::Tensor> inputs;
    for (int64_t i = 0; i < num_inputs; ++i) inputs.push_back(saved[i].detach().requires_grad_(ctx->needs_input_grad(i)));
    std::vector<at::Tensor> wrt;
    std::vector<size_t> wrt_index;
    for (size_t i = 0; i < saved.size(); ++i) {
      if (!ctx->needs_input_grad(i)) continue;
      wrt.push_back(static_cast<int64_t>(i) < num_inputs ? inputs[i] : saved[i]);
      wrt_index.push_back(i);
    }
    const size_t num_wrt = wrt.size();
    if (block->hooks) {
      const std::vector<at::Tensor> weights = block->hooks->weights();
      wrt.insert(wrt.end(), weights.begin(), weights.end());
    }

    std::vector<at::Tensor> computed(wrt.size());
    if (!wrt.empty()) {
      std::vector<at::Tensor> outputs;
      {
        torch::AutoGradMode enable(true);
        outputs = block->block(inputs);
      }
      computed = gradients_of(outputs, grad_outputs, wrt);
    }
    if (block->hooks) {
      block->hooks->after_backward(std::vector<at::Tensor>(computed.begin() + static_cast<std::ptrdiff_t>(num_wrt), computed.end()));
    }
    // Three undefined gradients for the non-tensor arguments of forward, then one per tensor (none for the anchor).
    torch::autograd::variable_list grads(3 + ctx->saved_data["num_tensors"].toInt());
    for (size_t j = 0; j < num_wrt; ++j) grads[3 + wrt_index[j]] = computed[j];
    return grads;
  }
};

}  // namespace

std::vector<at::Tensor> gradients_of(const std::vector<at::Tensor>& outputs, const std::vector<at::Tensor>& grad_outputs,
                                     const std::vector<at::Tensor>& wrt) {
  std::vector<at::Tensor> differentiated, seeds;
  for (size_t i = 0; i < outputs.size(); ++i) {
    if (!grad_outputs[i].defined() || !outputs[i].requires_grad()) continue;  // an output nothing downstream used
    differentiated.push_back(outputs[i]);
    seeds.push_back(grad_outputs[i]);
  }
  if (differentiated.empty()) return std::vector<at::Tensor>(wrt.size());
  return torch::autograd::grad(differentiated, wrt, seeds, /*retain_graph=*/false, /*create_graph=*/false, /*allow_unused=*/true);
}

std::vector<at::Tensor> checkpointed(Block block, const std::vector<at::Tensor>& inputs, const std::vector<at::Tensor>& params,
                                     std::shared_ptr<RecomputeHooks> hooks, const at::Tensor& anchor) {
  std::vector<at::Tensor> tensors = inputs;
  tensors.insert(tensors.end(), params.begin(), params.end());
  if (anchor.defined()) tensors.push_back(anchor);
  auto holder = c10::IValue::make_capsule(c10::make_intrusive<BlockHolder>(
      std::move(block), RecomputeState::capture(inputs.front().device()), std::move(hooks)));
  return RecomputeInBackward::apply(holder, static_cast<int64_t>(inputs.size()), static_cast<int64_t>(params.size()),
                                    at::TensorList(tensors));
}

std::vector<at::Tensor> run_block(BlockRunner* runner, bool gradient_checkpointing, const torch::nn::Module& module, Block block,
                                  const std::vector<at::Tensor>& inputs) {
  if (runner) return runner->run(module, std::move(block), inputs, module.parameters());
  if (gradient_checkpointing && torch::GradMode::is_enabled()) return checkpointed(std::move(block), inputs, module.parameters());
  return block(inputs);
}

}  // namespace sdt
