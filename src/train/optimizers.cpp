#include "src/train/optimizers.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <string_view>

#include <torch/torch.h>

#include "src/core/error.h"

namespace sdt {

// ---------------------------------------------------------------- base: groups, state, resume

namespace {

std::vector<torch::optim::OptimizerParamGroup> torch_groups(const std::vector<ParamGroup>& groups) {
  std::vector<torch::optim::OptimizerParamGroup> out;
  for (const ParamGroup& group : groups) out.emplace_back(group.params, std::make_unique<GroupLr>(group.lr));
  return out;
}

// A per-parameter entry's name: "<group>.<param>.<name>".
struct StateKey {
  size_t group = 0, param = 0;
  std::string name;
};

std::optional<StateKey> parse_state_key(std::string_view key) {
  StateKey out;
  const size_t first = key.find('.');
  const size_t second = first == std::string_view::npos ? first : key.find('.', first + 1);
  if (second == std::string_view::npos) return std::nullopt;
  const auto group = std::from_chars(key.data(), key.data() + first, out.group);
  const auto param = std::from_chars(key.data() + first + 1, key.data() + second, out.param);
  if (group.ec != std::errc() || group.ptr != key.data() + first || param.ec != std::errc() ||
      param.ptr != key.data() + second)
    return std::nullopt;
  out.name = std::string(key.substr(second + 1));
  return out;
}

double parse_scalar(const std::string& key, const std::string& text) {
  try {
    size_t used = 0;
    double value = std::stod(text, &used);
    if (used == text.size()) return value;
  } catch (const std::exception&) {
  }
  fail("optimizer state", "metadata '{}' is '{}', expected a number", key, text);
}

}  // namespace

Optimizer::Optimizer(std::string kind, const std::vector<ParamGroup>& groups)
    : torch::optim::Optimizer(torch_groups(groups), std::make_unique<GroupLr>(groups.empty() ? 0.0 : groups[0].lr)),
      kind_(std::move(kind)) {
  // LibTorch's add_param_group keeps a group's own options only for its built-in optimizers' types;
  // it gives ours the defaults, so each group's lr is set here.
  for (size_t g = 0; g < groups.size(); ++g) param_groups_[g].set_options(std::make_unique<GroupLr>(groups[g].lr));
}

at::Tensor Optimizer::step(LossClosure closure) {
  at::Tensor loss;
  if (closure) {
    at::AutoGradMode enable_grad(true);
    loss = closure();
  }
  at::NoGradGuard no_grad;
  update();
  return loss;
}

void Optimizer::update() {
  for (size_t g = 0; g < param_groups_.size(); ++g) {
    for (at::Tensor& p : param_groups_[g].params()) {
      if (p.grad().defined()) update_parameter(g, p);
    }
  }
}

void Optimizer::update_parameter(size_t, at::Tensor&) {
  fail("--optimizer_type", "{} steps every parameter together (its step size comes from all of them); it cannot step one alone", kind_);
}

void Optimizer::step_parameters(const std::vector<at::Tensor>& params) {
  if (!updates_each_parameter_alone()) fail("--optimizer_type", "{} steps all parameters together; it cannot step some alone", kind_);
  if (group_of_.empty()) {
    for (size_t g = 0; g < param_groups_.size(); ++g) {
      for (const at::Tensor& p : param_groups_[g].params()) group_of_[p.unsafeGetTensorImpl()] = g;
    }
  }
  at::NoGradGuard no_grad;
  for (at::Tensor p : params) {
    const auto it = group_of_.find(p.unsafeGetTensorImpl());
    if (it == group_of_.end()) fail("optimizer", "step_parameters: a tensor of shape {} is not one of its parameters", c10::str(p.sizes()));
    if (p.grad().defined()) update_parameter(it->second, p);
  }
}

ParamState& Optimizer::state_of(const at::Tensor& param) {
  auto& slot = state_[param.unsafeGetTensorImpl()];
  if (!slot) slot = std::make_unique<ParamState>();
  return static_cast<ParamState&>(*slot);
}

OptimizerState Optimizer::export_state() const {
  OptimizerState out;
  out.metadata["optimizer"] = kind_;
  for (size_t g = 0; g < param_groups_.size(); ++g) {
    const auto& params = param_groups_[g].params();
    for (size_t i = 0; i < params.size(); ++i) {
      auto it = state_.find(params[i].unsafeGetTensorImpl());
      if (it == state_.end()) continue;
      const auto& state = static_cast<const ParamState&>(*it->second);
      const std::string prefix = fmt::format("{}.{}.", g, i);
      out.metadata[prefix + "step"] = std::to_string(state.step);
      for (const auto& [name, tensor] : state.tensors) out.tensors.emplace_back(prefix + name, tensor);
    }
  }
  // fmt's shortest round-trip form: the decimal text reads back to the same double.
  for (const auto& [name, value] : scalars()) out.metadata[name] = fmt::format("{}", value);
  return out;
}

void Optimizer::import_state(const OptimizerState& state) {
  const std::string where = "optimizer state";
  auto kind = state.metadata.find("optimizer");
  if (kind == state.metadata.end() || kind->second != kind_)
    fail(where, "was saved by optimizer '{}', this run uses '{}'",
         kind == state.metadata.end() ? "(none)" : kind->second, kind_);

  const auto param_at = [&](const StateKey& key) -> const at::Tensor& {
    if (key.group >= param_groups_.size() || key.param >= param_groups_[key.group].params().size())
      fail(where, "has state for parameter {} of group {}, but this optimizer has no such parameter", key.param,
           key.group);
    return param_groups_[key.group].params()[key.param];
  };
  state_.clear();
  std::map<std::string, double> scalar_values;
  for (const auto& [name, value] : state.metadata) {
    if (name == "optimizer") continue;
    std::optional<StateKey> key = parse_state_key(name);
    if (!key || key->name != "step") {
      scalar_values[name] = parse_scalar(name, value);
      continue;
    }
    state_of(param_at(*key)).step = static_cast<int64_t>(parse_scalar(name, value));
  }
  for (const auto& [name, tensor] : state.tensors) {
    std::optional<StateKey> key = parse_state_key(name);
    if (!key) fail(where, "tensor '{}' is not named <group>.<parameter>.<state>", name);
    const at::Tensor& param = param_at(*key);
    auto it = state_.find(param.unsafeGetTensorImpl());
    if (it == state_.end()) fail(where, "tensor '{}' belongs to a parameter without a saved step", name);
    static_cast<ParamState&>(*it->second).tensors[key->name] = tensor.to(param.device()).clone();
  }
  set_scalars(scalar_values);
}

void save_optimizer_state(const Optimizer& optimizer, const std::string& path) {
  OptimizerState state = optimizer.export_state();
  save_safetensors(path, state.tensors, state.metadata);
}

void load_optimizer_state(Optimizer& optimizer, const std::string& path) {
  safetensors::File file(path);
  OptimizerState state;
  state.metadata = file.metadata();
  for (const auto& info : file.tensors()) state.tensors.emplace_back(info.name, load_tensor(file, info.name));
  optimizer.import_state(state);
}

// ---------------------------------------------------------------- AdamW (torch.optim.AdamW)

AdamW::AdamW(const std::vector<ParamGroup>& groups, AdamWConfig config) : Optimizer("AdamW", groups), config_(config) {}

void AdamW::update_parameter(size_t group, at::Tensor& p) {
  const auto [beta1, beta2, eps, weight_decay] = config_;
  const double lr = group_lr(group);
  const at::Tensor& grad = p.grad();
  ParamState& state = state_of(p);
  if (state.tensors.empty()) {
    state.tensors["exp_avg"] = at::zeros_like(p, at::MemoryFormat::Preserve);
    state.tensors["exp_avg_sq"] = at::zeros_like(p, at::MemoryFormat::Preserve);
  }
  at::Tensor& exp_avg = state.tensors["exp_avg"];
  at::Tensor& exp_avg_sq = state.tensors["exp_avg_sq"];
  state.step += 1;

  if (weight_decay != 0) p.mul_(1 - lr * weight_decay);
  exp_avg.lerp_(grad, 1 - beta1);
  exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2);
  const double step = static_cast<double>(state.step);
  const double bias_correction1 = 1 - std::pow(beta1, step);
  const double bias_correction2 = 1 - std::pow(beta2, step);
  const double step_size = lr / bias_correction1;
  // PyTorch writes `bias_correction2 ** 0.5`, which is pow, not sqrt; keep it for bitwise results.
  const at::Tensor denom = (exp_avg_sq.sqrt() / std::pow(bias_correction2, 0.5)).add_(eps);
  p.addcdiv_(exp_avg, denom, -step_size);
}

// ---------------------------------------------------------------- AdamW8bit (bitsandbytes)

namespace {

constexpr int64_t kBlock = AdamW8bit::kBlockSize;

// `values` flattened and zero-padded to whole blocks, one block per row.
at::Tensor as_blocks(const at::Tensor& values) {
  const at::Tensor flat = values.reshape({-1});
  const int64_t pad = (kBlock - flat.numel() % kBlock) % kBlock;
  return at::constant_pad_nd(flat, {0, pad}).view({-1, kBlock});
}

// Code value × its block's absmax, in the codes' shape.
at::Tensor dequantize(const at::Tensor& codes, const at::Tensor& absmax, const at::Tensor& map) {
  const at::Tensor values = as_blocks(map.index_select(0, codes.reshape({-1}).to(at::kLong)));
  return values.mul(absmax.unsqueeze(1)).reshape({-1}).slice(0, 0, codes.numel()).view(codes.sizes());
}

// Each block's absmax, and each value's nearest code of `map` after dividing by it (a value exactly
// between two codes takes the lower one, as the kernel's search does). With keep_sign, a code whose
// sign differs from the value's moves one step towards it: a small negative first moment is never
// stored as +0.
void quantize(const at::Tensor& values, const at::Tensor& map, const at::Tensor& midpoints, bool keep_sign,
              at::Tensor& codes, at::Tensor& absmax) {
  const at::Tensor blocks = as_blocks(values);
  absmax.copy_(blocks.abs().amax(1));
  const at::Tensor scale = absmax.unsqueeze(1);
  // An all-zero block has absmax 0: its values are all 0, whatever code they get.
  const at::Tensor normalized = at::where(scale > 0, blocks / scale, at::zeros_like(blocks));
  at::Tensor index = at::bucketize(normalized, midpoints);
  if (keep_sign) {
    const at::Tensor flipped = at::signbit(map.index({index})) != at::signbit(blocks);
    index = index + at::where(flipped, at::where(blocks > 0, 1, -1), 0);
  }
  codes.copy_(index.reshape({-1}).slice(0, 0, codes.numel()).view(codes.sizes()));
}

at::Tensor midpoints_of(const at::Tensor& map) { return (map.slice(0, 0, -1) + map.slice(0, 1)) / 2.0; }

}  // namespace

at::Tensor AdamW8bit::dynamic_map(bool is_signed) {
  // 7 exponent levels 1e-6 .. 1; level i holds 2^i (signed) or 2^(i+1) (unsigned) fractions: the
  // means of neighbouring points of linspace(0.1, 1). Plus 0 and 1: 256 codes. Computed with the same
  // float32 tensor ops as bitsandbytes, so the codes are bitwise its codes.
  std::vector<double> codes;
  const auto append = [&codes](const at::Tensor& level) {
    const at::Tensor values = level.to(at::kDouble).contiguous();
    codes.insert(codes.end(), values.data_ptr<double>(), values.data_ptr<double>() + values.numel());
  };
  for (int i = 0; i < 7; ++i) {
    const int64_t points = (int64_t{1} << (is_signed ? i : i + 1)) + 1;
    const at::Tensor boundaries = at::linspace(0.1, 1, points, at::kFloat);
    const at::Tensor means = (boundaries.slice(0, 0, -1) + boundaries.slice(0, 1)) / 2.0;
    const double scale = std::pow(10.0, -6 + i);
    append(means * scale);
    if (is_signed) append(means * -scale);
  }
  codes.push_back(0.0);
  codes.push_back(1.0);
  std::sort(codes.begin(), codes.end());
  return at::tensor(codes, at::kDouble).to(at::kFloat);
}

AdamW8bit::AdamW8bit(const std::vector<ParamGroup>& groups, AdamW8bitConfig config)
    : Optimizer("AdamW8bit", groups),
      config_(config),
      signed_map_(dynamic_map(true)),
      unsigned_map_(dynamic_map(false)),
      signed_midpoints_(midpoints_of(signed_map_)),
      unsigned_midpoints_(midpoints_of(unsigned_map_)) {}

void AdamW8bit::update_parameter(size_t group, at::Tensor& p) {
  const auto [beta1, beta2, eps, weight_decay, min_8bit_size] = config_;
  const double lr = group_lr(group);
  const at::Tensor grad = p.grad().to(at::kFloat);
  ParamState& state = state_of(p);
  const bool quantized = p.numel() >= min_8bit_size;
  if (state.tensors.empty()) {
    const at::ScalarType type = quantized ? at::kByte : at::kFloat;
    state.tensors["state1"] = at::zeros(p.sizes(), p.options().dtype(type));
    state.tensors["state2"] = at::zeros(p.sizes(), p.options().dtype(type));
    if (quantized) {
      const int64_t blocks = (p.numel() + kBlock - 1) / kBlock;
      state.tensors["absmax1"] = at::zeros({blocks}, p.options().dtype(at::kFloat));
      state.tensors["absmax2"] = at::zeros({blocks}, p.options().dtype(at::kFloat));
    }
  }
  state.step += 1;

  at::Tensor& state1 = state.tensors["state1"];
  at::Tensor& state2 = state.tensors["state2"];
  at::Tensor m = quantized ? dequantize(state1, state.tensors["absmax1"], signed_map_.to(p.device())) : state1;
  at::Tensor v = quantized ? dequantize(state2, state.tensors["absmax2"], unsigned_map_.to(p.device())) : state2;
  m.mul_(beta1).add_(grad, 1 - beta1);
  v.mul_(beta2).addcmul_(grad, grad, 1 - beta2);
  const double step = static_cast<double>(state.step);
  const double correction1 = 1 - std::pow(beta1, step);
  const double correction2 = std::sqrt(1 - std::pow(beta2, step));
  const double step_size = -lr * correction2 / correction1;
  p.add_(m / v.sqrt().add_(correction2 * eps), step_size);
  if (weight_decay > 0) p.mul_(1 - lr * weight_decay);
  if (quantized) {
    quantize(m, signed_map_.to(p.device()), signed_midpoints_.to(p.device()), true, state1, state.tensors["absmax1"]);
    quantize(v, unsigned_map_.to(p.device()), unsigned_midpoints_.to(p.device()), false, state2,
             state.tensors["absmax2"]);
  }
}

// ---------------------------------------------------------------- Lion (lion_pytorch)

Lion::Lion(const std::vector<ParamGroup>& groups, LionConfig config) : Optimizer("Lion", groups), config_(config) {}

void Lion::update_parameter(size_t group, at::Tensor& p) {
  const double weight_decay =
  config_.decoupled_weight_decay ? config_.weight_decay / config_.initial_lr : config_.weight_decay;
  const double lr = group_lr(group);
  const at::Tensor& grad = p.grad();
  ParamState& state = state_of(p);
  if (state.tensors.empty()) state.tensors["exp_avg"] = at::zeros_like(p);
  at::Tensor& exp_avg = state.tensors["exp_avg"];
  state.step += 1;

  p.mul_(1 - lr * weight_decay);
  // The step is the sign of an interpolation that uses beta1; the momentum itself decays with beta2.
  const at::Tensor direction = exp_avg.clone().mul_(config_.beta1).add(grad, 1 - config_.beta1).sgn_();
  p.add_(direction, -lr);
  exp_avg.mul_(config_.beta2).add_(grad, 1 - config_.beta2);
}

// ---------------------------------------------------------------- SGD (torch.optim.SGD)

SGD::SGD(const std::vector<ParamGroup>& groups, SGDConfig config) : Optimizer("SGDNesterov", groups), config_(config) {
  if (config_.nesterov && (config_.momentum <= 0 || config_.dampening != 0))
    fail("optimizer_args", "Nesterov momentum requires a momentum above 0 and zero dampening (got momentum={}, "
                           "dampening={})", config_.momentum, config_.dampening);
}

void SGD::update_parameter(size_t group, at::Tensor& p) {
  const double lr = group_lr(group);
  at::Tensor grad = p.grad();
  ParamState& state = state_of(p);
  state.step += 1;
  if (config_.weight_decay != 0) grad = grad.add(p, config_.weight_decay);
  if (config_.momentum != 0) {
    auto buffer = state.tensors.find("momentum_buffer");
    if (buffer == state.tensors.end()) {
      buffer = state.tensors.emplace("momentum_buffer", grad.detach().clone()).first;
    } else {
      buffer->second.mul_(config_.momentum).add_(grad, 1 - config_.dampening);
    }
    grad = config_.nesterov ? grad.add(buffer->second, config_.momentum) : buffer->second;
  }
  p.add_(grad, -lr);
}

// ---------------------------------------------------------------- Adafactor (transformers)

namespace {

// `source` (fp32) into the bf16 `target`, rounded up or down at random in proportion to the distance: a random 16-bit
// integer added to the fp32 bits, the low 16 bits then dropped (kohya's copy_stochastic_, torch's default generator).
void copy_stochastically_rounded(at::Tensor& target, const at::Tensor& source) {
  at::Tensor bits = at::randint_like(source, 0, 1 << 16, source.options().dtype(at::kInt));
  bits.add_(source.view(at::kInt)).bitwise_and_(-65536);
  target.copy_(bits.view(at::kFloat));
}

at::Tensor root_mean_square(const at::Tensor& t) {
  return t.norm(2) / std::pow(static_cast<double>(t.numel()), 0.5);
}

}  // namespace

Adafactor::Adafactor(const std::vector<ParamGroup>& groups, AdafactorConfig config)
    : Optimizer("Adafactor", groups), config_(config) {
  if (config_.warmup_init && !config_.relative_step)
    fail("optimizer_args", "Adafactor's warmup_init=True requires relative_step=True");
}

double Adafactor::relative_step_size(size_t group, int64_t step) const {
  if (!config_.relative_step) return group_lr(group);
  const double min_step = config_.warmup_init ? 1e-6 * static_cast<double>(step) : 1e-2;
  const double inverse_sqrt = 1.0 / std::sqrt(static_cast<double>(step));
  return inverse_sqrt < min_step ? inverse_sqrt : min_step;
}

double Adafactor::effective_lr(size_t group) const {
  const auto& params = param_groups_.at(group).params();
  auto it = params.empty() ? state_.end() : state_.find(params[0].unsafeGetTensorImpl());
  if (it == state_.end()) return group_lr(group);
  const auto& state = static_cast<const ParamState&>(*it->second);
  const double rms = state.tensors.at("RMS").item<double>();
  const double scale = !config_.scale_parameter ? 1.0 : (rms > config_.eps2 ? rms : config_.eps2);
  return scale * relative_step_size(group, state.step);
}

void Adafactor::update_parameter(size_t group, at::Tensor& p) {
  const AdafactorConfig& c = config_;
  const at::Tensor grad = p.grad().to(at::kFloat);
  const bool factored = grad.dim() >= 2;
  ParamState& state = state_of(p);
  if (state.tensors.empty()) {
    if (c.beta1) state.tensors["exp_avg"] = at::zeros_like(grad);
    if (factored) {
      std::vector<int64_t> row_shape(grad.sizes().begin(), grad.sizes().end() - 1);
      std::vector<int64_t> col_shape(grad.sizes().begin(), grad.sizes().end() - 2);
      col_shape.push_back(grad.size(-1));
      state.tensors["exp_avg_sq_row"] = at::zeros(row_shape, grad.options());
      state.tensors["exp_avg_sq_col"] = at::zeros(col_shape, grad.options());
    } else {
      state.tensors["exp_avg_sq"] = at::zeros_like(grad);
    }
  }
  at::Tensor p_fp32 = p.scalar_type() == at::kFloat ? p : p.to(at::kFloat);
  state.step += 1;
  state.tensors["RMS"] = root_mean_square(p_fp32);

  // transformers' lr is a Python float, or a 0-d float32 tensor once the parameter's RMS scales it;
  // the two round differently (the weight-decay factor most of all), so both forms are kept.
  const double step_size = relative_step_size(group, state.step);
  const at::Tensor& rms = state.tensors["RMS"];
  const bool lr_is_tensor = c.scale_parameter && rms.item<double>() > c.eps2;
  const at::Tensor lr_tensor = lr_is_tensor ? rms * step_size : at::Tensor();
  const double lr_value = (c.scale_parameter ? c.eps2 : 1.0) * step_size;

  const double beta2t = 1.0 - std::pow(static_cast<double>(state.step), c.decay_rate);
  at::Tensor update = grad.pow(2) + c.eps1;
  if (factored) {
    at::Tensor& row = state.tensors["exp_avg_sq_row"];
    at::Tensor& col = state.tensors["exp_avg_sq_col"];
    row.mul_(beta2t).add_(update.mean(-1), 1.0 - beta2t);
    col.mul_(beta2t).add_(update.mean(-2), 1.0 - beta2t);
    // The second moment approximated by the outer product of its row and column means.
    const at::Tensor row_factor = (row / row.mean(-1, true)).rsqrt_().unsqueeze(-1);
    const at::Tensor col_factor = col.unsqueeze(-2).rsqrt();
    update = at::mul(row_factor, col_factor);
    update.mul_(grad);
  } else {
    at::Tensor& exp_avg_sq = state.tensors["exp_avg_sq"];
    exp_avg_sq.mul_(beta2t).add_(update, 1.0 - beta2t);
    update = exp_avg_sq.rsqrt().mul_(grad);
  }
  update.div_((root_mean_square(update) / c.clip_threshold).clamp_min_(1.0));
  if (lr_is_tensor) {
    update.mul_(lr_tensor);
  } else {
    update.mul_(lr_value);
  }
  if (c.beta1) {
    at::Tensor& exp_avg = state.tensors["exp_avg"];
    exp_avg.mul_(*c.beta1).add_(update, 1 - *c.beta1);
    update = exp_avg;
  }
  if (c.weight_decay != 0) {
    const double alpha = lr_is_tensor ? (lr_tensor * -c.weight_decay).item<double>() : -c.weight_decay * lr_value;
    p_fp32.add_(p_fp32, alpha);
  }
  p_fp32.add_(-update);
  if (p_fp32.data_ptr() == p.data_ptr()) return;
  if (c.stochastic_bf16_rounding && p.scalar_type() == at::kBFloat16) {
    copy_stochastically_rounded(p, p_fp32);
  } else {
    p.copy_(p_fp32);
  }
}

// ---------------------------------------------------------------- Prodigy (prodigyopt)

Prodigy::Prodigy(const std::vector<ParamGroup>& groups, ProdigyConfig config)
    : Optimizer("Prodigy", groups), config_(config), d_(config.d0), d_max_(config.d0) {
  if (config_.slice_p < 1) fail("optimizer_args", "Prodigy's slice_p must be at least 1, got {}", config_.slice_p);
}

std::map<std::string, double> Prodigy::scalars() const {
  return {{"d", d_}, {"d_max", d_max_}, {"d_numerator", d_numerator_}, {"k", static_cast<double>(k_)}};
}

void Prodigy::set_scalars(const std::map<std::string, double>& values) {
  for (const char* name : {"d", "d_max", "d_numerator", "k"})
    if (!values.count(name)) fail("optimizer state", "Prodigy state lacks '{}'", name);
  d_ = values.at("d");
  d_max_ = values.at("d_max");
  d_numerator_ = values.at("d_numerator");
  k_ = static_cast<int64_t>(values.at("k"));
}

void Prodigy::update() {
  const ProdigyConfig& c = config_;
  const double beta3 = c.beta3 ? *c.beta3 : std::sqrt(c.beta2);
  double lr = 0;
  for (size_t g = 0; g < param_groups_.size(); ++g) lr = std::max(lr, group_lr(g));
  const double k = static_cast<double>(k_);
  const double bias_correction =
      c.use_bias_correction ? std::pow(1 - std::pow(c.beta2, k + 1), 0.5) / (1 - std::pow(c.beta1, k + 1)) : 1.0;
  const double dlr = d_ * lr * bias_correction;
  const auto every_nth = [&](const at::Tensor& t) { return t.reshape({-1}).slice(0, 0, std::nullopt, c.slice_p); };

  // Pass 1: moments, and the numerator and denominator of the new estimate d_hat.
  double delta_numerator = 0, d_denom = 0;
  for (size_t g = 0; g < param_groups_.size(); ++g) {
    const double group_lr_value = group_lr(g);
    if (group_lr_value != lr && group_lr_value != 0.0)
      fail("learning rates", "Prodigy needs one learning rate for every parameter group (or 0 for a frozen group); "
                             "group {} has {}, another has {}", g, group_lr_value, lr);
    for (at::Tensor& p : param_groups_[g].params()) {
      if (!p.grad().defined()) continue;
      at::Tensor grad = p.grad();
      if (c.weight_decay != 0 && !c.decouple) grad.add_(p, c.weight_decay);
      ParamState& state = state_of(p);
      if (state.tensors.empty()) {
        state.tensors["s"] = at::zeros_like(every_nth(p));
        // An all-zero parameter (a LoRA up weight) keeps a scalar 0 as its starting point.
        state.tensors["p0"] = p.any().item<bool>() ? every_nth(p).clone() : at::zeros({}, p.options());
        if (c.beta1 > 0) state.tensors["exp_avg"] = at::zeros_like(p);
        state.tensors["exp_avg_sq"] = at::zeros_like(p);
      }
      if (group_lr_value > 0.0) {
        const at::Tensor sliced_grad = every_nth(grad);
        at::Tensor& s = state.tensors["s"];
        const double distance = at::dot(sliced_grad, state.tensors["p0"] - every_nth(p)).item<double>();
        delta_numerator += (d_ / c.d0) * dlr * distance;
        if (c.beta1 > 0) state.tensors["exp_avg"].mul_(c.beta1).add_(grad, d_ * (1 - c.beta1));
        state.tensors["exp_avg_sq"].mul_(c.beta2).addcmul_(grad, grad, d_ * d_ * (1 - c.beta2));
        s.mul_(beta3).add_(sliced_grad, c.safeguard_warmup ? (d_ / c.d0) * d_ : (d_ / c.d0) * dlr);
        d_denom += s.abs().sum().item<double>();
      }
    }
  }
  // No gradient signal at all: the reference returns before touching anything else.
  if (d_denom == 0) return;

  if (lr > 0.0) {
    d_numerator_ = d_numerator_ * beta3 + delta_numerator;
    const double d_hat = c.d_coef * d_numerator_ / d_denom;
    double d = d_;
    if (d == c.d0) d = d_hat > d ? d_hat : d;
    d_max_ = d_hat > d_max_ ? d_hat : d_max_;
    const double grown = d * c.growth_rate;
    d_ = grown < d_max_ ? grown : d_max_;
  }

  // Pass 2: the Adam step with the new d (and the old d·lr).
  for (size_t g = 0; g < param_groups_.size(); ++g) {
    for (at::Tensor& p : param_groups_[g].params()) {
      if (!p.grad().defined()) continue;
      ParamState& state = state_of(p);
      state.step += 1;
      const at::Tensor denom = state.tensors["exp_avg_sq"].sqrt().add_(d_ * c.eps);
      if (c.weight_decay != 0 && c.decouple) p.add_(p, -c.weight_decay * dlr);
      if (c.beta1 > 0) {
        p.addcdiv_(state.tensors["exp_avg"], denom, -dlr);
      } else {
        p.addcdiv_(p.grad(), denom, -dlr * d_);
      }
    }
  }
  k_ += 1;
}

}  // namespace sdt
