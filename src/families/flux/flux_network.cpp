// kohya's networks/lora_flux.py: its targets on FLUX.1 / Chroma and its create_network arguments.
#include "src/families/flux/flux_network.h"

#include <array>

#include <spdlog/spdlog.h>

#include "src/core/error.h"
#include "src/core/text.h"
#include "src/families/sd/sd_family.h"

namespace sdt {

namespace {

// lora_flux's in_dims order and the name parts that pick each input layer (its create_modules `filter`).
constexpr std::array<const char*, 5> kInputLayers{"_img_in", "_time_in", "_vector_in", "_guidance_in", "_txt_in"};

bool contains(const std::string& s, const char* part) { return s.find(part) != std::string::npos; }

// kohya's type_dims identifiers, in its order: the first whose parts all appear in a module's name sets its dim.
struct TypeDim {
  const char* key;
  std::vector<const char*> parts;
};
const std::vector<TypeDim> kTypeDims{{"img_attn_dim", {"img_attn"}}, {"txt_attn_dim", {"txt_attn"}},
                                     {"img_mlp_dim", {"img_mlp"}},   {"txt_mlp_dim", {"txt_mlp"}},
                                     {"img_mod_dim", {"img_mod"}},   {"txt_mod_dim", {"txt_mod"}},
                                     {"single_dim", {"single_blocks", "linear"}}, {"single_mod_dim", {"modulation"}}};

int64_t whole_number(const std::string& key, const std::string& text) {
  const double v = network_arg_number(key, text);
  if (v != std::floor(v)) fail("network_args " + key, "{} is not a whole number", v);
  return static_cast<int64_t>(v);
}

// kohya's "True" / "False" (its check is `value == "True"`).
bool python_bool(const std::string& key, const std::string& text) {
  if (text == "True") return true;
  if (text == "False") return false;
  fail("network_args " + key, "'{}' is not True or False (kohya reads only the exact word True as true)", text);
}

// kohya's parse_block_selection: all, none (or empty), or comma-separated indices and inclusive ranges "a-b".
std::vector<bool> block_selection(const std::string& key, const std::string& text, int64_t blocks) {
  if (text == "all") return std::vector<bool>(static_cast<size_t>(blocks), true);
  std::vector<bool> selected(static_cast<size_t>(blocks), false);
  if (text == "none" || text.empty()) return selected;
  auto index = [&](const std::string& s) {
    const int64_t i = whole_number(key, trim(s));
    if (i < 0 || i >= blocks) fail("network_args " + key, "block {} is not one of this model's {} (0 to {})", i, blocks, blocks - 1);
    return i;
  };
  for (const std::string& range : split(text, ',')) {
    const auto dash = range.find('-');
    const int64_t first = index(range.substr(0, dash)), last = dash == std::string::npos ? first : index(range.substr(dash + 1));
    if (first > last) fail("network_args " + key, "range {} runs backwards", trim(range));
    for (int64_t i = first; i <= last; ++i) selected[static_cast<size_t>(i)] = true;
  }
  return selected;
}

// kohya's parse_kv_pairs: "pattern=value,pattern=value" (a pair without "=" or a bad value is an error here, where
// kohya warns and drops it).
template <typename T>
std::vector<std::pair<std::string, T>> pattern_values(const std::string& key, const std::string& text, T (*parse)(const std::string&, const std::string&)) {
  std::vector<std::pair<std::string, T>> pairs;
  for (const std::string& item : split(text, ',')) {
    const std::string pair = trim(item);
    if (pair.empty()) continue;
    const auto eq = pair.find('=');
    if (eq == std::string::npos) fail("network_args " + key, "'{}' is not pattern=value", pair);
    pairs.emplace_back(trim(pair.substr(0, eq)), parse(key, trim(pair.substr(eq + 1))));
  }
  return pairs;
}

}  // namespace

std::vector<NetworkTarget> flux_network_targets(ClipTextModel clip_l, T5EncoderModel t5, FluxTransformer transformer) {
  std::vector<NetworkTarget> targets;
  if (clip_l) targets = lora_targets(clip_l.ptr(), "lora_te1", {&is_a<ClipAttentionImpl>, &is_a<ClipMlpImpl>}, false);
  if (t5) {
    for (NetworkTarget& t : lora_targets(t5.ptr(), "lora_te3", {&is_a<T5AttentionImpl>, &is_a<T5DenseGatedActDenseImpl>}, false)) {
      t.text_encoder = 1;
      targets.push_back(std::move(t));
    }
  }
  if (!transformer) return targets;
  const FluxConfig& c = transformer->config;
  for (NetworkTarget& t : lora_targets(transformer.ptr(), "lora_unet", {&is_a<DoubleStreamBlockImpl>, &is_a<SingleStreamBlockImpl>}, true)) {
    // kohya's get_qkv_mlp_split_dims, at this model's widths (kohya writes FLUX's 3072 and 12288).
    if (contains(t.lora_name, "double") && contains(t.lora_name, "qkv")) t.split_dims = {c.hidden_size, c.hidden_size, c.hidden_size};
    if (contains(t.lora_name, "single") && contains(t.lora_name, "linear1")) {
      t.split_dims = {c.hidden_size, c.hidden_size, c.hidden_size, c.mlp_hidden()};
    }
    targets.push_back(std::move(t));
  }
  std::vector<std::pair<std::string, std::shared_ptr<torch::nn::Module>>> inputs{{"img_in", transformer->img_in.ptr()}};
  for (auto [name, embedder] : {std::pair{"time_in", transformer->time_in}, std::pair{"vector_in", transformer->vector_in},
                                std::pair{"guidance_in", transformer->guidance_in}}) {
    if (!embedder) continue;
    inputs.emplace_back(std::string(name) + "_in_layer", embedder->in_layer.ptr());
    inputs.emplace_back(std::string(name) + "_out_layer", embedder->out_layer.ptr());
  }
  inputs.emplace_back("txt_in", transformer->txt_in.ptr());
  for (const char* filter : kInputLayers) {
    for (const auto& [name, layer] : inputs) {
      const std::string lora_name = "lora_unet_" + name;
      if (contains(lora_name, filter)) targets.push_back({.lora_name = lora_name, .module = layer, .in_denoiser = true});
    }
  }
  return targets;
}

LoRANetworkConfig flux_network_config(const TrainArgs& args, const FluxConfig& transformer) {
  static const std::vector<std::string> shared{"conv_dim", "conv_alpha", "rank_dropout", "module_dropout", "loraplus_lr_ratio",
                                               "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"};
  std::vector<std::string> known{"train_blocks", "train_t5xxl", "split_qkv", "in_dims", "train_double_block_indices",
                                 "train_single_block_indices", "network_reg_dims", "network_reg_lrs", "verbose",
                                 "ggpo_beta", "ggpo_sigma"};
  for (const TypeDim& t : kTypeDims) known.push_back(t.key);
  known.insert(known.end(), shared.begin(), shared.end());
  const std::map<std::string, std::string> kwargs = read_network_args(args.network_args, known, "networks.lora_flux");
  auto get = [&](const std::string& key) -> std::optional<std::string> {
    auto it = kwargs.find(key);
    return it == kwargs.end() ? std::nullopt : std::optional<std::string>(it->second);
  };

  std::vector<std::string> shared_args;
  for (const std::string& key : shared) {
    if (auto v = get(key)) shared_args.push_back(key + "=" + *v);
  }
  LoRANetworkConfig c = parse_lora_network_args(args.network_dim, args.network_alpha, args.network_dropout, shared_args);
  c.network_module = "networks.lora_flux";
  c.lr_per_text_encoder = true;
  c.split_qkv = get("split_qkv") && python_bool("split_qkv", *get("split_qkv"));
  c.verbose = get("verbose") && python_bool("verbose", *get("verbose"));
  if (auto v = get("network_reg_dims")) c.reg_dims = pattern_values<int64_t>("network_reg_dims", *v, &whole_number);
  if (auto v = get("network_reg_lrs")) c.reg_lrs = pattern_values<double>("network_reg_lrs", *v, &network_arg_number);
  const auto sigma = get("ggpo_sigma"), beta = get("ggpo_beta");
  if (sigma && beta) {
    c.ggpo_sigma_beta = {network_arg_number("ggpo_sigma", *sigma), network_arg_number("ggpo_beta", *beta)};
    // kohya's update_norms reads a split module's lora_up.weight, which it does not have, and fails.
    if (c.split_qkv) fail("network_args ggpo_sigma", "LoRA-GGPO does not work with split_qkv in kohya's lora_flux (it fails "
                          "on the split modules' weights); drop one of them");
    spdlog::info("LoRA-GGPO training sigma: {} beta: {}", c.ggpo_sigma_beta->first, c.ggpo_sigma_beta->second);
  } else if (sigma || beta) {
    spdlog::warn("network_args {} without {}: LoRA-GGPO needs both and stays off, as in kohya's lora_flux",
                 sigma ? "ggpo_sigma" : "ggpo_beta", sigma ? "ggpo_beta" : "ggpo_sigma");
  }

  const bool train_t5xxl = get("train_t5xxl") && python_bool("train_t5xxl", *get("train_t5xxl"));
  const std::string train_blocks = get("train_blocks").value_or("all");
  if (train_blocks != "all" && train_blocks != "single" && train_blocks != "double") {
    fail("network_args train_blocks", "'{}' is not all, single or double", train_blocks);
  }
  std::vector<std::optional<int64_t>> type_dims;
  for (const TypeDim& t : kTypeDims) {
    auto v = get(t.key);
    type_dims.push_back(v ? std::optional<int64_t>(whole_number(t.key, *v)) : std::nullopt);
  }
  std::optional<std::vector<int64_t>> in_dims;
  if (auto v = get("in_dims")) {
    std::string list = trim(*v);
    if (list.size() >= 2 && list.front() == '[' && list.back() == ']') list = list.substr(1, list.size() - 2);
    in_dims.emplace();
    for (const std::string& d : split(list, ',')) in_dims->push_back(whole_number("in_dims", d));
    if (in_dims->size() != kInputLayers.size()) {
      fail("network_args in_dims", "{} dims given, expected 5 (img, time, vector, guidance, txt)", in_dims->size());
    }
  }
  std::optional<std::vector<bool>> doubles, singles;
  if (auto v = get("train_double_block_indices")) doubles = block_selection("train_double_block_indices", *v, transformer.depth);
  if (auto v = get("train_single_block_indices")) singles = block_selection("train_single_block_indices", *v, transformer.depth_single_blocks);

  // lora_flux's create_modules, as a choice per target.
  c.target_dim = [train_t5xxl, train_blocks, type_dims, in_dims, doubles, singles, dim = c.dim](const NetworkTarget& t) -> std::optional<int64_t> {
    const std::string& name = t.lora_name;
    if (!t.in_denoiser) return t.text_encoder == 0 || train_t5xxl ? std::optional<int64_t>(dim) : std::nullopt;
    for (size_t i = 0; i < kInputLayers.size(); ++i) {
      if (contains(name, kInputLayers[i])) return in_dims ? std::optional<int64_t>((*in_dims)[i]) : std::nullopt;
    }
    const bool is_double = contains(name, "double"), is_single = contains(name, "single");
    if ((is_double && train_blocks == "single") || (is_single && train_blocks == "double")) return std::nullopt;
    int64_t d = dim;
    for (size_t i = 0; i < kTypeDims.size(); ++i) {
      const auto& parts = kTypeDims[i].parts;
      if (type_dims[i] && std::all_of(parts.begin(), parts.end(), [&](const char* p) { return contains(name, p); })) {
        d = *type_dims[i];
        break;
      }
    }
    if (d != 0 && (doubles || singles) && (is_double || is_single)) {
      const auto block = static_cast<size_t>(std::stoll(split(name, '_').at(4)));  // lora_unet_double_blocks_<i>_...
      if ((is_double && doubles && !(*doubles)[block]) || (is_single && singles && !(*singles)[block])) d = 0;
    }
    return d;
  };
  return c;
}

}  // namespace sdt
