#include "src/networks/lora.h"

#include <algorithm>
#include <cmath>
#include <numbers>
#include <regex>
#include <set>

#include <ATen/autocast_mode.h>
#include <spdlog/spdlog.h>

#include "src/core/error.h"
#include "src/core/text.h"
#include "src/networks/lora_metadata.h"

namespace sdt {

namespace nn = torch::nn;

namespace {

bool is_linear(const nn::Module& m) { return dynamic_cast<const nn::LinearImpl*>(&m) != nullptr; }

bool is_conv_1x1(const nn::Module& m) {
  auto* conv = dynamic_cast<const nn::Conv2dImpl*>(&m);
  return conv && (*conv->options.kernel_size())[0] == 1 && (*conv->options.kernel_size())[1] == 1;
}

// torch's default init of a Linear / Conv2d weight, kaiming_uniform_(a = sqrt(5)), with the same double arithmetic
// as torch.nn.init so the bound (and so every drawn value) is bit-identical.
void kaiming_uniform_a_sqrt5(at::Tensor& weight, at::Generator& generator) {
  torch::NoGradGuard no_grad;
  const double fan_in = static_cast<double>(weight.numel() / weight.size(0));
  const double a = std::sqrt(5.0);
  const double gain = std::sqrt(2.0 / (1 + a * a));
  const double bound = std::sqrt(3.0) * (gain / std::sqrt(fan_in));
  weight.uniform_(-bound, bound, generator);
}

// Python's re.search(pattern, text) for kohya's network_reg_dims / network_reg_lrs patterns, in ECMAScript syntax
// (which reads the patterns such arguments hold: classes, alternatives, anchors, repeats); one that does not compile
// is an sdt::Error naming `key`.
bool regex_search_python(const std::string& pattern, const std::string& text, const char* key) {
  try {
    return std::regex_search(text, std::regex(pattern));
  } catch (const std::regex_error& e) {
    fail(std::string("network_args ") + key, "'{}' is not a regular expression sdt reads: {}", pattern, e.what());
  }
}

std::vector<double> parse_floats(const std::string& key, const std::string& text, bool empty_is_zero) {
  std::vector<double> values;
  for (const std::string& item : split(text, ',')) {
    std::string s = trim(item);
    if (s.empty() && empty_is_zero) {
      values.push_back(0.0);
      continue;
    }
    try {
      size_t used = 0;
      values.push_back(std::stod(s, &used));
      if (used != s.size()) throw std::invalid_argument(s);
    } catch (const std::exception&) {
      fail("network_args " + key, "'{}' is not a number (expected a comma-separated list of numbers)", s);
    }
  }
  return values;
}

std::vector<int64_t> parse_block_ints(const std::string& key, const std::string& text, const NetworkBlockLayout& blocks) {
  std::vector<int64_t> values;
  for (double v : parse_floats(key, text, false)) {
    if (v != std::floor(v)) fail("network_args " + key, "{} is not an integer", v);
    values.push_back(static_cast<int64_t>(v));
  }
  if (values.size() != static_cast<size_t>(blocks.total())) {
    fail("network_args " + key, "{} values given, expected {} (kohya's {} block layout)", values.size(), blocks.total(), blocks.family);
  }
  return values;
}

std::vector<double> parse_block_floats(const std::string& key, const std::string& text, const NetworkBlockLayout& blocks) {
  std::vector<double> values = parse_floats(key, text, false);
  if (values.size() != static_cast<size_t>(blocks.total())) {
    fail("network_args " + key, "{} values given, expected {} (kohya's {} block layout)", values.size(), blocks.total(), blocks.family);
  }
  return values;
}

double parse_number(const std::string& key, const std::string& text) {
  auto values = parse_floats(key, text, false);
  if (values.size() != 1) fail("network_args " + key, "expected one number, got '{}'", text);
  return values[0];
}

}  // namespace

// ---------------------------------------------------------------------------------------------------- LoRAModule

LoRAModuleImpl::LoRAModuleImpl(std::string lora_name, std::shared_ptr<nn::Module> target, int64_t dim,
                               std::optional<double> requested_alpha, at::Generator generator, std::vector<int64_t> split_dims)
    : lora_name(std::move(lora_name)), target(std::move(target)), dim_(dim), split_dims_(std::move(split_dims)) {
  if (dim <= 0) fail(this->lora_name, "LoRA dim must be positive, got {}", dim);
  // kohya: torch's constructors draw default inits for the downs and the ups, then the downs are drawn again and the
  // ups zeroed.
  std::vector<at::Tensor> downs, ups;
  auto* linear = dynamic_cast<nn::LinearImpl*>(this->target.get());
  if (is_split()) {
    if (!linear) fail(this->lora_name, "split_qkv splits a Linear only");
    const int64_t in = linear->options.in_features(), out = linear->options.out_features();
    int64_t parts_out = 0;
    for (int64_t d : split_dims_) parts_out += d;
    if (parts_out != out) fail(this->lora_name, "split dims add up to {}, the layer has {} outputs", parts_out, out);
    split_down = register_module("lora_down", nn::ModuleList());
    split_up = register_module("lora_up", nn::ModuleList());
    for (size_t i = 0; i < split_dims_.size(); ++i) split_down->push_back(nn::Linear(nn::LinearOptions(in, dim).bias(false)));
    for (int64_t part : split_dims_) split_up->push_back(nn::Linear(nn::LinearOptions(dim, part).bias(false)));
    for (const auto& m : *split_down) downs.push_back(m->as<nn::Linear>()->weight);
    for (const auto& m : *split_up) ups.push_back(m->as<nn::Linear>()->weight);
  } else if (linear) {
    const int64_t in = linear->options.in_features(), out = linear->options.out_features();
    linear_down = register_module("lora_down", nn::Linear(nn::LinearOptions(in, dim).bias(false)));
    linear_up = register_module("lora_up", nn::Linear(nn::LinearOptions(dim, out).bias(false)));
    downs = {linear_down->weight};
    ups = {linear_up->weight};
  } else if (auto* conv = dynamic_cast<nn::Conv2dImpl*>(this->target.get())) {
    const auto& o = conv->options;
    auto padding = std::get_if<torch::ExpandingArray<2>>(&o.padding());
    if (!padding) fail(this->lora_name, "conv LoRA needs numeric padding on its target");
    conv_down = register_module("lora_down", nn::Conv2d(nn::Conv2dOptions(o.in_channels(), dim, o.kernel_size())
                                                             .stride(o.stride()).padding(*padding).bias(false)));
    conv_up = register_module("lora_up", nn::Conv2d(nn::Conv2dOptions(dim, o.out_channels(), 1).bias(false)));
    downs = {conv_down->weight};
    ups = {conv_up->weight};
  } else {
    fail(this->lora_name, "LoRA targets a Linear or a Conv2d only");
  }
  for (at::Tensor& w : downs) kaiming_uniform_a_sqrt5(w, generator);
  for (at::Tensor& w : ups) kaiming_uniform_a_sqrt5(w, generator);
  for (at::Tensor& w : downs) kaiming_uniform_a_sqrt5(w, generator);
  {
    torch::NoGradGuard no_grad;
    for (at::Tensor& w : ups) w.zero_();
  }
  // alpha None or 0 means alpha = dim, which Python keeps as an int (so the buffer is int64, as kohya saves it).
  const bool alpha_is_dim = !requested_alpha || *requested_alpha == 0;
  alpha = register_buffer("alpha", alpha_is_dim ? at::scalar_tensor(dim, at::kLong) : at::scalar_tensor(*requested_alpha, at::kFloat));
  scale_ = alpha_value() / static_cast<double>(dim);
}

double LoRAModuleImpl::alpha_value() const { return alpha.to(at::kDouble).item<double>(); }

const at::Tensor& LoRAModuleImpl::lora_down_weight() const {
  if (is_split()) fail(lora_name, "a split LoRA has one down weight per part");
  return is_conv() ? conv_down->weight : linear_down->weight;
}

const at::Tensor& LoRAModuleImpl::lora_up_weight() const {
  if (is_split()) fail(lora_name, "a split LoRA has one up weight per part");
  return is_conv() ? conv_up->weight : linear_up->weight;
}

std::pair<at::Tensor, at::Tensor> LoRAModuleImpl::file_weights() const {
  if (!is_split()) return {lora_down_weight(), lora_up_weight()};
  std::vector<at::Tensor> downs, ups;
  for (const auto& m : *split_down) downs.push_back(m->as<nn::Linear>()->weight);
  for (const auto& m : *split_up) ups.push_back(m->as<nn::Linear>()->weight);
  return {at::cat(downs, 0), at::block_diag(ups)};
}

void LoRAModuleImpl::set_file_weights(const at::Tensor& down, const at::Tensor& up, const std::string& file_key) {
  torch::NoGradGuard no_grad;
  const auto [own_down, own_up] = file_weights();
  for (auto [file, own, what] : {std::tuple{down, own_down, "lora_down"}, std::tuple{up, own_up, "lora_up"}}) {
    if (file.sizes() != own.sizes()) {
      fail(file_key + "." + what + ".weight", "shape [{}] does not match the network's [{}] (different dim or model?)",
           fmt::join(file.sizes(), ", "), fmt::join(own.sizes(), ", "));
    }
  }
  if (!is_split()) {
    lora_down_weight().copy_(down);
    lora_up_weight().copy_(up);
    return;
  }
  // kohya's lora_flux load_state_dict: the downs in equal chunks, each up from its diagonal block.
  int64_t row = 0;
  for (size_t i = 0; i < split_dims_.size(); ++i) {
    const auto part = static_cast<int64_t>(i);
    split_down[i]->as<nn::Linear>()->weight.copy_(down.narrow(0, part * dim_, dim_));
    split_up[i]->as<nn::Linear>()->weight.copy_(up.narrow(0, row, split_dims_[i]).narrow(1, part * dim_, dim_));
    row += split_dims_[i];
  }
}

Adaptable& LoRAModuleImpl::adaptable_target() const {
  auto* adaptable = dynamic_cast<Adaptable*>(target.get());
  if (!adaptable) fail(lora_name, "the target layer takes no adapter (a model must build it from sdt::Linear / sdt::Conv2d)");
  return *adaptable;
}

void LoRAModuleImpl::apply_to_target() {
  Adaptable& layer = adaptable_target();
  if (layer.adapter && layer.adapter != this) fail(lora_name, "its layer already has another adapter");
  layer.adapter = this;
  // Registered under the layer too, so a block's parameters() (what gradient checkpointing and full sharding
  // differentiate against) include the LoRA weights inside it.
  if (!target->named_children().contains("lora")) target->register_module("lora", shared_from_this());
}

void LoRAModuleImpl::remove_from_target() {
  Adaptable& layer = adaptable_target();
  if (layer.adapter != this) return;
  layer.adapter = nullptr;
  target->unregister_module("lora");
}

at::Tensor LoRAModuleImpl::delta(const at::Tensor& x) {
  // kohya's LoRAModule.forward, less the layer's own output; every draw is from the default generator, as kohya's.
  if (module_dropout && is_training() && at::rand({1}).item<float>() < *module_dropout) return {};
  std::vector<at::Tensor> hs;
  if (is_split()) {
    for (const auto& m : *split_down) hs.push_back(m->as<nn::Linear>()->forward(x));
  } else {
    hs.push_back(is_conv() ? conv_down(x) : linear_down(x));
  }
  if (dropout && is_training()) {
    for (at::Tensor& h : hs) h = at::dropout(h, *dropout, /*train=*/true);
  }
  double scale = scale_;
  if (rank_dropout && is_training()) {
    std::vector<at::Tensor> masks;  // (B, r) per part: per sample; all drawn before any is applied, as kohya's
    for (const at::Tensor& h : hs) masks.push_back(at::rand({h.size(0), dim_}, h.options().dtype(at::kFloat)) > *rank_dropout);
    for (size_t i = 0; i < hs.size(); ++i) {
      at::Tensor mask = masks[i];
      if (hs[i].dim() == 3) mask = mask.unsqueeze(1);                       // (B, 1, r): tokens
      if (hs[i].dim() == 4) mask = mask.unsqueeze(-1).unsqueeze(-1);        // (B, r, 1, 1): pixels
      hs[i] = hs[i] * mask;
    }
    scale = scale * (1.0 / (1.0 - *rank_dropout));  // as if the rank had shrunk
  }
  at::Tensor out;
  if (is_split()) {
    for (size_t i = 0; i < hs.size(); ++i) hs[i] = split_up[i]->as<nn::Linear>()->forward(hs[i]);
    out = at::cat(hs, -1);
  } else {
    out = is_conv() ? conv_up(hs[0]) : linear_up(hs[0]);
  }
  out = out * (multiplier * scale);
  if (!ggpo) return out;
  // LoRA-GGPO: kohya measures the base weight at the module's creation; here the target's weight is measured where it
  // is sure to be whole (a block engine holds it only while its block runs). It is frozen, so the value is the same.
  const nn::LinearImpl& layer = *target->as<nn::LinearImpl>();
  if (!ggpo->org_weight_norm.defined()) {
    torch::NoGradGuard no_grad;
    ggpo->org_weight_norm = at::linalg_vector_norm(layer.weight.detach().to(at::kFloat), 2, {1}, true).mean();
  }
  if (!is_training() || !ggpo->grad_norms.defined()) return out;
  at::Tensor perturbation_output;
  {
    torch::NoGradGuard no_grad;
    const at::Tensor& down = linear_down->weight;
    at::Tensor perturbation = at::randn({layer.options.out_features(), layer.options.in_features()}, down.options());
    perturbation.mul_(ggpo_perturbation_std().to(down.device()));
    perturbation_output = at::matmul(x, perturbation.t());
  }
  return out + perturbation_output;
}

at::Tensor LoRAModuleImpl::ggpo_perturbation_std() const {
  if (!ggpo || !ggpo->grad_norms.defined()) return {};
  const double norm_factor = 1.0 / std::sqrt(static_cast<double>(target->as<nn::LinearImpl>()->options.out_features()));
  return (at::sqrt(ggpo->combined_weight_norms.pow(2)) * ggpo->sigma + ggpo->grad_norms.pow(2) * ggpo->beta) * norm_factor;
}

namespace {

// torch.autocast(device_type) with that type's default dtype (float16 on CUDA, bfloat16 on the CPU), restored on
// leaving: what kohya's update_grad_norms opens.
class DefaultAutocast {
 public:
  explicit DefaultAutocast(c10::DeviceType device)
      : device_(device), was_enabled_(at::autocast::is_autocast_enabled(device)), was_dtype_(at::autocast::get_autocast_dtype(device)) {
    at::autocast::set_autocast_dtype(device, device == c10::DeviceType::CUDA ? at::kHalf : at::kBFloat16);
    at::autocast::set_autocast_enabled(device, true);
    at::autocast::increment_nesting();
  }
  ~DefaultAutocast() {
    if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
    at::autocast::set_autocast_enabled(device_, was_enabled_);
    at::autocast::set_autocast_dtype(device_, was_dtype_);
  }
  DefaultAutocast(const DefaultAutocast&) = delete;
  DefaultAutocast& operator=(const DefaultAutocast&) = delete;

 private:
  c10::DeviceType device_;
  bool was_enabled_;
  at::ScalarType was_dtype_;
};

}  // namespace

void LoRAModuleImpl::update_ggpo_norms() {
  if (!ggpo || !is_training()) return;
  torch::NoGradGuard no_grad;
  const at::Tensor& down = linear_down->weight;
  const at::Tensor& up = linear_up->weight;
  if (down.grad().defined() && up.grad().defined()) {
    DefaultAutocast autocast(down.device().type());
    const at::Tensor approx_grad = (at::matmul(up, down.grad()) + at::matmul(up.grad(), down)) * scale_;
    ggpo->grad_norms = at::linalg_vector_norm(approx_grad, 2, {1}, true);
  }
  // kohya's update_norms measures up @ down unscaled (its `module_weights.mul(self.scale)` is not in place).
  const at::Tensor module_weights = at::matmul(up, down);
  ggpo->weight_norms = at::linalg_vector_norm(module_weights, 2, {1}, true);
  ggpo->combined_weight_norms = at::sqrt(ggpo->org_weight_norm.pow(2) + module_weights.pow(2).sum(1, true));
}

at::Tensor LoRAModuleImpl::delta_weight() const {
  auto [down, up] = file_weights();
  down = down.to(at::kFloat);
  up = up.to(at::kFloat);
  at::Tensor delta;
  if (down.dim() == 2) {
    delta = at::matmul(up, down);  // (out, in); a split module's block-diagonal up gives each part its own
  } else if (down.size(2) == 1 && down.size(3) == 1) {
    delta = at::matmul(up.flatten(1), down.flatten(1)).unsqueeze(2).unsqueeze(3);  // (out, in, 1, 1)
  } else {
    // The kernel of conv(up, conv(down, x)): conv2d(down^T, up)^T, (out, in, kh, kw).
    delta = at::conv2d(down.permute({1, 0, 2, 3}), up).permute({1, 0, 2, 3});
  }
  return delta * (multiplier * scale_);
}

// ---------------------------------------------------------------------------------------------------- configuration

std::optional<std::vector<double>> block_lr_weight(const std::optional<std::string>& down, const std::optional<std::string>& mid,
                                                   const std::optional<std::string>& up, double zero_threshold,
                                                   const NetworkBlockLayout& blocks) {
  if (!down && !mid && !up) return std::nullopt;
  // A list when it has a comma, else a preset name with an optional "+base".
  auto side = [&](const std::string& key, const std::string& text) -> std::vector<double> {
    std::vector<double> w;
    if (text.find(',') != std::string::npos) {
      w = parse_floats(key, text, true);
    } else {
      auto plus = text.find('+');
      const std::string name = text.substr(0, plus);
      const double base = plus == std::string::npos ? 0.0 : parse_number(key, text.substr(plus + 1));
      const double last = blocks.side - 1;
      for (int i = 0; i < blocks.side; ++i) {
        const int r = blocks.side - 1 - i;  // reversed(range(n))
        if (name == "cosine") w.push_back(std::sin(std::numbers::pi * (r / last) / 2) + base);
        else if (name == "sine") w.push_back(std::sin(std::numbers::pi * (i / last) / 2) + base);
        else if (name == "linear") w.push_back(i / last + base);
        else if (name == "reverse_linear") w.push_back(r / last + base);
        else if (name == "zeros") w.push_back(0.0 + base);
        else fail("network_args " + key, "unknown preset '{}' (expected a comma list or cosine, sine, linear, reverse_linear, zeros)", name);
      }
    }
    w.resize(blocks.side, 1.0);  // kohya cuts long lists and pads short ones with 1.0
    return w;
  };
  auto threshold = [&](std::vector<double> w) {
    for (double& v : w) v = v > zero_threshold ? v : 0.0;
    return w;
  };
  std::vector<double> down_w = down ? threshold(side("down_lr_weight", *down)) : std::vector<double>(blocks.side, 1.0);
  std::vector<double> mid_w(blocks.mid, 1.0);
  if (mid) {
    mid_w = parse_floats("mid_lr_weight", *mid, true);
    mid_w.resize(blocks.mid, 1.0);
    mid_w = threshold(mid_w);
  }
  std::vector<double> up_w = up ? threshold(side("up_lr_weight", *up)) : std::vector<double>(blocks.side, 1.0);
  std::vector<double> weights;
  if (blocks.outer_blocks) weights.push_back(1.0);  // SDXL's embeddings
  weights.insert(weights.end(), down_w.begin(), down_w.end());
  weights.insert(weights.end(), mid_w.begin(), mid_w.end());
  weights.insert(weights.end(), up_w.begin(), up_w.end());
  if (blocks.outer_blocks) weights.push_back(1.0);  // SDXL's output
  return weights;
}

std::map<std::string, std::string> read_network_args(const std::vector<std::string>& network_args,
                                                     const std::vector<std::string>& known, const std::string& module) {
  std::map<std::string, std::string> kwargs;
  for (const std::string& arg : network_args) {
    auto eq = arg.find('=');
    if (eq == std::string::npos) fail("network_args", "'{}' is not key=value", arg);
    std::string key = trim(arg.substr(0, eq));
    if (std::find(known.begin(), known.end(), key) == known.end()) {
      fail("network_args " + key, "not an argument of {}{}", module, did_you_mean(key, known));
    }
    kwargs[key] = trim(arg.substr(eq + 1));
  }
  return kwargs;
}

double network_arg_number(const std::string& key, const std::string& text) { return parse_number(key, text); }

LoRANetworkConfig parse_lora_network_args(std::optional<int64_t> network_dim, std::optional<double> network_alpha,
                                          std::optional<double> network_dropout, const std::vector<std::string>& network_args,
                                          const NetworkBlockLayout& blocks) {
  static const std::vector<std::string> known{
      "conv_dim",          "conv_alpha",          "block_dims",        "block_alphas",         "conv_block_dims",
      "conv_block_alphas", "down_lr_weight",      "mid_lr_weight",     "up_lr_weight",         "block_lr_zero_threshold",
      "rank_dropout",      "module_dropout",      "loraplus_lr_ratio", "loraplus_unet_lr_ratio",
      "loraplus_text_encoder_lr_ratio"};
  const std::map<std::string, std::string> kwargs = read_network_args(network_args, known, "networks.lora");
  auto get = [&](const std::string& key) -> std::optional<std::string> {
    auto it = kwargs.find(key);
    return it == kwargs.end() ? std::nullopt : std::optional<std::string>(it->second);
  };
  auto number = [&](const std::string& key) -> std::optional<double> {
    auto v = get(key);
    return v ? std::optional<double>(parse_number(key, *v)) : std::nullopt;
  };

  LoRANetworkConfig c;
  c.dim = network_dim.value_or(4);
  c.alpha = network_alpha.value_or(1.0);
  c.dropout = network_dropout;
  c.blocks = blocks;
  const int total = blocks.total();
  if (auto conv_dim = number("conv_dim")) {
    c.conv_dim = static_cast<int64_t>(*conv_dim);
    c.conv_alpha = number("conv_alpha").value_or(1.0);
  }
  c.block_lr_weight = block_lr_weight(get("down_lr_weight"), get("mid_lr_weight"), get("up_lr_weight"),
                                      number("block_lr_zero_threshold").value_or(0.0), blocks);
  auto block_dims = get("block_dims");
  if (block_dims || c.block_lr_weight) {
    // kohya's get_block_dims_and_alphas: every block list is filled, from the flat values where not given.
    c.block_dims = block_dims ? parse_block_ints("block_dims", *block_dims, blocks) : std::vector<int64_t>(total, c.dim);
    auto alphas = get("block_alphas");
    c.block_alphas = alphas ? parse_block_floats("block_alphas", *alphas, blocks) : std::vector<double>(total, c.alpha);
    if (auto conv_dims = get("conv_block_dims")) {
      c.conv_block_dims = parse_block_ints("conv_block_dims", *conv_dims, blocks);
      auto conv_alphas = get("conv_block_alphas");
      c.conv_block_alphas = conv_alphas ? parse_block_floats("conv_block_alphas", *conv_alphas, blocks)
                                        : std::vector<double>(total, c.conv_alpha.value_or(1.0));
    } else if (c.conv_dim) {
      c.conv_block_dims = std::vector<int64_t>(total, *c.conv_dim);
      c.conv_block_alphas = std::vector<double>(total, *c.conv_alpha);
    }
    // Blocks whose learning-rate weight is 0 get no modules.
    if (c.block_lr_weight) {
      for (int i = 0; i < total; ++i) {
        if ((*c.block_lr_weight)[i] != 0) continue;
        (*c.block_dims)[i] = 0;
        if (c.conv_block_dims) (*c.conv_block_dims)[i] = 0;
      }
    }
  }
  c.rank_dropout = number("rank_dropout");
  c.module_dropout = number("module_dropout");
  c.loraplus_lr_ratio = number("loraplus_lr_ratio");
  c.loraplus_unet_lr_ratio = number("loraplus_unet_lr_ratio");
  c.loraplus_text_encoder_lr_ratio = number("loraplus_text_encoder_lr_ratio");
  return c;
}

std::map<std::string, std::pair<int64_t, std::optional<double>>> lora_dims_from_file(const safetensors::File& file) {
  std::map<std::string, std::pair<int64_t, std::optional<double>>> dims;
  std::map<std::string, double> alphas;
  for (const auto& t : file.tensors()) {
    auto dot = t.name.find('.');
    if (dot == std::string::npos) continue;
    const std::string module = t.name.substr(0, dot);
    if (t.name.find("alpha") != std::string::npos) {
      alphas[module] = load_tensor(file, t.name, at::kDouble).item<double>();
    } else if (t.name.find("lora_down") != std::string::npos) {
      if (t.shape.empty()) fail(file.path() + ": tensor '" + t.name + "'", "lora_down weight has no dimensions");
      dims[module].first = t.shape[0];
    }
  }
  for (auto& [module, dim_alpha] : dims) {
    auto it = alphas.find(module);
    if (it != alphas.end()) dim_alpha.second = it->second;
  }
  return dims;
}

// ---------------------------------------------------------------------------------------------------- LoRANetwork

LoRANetworkImpl::LoRANetworkImpl(const LoRANetworkConfig& config, const std::vector<NetworkTarget>& targets,
                                 bool apply_text_encoder, bool apply_unet, at::Generator generator)
    : config(config) {
  for (const NetworkTarget& t : targets) {
    const bool linear_like = is_linear(*t.module) || is_conv_1x1(*t.module);
    std::optional<int64_t> dim;
    std::optional<double> alpha;
    if (!t.other_name.empty()) other_names_.emplace(t.lora_name, t.other_name);
    std::optional<int64_t> module_dim;  // the network module's own choice (target_dim)
    if (!config.modules_dim_alpha && config.target_dim) {
      module_dim = config.target_dim(t);
      if (!module_dim) continue;  // not among this network's targets
    }
    const auto reg_dim = std::find_if(config.reg_dims.begin(), config.reg_dims.end(),
                                      [&](const auto& reg) { return regex_search_python(reg.first, t.lora_name, "network_reg_dims"); });
    if (config.modules_dim_alpha) {
      auto it = config.modules_dim_alpha->find(t.lora_name);
      if (it == config.modules_dim_alpha->end() && !t.other_name.empty()) it = config.modules_dim_alpha->find(t.other_name);
      if (it != config.modules_dim_alpha->end()) std::tie(dim, alpha) = it->second;
    } else if (reg_dim != config.reg_dims.end()) {
      dim = reg_dim->second;
      alpha = config.alpha;
    } else if (module_dim && linear_like) {
      dim = *module_dim;
      alpha = config.alpha;
    } else if (t.in_denoiser && config.block_dims) {
      int idx = t.block;
      if (idx < 0) idx = config.blocks.total() - 1;  // Python's list[-1]
      if (linear_like) {
        dim = (*config.block_dims)[idx];
        alpha = (*config.block_alphas)[idx];
      } else if (config.conv_block_dims) {
        dim = (*config.conv_block_dims)[idx];
        alpha = (*config.conv_block_alphas)[idx];
      }
    } else if (linear_like) {
      dim = config.dim;
      alpha = config.alpha;
    } else if (config.conv_dim) {
      dim = config.conv_dim;
      alpha = config.conv_alpha;
    }
    if (!dim || *dim == 0) {
      if (linear_like || config.conv_dim || config.conv_block_dims) skipped.push_back(t.lora_name);
      continue;
    }
    auto lora = LoRAModule(t.lora_name, t.module, *dim, alpha, generator, config.split_qkv ? t.split_dims : std::vector<int64_t>{});
    lora->block = t.block;
    lora->text_encoder = t.text_encoder;
    lora->multiplier = config.multiplier;
    lora->dropout = config.dropout;
    lora->rank_dropout = config.rank_dropout;
    lora->module_dropout = config.module_dropout;
    if (config.ggpo_sigma_beta && !lora->is_split() && !lora->is_conv()) {
      lora->ggpo = LoRAModuleImpl::Ggpo{.sigma = config.ggpo_sigma_beta->first, .beta = config.ggpo_sigma_beta->second};
    }
    (t.in_denoiser ? unet_loras : text_encoder_loras).push_back(lora);
  }

  if (config.verbose) {
    for (const auto* list : {&text_encoder_loras, &unet_loras}) {
      for (const auto& lora : *list) spdlog::info("\t{:50} {}, {}", lora->lora_name, lora->dim(), lora->alpha_value());
    }
    if (!skipped.empty()) spdlog::warn("{} LoRA modules are skipped because their dim is 0:", skipped.size());
    for (const std::string& name : skipped) spdlog::info("\t{}", name);
  }
  if (!apply_text_encoder) text_encoder_loras.clear();
  if (!apply_unet) unet_loras.clear();
  for (auto* list : {&text_encoder_loras, &unet_loras}) {
    for (auto& lora : *list) {
      if (named_children().contains(lora->lora_name)) fail(lora->lora_name, "duplicated LoRA name");
      register_module(lora->lora_name, lora);
      lora->apply_to_target();
    }
  }
}

LoRANetworkImpl::~LoRANetworkImpl() { remove(); }

void LoRANetworkImpl::remove() {
  for (auto* list : {&text_encoder_loras, &unet_loras}) {
    for (auto& lora : *list) lora->remove_from_target();
  }
}

void LoRANetworkImpl::set_multiplier(double multiplier) {
  config.multiplier = multiplier;
  for (auto* list : {&text_encoder_loras, &unet_loras}) {
    for (auto& lora : *list) lora->multiplier = multiplier;
  }
}

std::vector<LoraParamGroup> LoRANetworkImpl::prepare_optimizer_params(const std::vector<double>& text_encoder_lrs,
                                                                  std::optional<double> unet_lr, double default_lr) {
  for (auto& p : parameters()) p.requires_grad_(true);
  std::vector<LoraParamGroup> groups;
  auto add = [&](LoraParamGroup group) {
    if (!group.params.empty() && group.lr != 0) groups.push_back(std::move(group));
  };
  // kohya's assemble_params: the modules a reg_lrs pattern matches in a group per pattern (in the order of the
  // patterns' indices as text, as kohya sorts "reg_lr_<i>"), then the rest; each as "lora" then "plus" (lora_up with
  // LoRA+). Empty groups and lr 0 are left out. `name` and `separator` give kohya's descriptions: "unet", "unet plus",
  // "unet reg_lr_0"; lora_flux's text encoders "textencoder 1 " and "textencoder 1  plus".
  auto assemble = [&](const std::vector<LoRAModule>& loras, double lr, std::optional<double> ratio, const std::string& name,
                      const std::string& separator) {
    std::map<std::string, std::pair<double, std::pair<LoraParamGroup, LoraParamGroup>>> reg_groups;  // "reg_lr_<i>"
    LoraParamGroup lora_group{{}, lr, name}, plus_group{{}, lr * ratio.value_or(1.0), name + separator + "plus"};
    for (const auto& lora : loras) {
      const auto reg = std::find_if(config.reg_lrs.begin(), config.reg_lrs.end(),
                                    [&](const auto& r) { return regex_search_python(r.first, lora->lora_name, "network_reg_lrs"); });
      std::pair<LoraParamGroup, LoraParamGroup>* target = nullptr;
      if (reg != config.reg_lrs.end()) {
        const std::string key = fmt::format("reg_lr_{}", reg - config.reg_lrs.begin());
        auto [it, added] = reg_groups.try_emplace(key);
        if (added) {
          const double reg_lr = reg->second;
          it->second = {reg_lr, {LoraParamGroup{{}, reg_lr, name + separator + key},
                                 LoraParamGroup{{}, reg_lr * ratio.value_or(1.0), name + separator + key + " plus"}}};
        }
        target = &it->second.second;
      }
      for (const auto& item : lora->named_parameters()) {
        const bool plus = ratio && item.key().find("lora_up") != std::string::npos;
        LoraParamGroup& group = target ? (plus ? target->second : target->first) : (plus ? plus_group : lora_group);
        group.params.push_back(item.value());
      }
    }
    for (auto& [key, reg] : reg_groups) {
      add(std::move(reg.second.first));
      add(std::move(reg.second.second));
    }
    add(std::move(lora_group));
    add(std::move(plus_group));
  };
  auto ratio_or = [](std::optional<double> specific, std::optional<double> general) {
    // Python's `a or b`: a ratio of 0 falls back too.
    return specific && *specific != 0 ? specific : general;
  };
  const auto te_ratio = ratio_or(config.loraplus_text_encoder_lr_ratio, config.loraplus_lr_ratio);
  if (config.lr_per_text_encoder) {
    // A group set per text encoder (lora_flux: CLIP-L "textencoder 1 ", T5 "textencoder 2 "); --text_encoder_lr gives
    // each its value (one value: all of them; none: the default).
    std::map<int, std::vector<LoRAModule>> encoders;
    for (const auto& lora : text_encoder_loras) encoders[lora->text_encoder].push_back(lora);
    for (const auto& [index, loras] : encoders) {
      const auto i = static_cast<size_t>(index);
      const double lr = text_encoder_lrs.empty() ? default_lr : text_encoder_lrs[std::min(i, text_encoder_lrs.size() - 1)];
      assemble(loras, lr, te_ratio, fmt::format("textencoder {} ", index + 1), " ");
    }
  } else if (!text_encoder_loras.empty()) {
    assemble(text_encoder_loras, text_encoder_lrs.empty() ? default_lr : text_encoder_lrs[0], te_ratio, "textencoder", " ");
  }
  if (!unet_loras.empty()) {
    const double lr = unet_lr.value_or(default_lr);
    const auto ratio = ratio_or(config.loraplus_unet_lr_ratio, config.loraplus_lr_ratio);
    if (config.block_lr_weight) {
      // One group per block, blocks in the order their first module was created.
      std::vector<int> order;
      std::map<int, std::vector<LoRAModule>> by_block;
      for (const auto& lora : unet_loras) {
        const int idx = lora->block;
        if (!by_block.contains(idx)) order.push_back(idx);
        by_block[idx].push_back(lora);
      }
      for (int idx : order) {
        const double weight = (*config.block_lr_weight)[idx < 0 ? config.blocks.total() - 1 : idx];
        assemble(by_block[idx], lr * weight, ratio, fmt::format("unet_block{}", idx), " ");
      }
    } else {
      assemble(unet_loras, lr, ratio, "unet", " ");
    }
  }
  return groups;
}

std::map<std::string, double> LoRANetworkImpl::update_ggpo_norms() {
  std::vector<at::Tensor> key, grad, combined;
  for (auto* list : {&text_encoder_loras, &unet_loras}) {
    for (auto& lora : *list) {
      if (!lora->ggpo) continue;
      lora->update_ggpo_norms();
      key.push_back(lora->ggpo->weight_norms.mean(0));
      if (lora->ggpo->grad_norms.defined()) grad.push_back(lora->ggpo->grad_norms.mean(0));
      combined.push_back(lora->ggpo->combined_weight_norms.mean(0));
    }
  }
  std::map<std::string, double> logs;
  if (!key.empty()) logs["norm/avg_key_norm"] = at::stack(key).mean().item<double>();
  if (!grad.empty()) logs["norm/avg_grad_norm"] = at::stack(grad).mean().item<double>();
  if (!combined.empty()) logs["norm/avg_combined_norm"] = at::stack(combined).mean().item<double>();
  return logs;
}

MaxNormResult LoRANetworkImpl::apply_max_norm_regularization(double max_norm) {
  torch::NoGradGuard no_grad;
  MaxNormResult result;
  std::vector<double> norms;
  for (auto* list : {&text_encoder_loras, &unet_loras}) {
    for (auto& lora : *list) {
      at::Tensor down = lora->lora_down_weight(), up = lora->lora_up_weight();
      at::Tensor scale = lora->alpha / down.size(0);
      at::Tensor updown;
      if (up.dim() == 4 && down.dim() == 4 && up.size(2) == 1 && up.size(3) == 1 && down.size(2) == 1 && down.size(3) == 1) {
        updown = at::matmul(up.flatten(1), down.flatten(1)).unsqueeze(2).unsqueeze(3);
      } else if (down.dim() == 4) {
        updown = at::conv2d(down.permute({1, 0, 2, 3}), up).permute({1, 0, 2, 3});
      } else {
        updown = at::matmul(up, down);
      }
      updown = updown * scale;
      at::Tensor norm = updown.norm().clamp_min(max_norm / 2);
      at::Tensor desired = norm.clamp_max(max_norm);
      at::Tensor ratio = desired / norm;
      if (ratio.item<double>() != 1.0) {
        ++result.keys_scaled;
        at::Tensor sqrt_ratio = ratio.sqrt();
        up.mul_(sqrt_ratio);
        down.mul_(sqrt_ratio);
      }
      norms.push_back((updown.norm() * ratio).item<double>());
    }
  }
  if (!norms.empty()) {
    double sum = 0;
    for (double n : norms) sum += n;
    result.mean_norm = sum / static_cast<double>(norms.size());
    result.max_norm = *std::max_element(norms.begin(), norms.end());
  }
  return result;
}

LoadResult LoRANetworkImpl::load_weights(const std::string& path) {
  safetensors::File file(path);
  torch::NoGradGuard no_grad;
  LoadResult result;
  std::set<std::string> read;
  for (auto* list : {&text_encoder_loras, &unet_loras}) {
    for (auto& lora : *list) {
      // "<lora_name>.<suffix>", or the same under the module's other name.
      std::string stored = lora->lora_name;
      const auto other = other_names_.find(stored);
      if (!file.contains(stored + ".lora_down.weight") && other != other_names_.end()) stored = other->second;
      const std::string down = stored + ".lora_down.weight", up = stored + ".lora_up.weight", alpha = stored + ".alpha";
      if (file.contains(alpha)) {
        lora->alpha.copy_(load_tensor(file, alpha));
        read.insert(alpha);
      } else {
        result.missing.push_back(lora->lora_name + ".alpha");
      }
      if (file.contains(down) && file.contains(up)) {
        lora->set_file_weights(load_tensor(file, down), load_tensor(file, up), path + ": " + stored);
        read.insert(down);
        read.insert(up);
      } else {
        for (const char* suffix : {".lora_down.weight", ".lora_up.weight"}) {
          if (!file.contains(stored + suffix)) result.missing.push_back(lora->lora_name + suffix);
        }
      }
    }
  }
  for (const auto& t : file.tensors()) {
    if (!read.contains(t.name)) result.unexpected.push_back(t.name);
  }
  result.loaded = read.size();
  return result;
}

NamedTensors LoRANetworkImpl::state_dict(std::optional<at::ScalarType> dtype) const {
  NamedTensors tensors;
  for (const auto* list : {&text_encoder_loras, &unet_loras}) {
    for (const auto& lora : *list) {
      const auto [down, up] = lora->file_weights();
      for (auto [suffix, t] : {std::pair{".alpha", lora->alpha.detach()}, std::pair{".lora_down.weight", down.detach()},
                               std::pair{".lora_up.weight", up.detach()}}) {
        tensors.emplace_back(lora->lora_name + suffix, dtype ? t.to(*dtype) : t);
      }
    }
  }
  return tensors;
}

void LoRANetworkImpl::save_weights(const std::string& path, std::optional<at::ScalarType> dtype,
                                   safetensors::Metadata metadata) const {
  NamedTensors tensors = state_dict(dtype);
  SafetensorsHashes hashes = precalculate_safetensors_hashes(tensors, metadata);
  metadata["sshs_model_hash"] = hashes.model_hash;
  metadata["sshs_legacy_hash"] = hashes.legacy_hash;
  save_safetensors(path, tensors, metadata);
}

}  // namespace sdt
