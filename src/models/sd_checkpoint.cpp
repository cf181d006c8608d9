#include "src/models/sd_checkpoint.h"

#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <set>

#include <nlohmann/json.hpp>

#include "src/core/error.h"
#include "src/core/tensor_io.h"
#include "src/core/text.h"
#include "src/models/ldm_layout.h"

namespace sdt {

namespace fs = std::filesystem;
using nlohmann::json;
using ldm::build_in;
using ldm::find_weights;
using ldm::load_parameters;
using ldm::openclip_key;

SdConfig SdConfig::sd1() { return {false, ClipTextConfig::sd1(), VaeConfig::sd(), UNetConfig::sd1()}; }
SdConfig SdConfig::sd2() { return {true, ClipTextConfig::sd2(), VaeConfig::sd(), UNetConfig::sd2()}; }

namespace {

using ldm::Source;
constexpr const char* kLdmUnet = ldm::kUnetPrefix;
constexpr const char* kLdmVae = ldm::kVaePrefix;
constexpr const char* kLdmClip = "cond_stage_model.transformer.";  // SD1
constexpr const char* kLdmOpenClip = "cond_stage_model.model.";     // SD2

bool starts_with(const std::string& s, std::string_view prefix) { return s.rfind(prefix, 0) == 0; }
bool ends_with(const std::string& s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::string join(const std::vector<std::string>& parts, size_t from, size_t to = std::string::npos) {
  std::string out;
  for (size_t i = from; i < std::min(to, parts.size()); ++i) out += (out.empty() ? "" : ".") + parts[i];
  return out;
}

}  // namespace

namespace ldm {

std::string unet_key(const std::string& name, const UNetConfig& c) {
  static const std::map<std::string, std::string> fixed = {
      {"time_embedding.linear_1", "time_embed.0"}, {"time_embedding.linear_2", "time_embed.2"},
      {"add_embedding.linear_1", "label_emb.0.0"}, {"add_embedding.linear_2", "label_emb.0.2"},
      {"conv_in", "input_blocks.0.0"},           {"conv_norm_out", "out.0"},
      {"conv_out", "out.2"}};
  static const std::map<std::string, std::string> resnet_names = {
      {"norm1", "in_layers.0"}, {"conv1", "in_layers.2"},        {"norm2", "out_layers.0"},
      {"conv2", "out_layers.3"}, {"time_emb_proj", "emb_layers.1"}, {"conv_shortcut", "skip_connection"}};
  const std::vector<std::string> p = split(name, '.');
  const std::string head = join(p, 0, p.size() - 1);
  if (auto it = fixed.find(head); it != fixed.end()) return it->second + "." + p.back();

  auto resnet = [&](size_t from) { return resnet_names.at(p[from]) + "." + join(p, from + 1); };
  const int64_t n = c.layers_per_block;
  if (p[0] == "down_blocks") {
    const int64_t i = std::stoll(p[1]);
    if (p[2] == "downsamplers") return fmt::format("input_blocks.{}.0.op.{}", (i + 1) * (n + 1), join(p, 5));
    const int64_t block = 1 + i * (n + 1) + std::stoll(p[3]);
    if (p[2] == "resnets") return fmt::format("input_blocks.{}.0.{}", block, resnet(4));
    return fmt::format("input_blocks.{}.1.{}", block, join(p, 4));
  }
  if (p[0] == "mid_block") {
    if (p[1] == "attentions") return "middle_block.1." + join(p, 3);
    return fmt::format("middle_block.{}.{}", 2 * std::stoll(p[2]), resnet(3));
  }
  if (p[0] == "up_blocks") {
    const int64_t i = std::stoll(p[1]);
    if (p[2] == "upsamplers") {
      return fmt::format("output_blocks.{}.{}.{}", i * (n + 1) + n, c.up_attention[i] ? 2 : 1, join(p, 4));
    }
    const int64_t block = i * (n + 1) + std::stoll(p[3]);
    if (p[2] == "resnets") return fmt::format("output_blocks.{}.0.{}", block, resnet(4));
    return fmt::format("output_blocks.{}.1.{}", block, join(p, 4));
  }
  fail(name, "not a U-Net parameter name");
}

Source vae_key(const std::string& name, const VaeConfig& c) {
  const std::vector<std::string> p = split(name, '.');
  if (p[0] == "quant_conv" || p[0] == "post_quant_conv" || p[1] == "conv_in" || p[1] == "conv_out") return {name};
  const std::string& coder = p[0];
  if (p[1] == "conv_norm_out") return {coder + ".norm_out." + p[2]};
  auto resnet = [&](size_t from) { return (p[from] == "conv_shortcut" ? "nin_shortcut" : p[from]) + "." + join(p, from + 1); };
  if (p[1] == "mid_block") {
    if (p[2] == "attentions") {
      static const std::map<std::string, std::string> names = {
          {"group_norm", "norm"}, {"to_q", "q"}, {"to_k", "k"}, {"to_v", "v"}, {"to_out", "proj_out"}};
      const std::string& part = names.at(p[4]);
      return {coder + ".mid.attn_1." + part + "." + p.back(), -1, part != "norm" && p.back() == "weight"};
    }
    return {fmt::format("{}.mid.block_{}.{}", coder, std::stoll(p[3]) + 1, resnet(4))};
  }
  const bool down = p[1] == "down_blocks";
  const int64_t i = std::stoll(p[2]);
  const int64_t level = down ? i : static_cast<int64_t>(c.block_out_channels.size()) - 1 - i;
  const char* stem = down ? "down" : "up";
  if (p[3] == "downsamplers" || p[3] == "upsamplers") return {fmt::format("{}.{}.{}.{}sample.conv.{}", coder, stem, level, stem, p.back())};
  return {fmt::format("{}.{}.{}.block.{}.{}", coder, stem, level, p[4], resnet(5))};
}

Source openclip_key(const std::string& name) {
  static const std::map<std::string, std::string> layer_names = {
      {"layer_norm1", "ln_1"}, {"layer_norm2", "ln_2"}, {"fc1", "c_fc"}, {"fc2", "c_proj"}};
  // OpenCLIP computes x @ P; a Linear holds P transposed.
  if (name == "text_projection.weight") return {.key = "text_projection", .transposed = true};
  const std::vector<std::string> p = split(name, '.');  // text_model.<...>
  if (p[1] == "embeddings") return {p[2] == "token_embedding" ? "token_embedding.weight" : "positional_embedding"};
  if (p[1] == "final_layer_norm") return {"ln_final." + p.back()};
  // text_model.encoder.layers.L.<module>[.<sub>].<weight|bias>
  const std::string block = "transformer.resblocks." + p[3] + ".";
  if (p[4] == "self_attn") {
    if (p[5] == "out_proj") return {block + "attn.out_proj." + p.back()};
    const int third = p[5] == "q_proj" ? 0 : p[5] == "k_proj" ? 1 : 2;
    return {block + "attn.in_proj_" + p.back(), third};
  }
  if (p[4] == "mlp") return {block + "mlp." + layer_names.at(p[5]) + "." + p.back()};
  return {block + layer_names.at(p[4]) + "." + p.back()};
}

KeyMap unet_map(const UNetConfig& config) {
  return [config](const std::string& name) { return Source{kUnetPrefix + unet_key(name, config)}; };
}

KeyMap vae_map(const VaeConfig& config, const std::string& prefix) {
  return [config, prefix](const std::string& name) {
    Source s = vae_key(name, config);
    s.key = prefix + s.key;
    return s;
  };
}

KeyMap openclip_map(const std::string& prefix, bool projection_as_kohya) {
  return [prefix, projection_as_kohya](const std::string& name) {
    Source s = openclip_key(name);
    s.key = prefix + s.key;
    if (projection_as_kohya) s.transposed = false;
    return s;
  };
}

KeyMap prefixed_map(const std::string& prefix) {
  return [prefix](const std::string& name) { return Source{prefix + name}; };
}

// ---------------------------------------------------------------- saving

void SingleFileWriter::add(const torch::nn::Module& module, const KeyMap& map) {
  for (const auto& item : module.named_parameters()) {
    const Source s = map(item.key());
    at::Tensor t = item.value().detach();
    if (dtype_) t = t.to(*dtype_);
    if (s.conv1x1) t = t.unsqueeze(-1).unsqueeze(-1);  // (O, I) -> (O, I, 1, 1)
    if (s.transposed) t = t.t().contiguous();
    if (s.fused_third >= 0) {
      fused_[s.key][s.fused_third] = t;
    } else {
      tensors_.emplace_back(s.key, t);
    }
  }
}

NamedTensors SingleFileWriter::tensors() const {
  NamedTensors out = tensors_;
  for (const auto& [key, qkv] : fused_) out.emplace_back(key, at::cat({qkv[0], qkv[1], qkv[2]}));
  return out;
}

}  // namespace ldm

namespace {

// ---------------------------------------------------------------- loading

std::string first_few(const std::vector<std::string>& keys) {
  std::string out;
  for (size_t i = 0; i < std::min<size_t>(keys.size(), 5); ++i) out += (i ? ", " : "") + keys[i];
  return keys.size() > 5 ? out + ", ..." : out;
}

bool same_but_trailing_ones(at::IntArrayRef a, at::IntArrayRef b) {
  auto trim = [](at::IntArrayRef s) {
    while (!s.empty() && s.back() == 1) s = s.slice(0, s.size() - 1);
    return s;
  };
  return trim(a).equals(trim(b));
}

}  // namespace

namespace ldm {

void load_parameters(torch::nn::Module& module, const safetensors::File& file, const KeyMap& map,
                     const std::function<bool(const std::string&)>& owned,
                     const std::function<bool(const std::string&)>& ignored, const std::string& what) {
  torch::NoGradGuard no_grad;
  std::set<std::string> used;
  std::vector<std::string> missing;
  for (auto& item : module.named_parameters()) {
    at::Tensor& param = item.value();
    const Source source = map(item.key());
    if (!file.contains(source.key)) {
      missing.push_back(source.key);
      continue;
    }
    // A zero-copy view of the mapped file; copy_ converts to the parameter's dtype element by element.
    at::Tensor stored = load_tensor(file, source.key);
    if (source.fused_third >= 0) stored = stored.chunk(3, 0)[source.fused_third];
    if (source.transposed) stored = stored.t();
    if (!stored.sizes().equals(param.sizes())) {
      if (!same_but_trailing_ones(stored.sizes(), param.sizes())) {
        fail(file.path() + ": " + source.key, "{} parameter {} has shape {}, the file holds {}{}", what, item.key(),
             c10::str(param.sizes()), c10::str(stored.sizes()),
             source.fused_third >= 0 ? " (one third of the fused tensor)" : "");
      }
      stored = stored.reshape(param.sizes());
    }
    param.copy_(stored);
    used.insert(source.key);
  }
  std::vector<std::string> unexpected;
  for (const auto& info : file.tensors()) {
    if (owned(info.name) && !used.count(info.name) && !ignored(info.name)) unexpected.push_back(info.name);
  }
  check_keys_match(file.path(), what, missing, unexpected);
}

void check_keys_match(const std::string& path, const std::string& what, const std::vector<std::string>& missing,
                      const std::vector<std::string>& unexpected) {
  if (missing.empty() && unexpected.empty()) return;
  std::string message = fmt::format("the file does not match the {} architecture:", what);
  if (!missing.empty()) message += fmt::format(" {} missing keys ({})", missing.size(), first_few(missing));
  if (!missing.empty() && !unexpected.empty()) message += ";";
  if (!unexpected.empty()) message += fmt::format(" {} unexpected keys ({})", unexpected.size(), first_few(unexpected));
  fail(path, "{}", message);
}

}  // namespace ldm

namespace {

bool everything(const std::string&) { return true; }
bool nothing(const std::string&) { return false; }

// ---------------------------------------------------------------- config.json

json read_json(const std::string& path) {
  std::ifstream in(path);
  if (!in) fail(path, "cannot open the model config");
  try {
    return json::parse(in);
  } catch (const json::exception& e) {
    fail(path, "not valid JSON: {}", e.what());
  }
}

template <typename T>
T get(const json& j, const std::string& key, const T& fallback, const std::string& path) {
  if (!j.contains(key) || j[key].is_null()) return fallback;
  try {
    return j[key].get<T>();
  } catch (const json::exception&) {
    fail(path + ": " + key, "unexpected value {}", j[key].dump());
  }
}

// Settings SD 1.x / 2.x keep at their defaults; anything else is an architecture we do not build.
void require_default(const json& j, const std::string& key, const json& expected, const std::string& path) {
  if (!j.contains(key) || j[key].is_null() || j[key] == expected) return;
  fail(path + ": " + key, "{} is not supported (SD 1.x / 2.x and SDXL use {})", j[key].dump(), expected.dump());
}

}  // namespace

namespace ldm {

std::string find_weights(const std::string& folder, const std::vector<std::string>& names) {
  for (const auto& name : names) {
    if (fs::exists(fs::path(folder) / name)) return (fs::path(folder) / name).string();
  }
  fail(folder, "no weights file: expected one of {}", first_few(names));
}

}  // namespace ldm

UNetConfig read_unet_config(const std::string& path) {
  const json j = read_json(path);
  for (const auto& [key, value] : std::vector<std::pair<std::string, json>>{
           {"flip_sin_to_cos", true}, {"freq_shift", 0}, {"act_fn", "silu"}, {"center_input_sample", false},
           {"class_embed_type", nullptr}, {"time_embedding_type", "positional"},
           {"mid_block_type", "UNetMidBlock2DCrossAttn"}, {"only_cross_attention", false},
           {"dual_cross_attention", false}, {"resnet_time_scale_shift", "default"},
           {"reverse_transformer_layers_per_block", nullptr}, {"class_embeddings_concat", false},
           {"encoder_hid_dim", nullptr}, {"time_cond_proj_dim", nullptr}, {"mid_block_scale_factor", 1},
           {"num_class_embeds", nullptr}, {"conv_in_kernel", 3}, {"conv_out_kernel", 3}}) {
    require_default(j, key, value, path);
  }
  // upcast_attention (SD 2.1) needs nothing here: scaled_dot_product_attention keeps its softmax in fp32.
  UNetConfig c;
  c.in_channels = get(j, "in_channels", c.in_channels, path);
  c.out_channels = get(j, "out_channels", c.out_channels, path);
  c.block_out_channels = get(j, "block_out_channels", c.block_out_channels, path);
  c.layers_per_block = get(j, "layers_per_block", c.layers_per_block, path);
  c.cross_attention_dim = get(j, "cross_attention_dim", c.cross_attention_dim, path);
  c.use_linear_projection = get(j, "use_linear_projection", c.use_linear_projection, path);
  c.norm_num_groups = get(j, "norm_num_groups", c.norm_num_groups, path);
  c.norm_eps = get(j, "norm_eps", c.norm_eps, path);
  const size_t levels = c.block_out_channels.size();

  // SDXL: the pooled text embedding and the size embeddings through add_embedding.
  const std::string addition = get(j, "addition_embed_type", std::string(), path);
  if (addition == "text_time") {
    c.addition_time_embed_dim = get(j, "addition_time_embed_dim", c.addition_time_embed_dim, path);
    c.vector_conditioning_dim = get(j, "projection_class_embeddings_input_dim", int64_t{0}, path);
    if (c.vector_conditioning_dim <= 0) fail(path, "addition_embed_type text_time needs projection_class_embeddings_input_dim");
  } else if (!addition.empty()) {
    fail(path + ": addition_embed_type", "'{}' is not supported (SDXL uses text_time)", addition);
  }
  if (j.contains("transformer_layers_per_block") && j["transformer_layers_per_block"].is_number_integer()) {
    c.transformer_layers.assign(levels, j["transformer_layers_per_block"].get<int64_t>());
  } else {
    c.transformer_layers = get(j, "transformer_layers_per_block", std::vector<int64_t>(levels, 1), path);
  }

  // num_attention_heads wins when set; otherwise attention_head_dim holds the head counts (diffusers' naming bug).
  const std::string heads_key = j.contains("num_attention_heads") && !j["num_attention_heads"].is_null()
                                    ? "num_attention_heads" : "attention_head_dim";
  if (j.contains(heads_key) && j[heads_key].is_number_integer()) {
    c.num_heads.assign(levels, j[heads_key].get<int64_t>());
  } else {
    c.num_heads = get(j, heads_key, std::vector<int64_t>(levels, 8), path);
  }

  auto block_types = [&](const std::string& key, const std::string& attention, const std::string& plain) {
    std::vector<bool> out;
    for (const auto& type : get(j, key, std::vector<std::string>{}, path)) {
      if (type != attention && type != plain) fail(path + ": " + key, "block type {} is not {} or {}", type, attention, plain);
      out.push_back(type == attention);
    }
    return out;
  };
  c.down_attention = block_types("down_block_types", "CrossAttnDownBlock2D", "DownBlock2D");
  c.up_attention = block_types("up_block_types", "CrossAttnUpBlock2D", "UpBlock2D");
  if (c.down_attention.size() != levels || c.up_attention.size() != levels || c.num_heads.size() != levels ||
      c.transformer_layers.size() != levels) {
    fail(path, "down_block_types, up_block_types, the head counts and transformer_layers_per_block need one entry per "
               "block_out_channels entry ({})", levels);
  }
  return c;
}

VaeConfig read_vae_config(const std::string& path) {
  const json j = read_json(path);
  for (const auto& [key, value] : std::vector<std::pair<std::string, json>>{
           {"act_fn", "silu"}, {"mid_block_add_attention", true}, {"latents_mean", nullptr}, {"latents_std", nullptr}}) {
    require_default(j, key, value, path);
  }
  VaeConfig c;
  c.in_channels = get(j, "in_channels", c.in_channels, path);
  c.out_channels = get(j, "out_channels", c.out_channels, path);
  c.latent_channels = get(j, "latent_channels", c.latent_channels, path);
  c.block_out_channels = get(j, "block_out_channels", c.block_out_channels, path);
  c.layers_per_block = get(j, "layers_per_block", c.layers_per_block, path);
  c.norm_num_groups = get(j, "norm_num_groups", c.norm_num_groups, path);
  c.scaling_factor = get(j, "scaling_factor", c.scaling_factor, path);
  if (j.contains("shift_factor") && !j["shift_factor"].is_null()) c.shift_factor = get(j, "shift_factor", c.shift_factor, path);
  c.use_quant_conv = get(j, "use_quant_conv", c.use_quant_conv, path);
  if (get(j, "use_post_quant_conv", c.use_quant_conv, path) != c.use_quant_conv) {
    fail(path + ": use_post_quant_conv", "differs from use_quant_conv; sdt's VAE has both 1x1 convs or neither");
  }
  for (const auto& key : {"down_block_types", "up_block_types"}) {
    const std::string expected = key == std::string("down_block_types") ? "DownEncoderBlock2D" : "UpDecoderBlock2D";
    const auto types = get(j, key, std::vector<std::string>(c.block_out_channels.size(), expected), path);
    if (types != std::vector<std::string>(c.block_out_channels.size(), expected)) {
      fail(path + ": " + key, "expected {} x {}", c.block_out_channels.size(), expected);
    }
  }
  return c;
}

ClipTextConfig read_clip_text_config(const std::string& path) {
  const json j = read_json(path);
  ClipTextConfig c;
  c.vocab_size = get(j, "vocab_size", c.vocab_size, path);
  c.hidden_size = get(j, "hidden_size", c.hidden_size, path);
  c.intermediate_size = get(j, "intermediate_size", c.intermediate_size, path);
  c.num_layers = get(j, "num_hidden_layers", c.num_layers, path);
  c.num_heads = get(j, "num_attention_heads", c.num_heads, path);
  c.max_positions = get(j, "max_position_embeddings", c.max_positions, path);
  c.act = get(j, "hidden_act", c.act, path);
  c.layer_norm_eps = get(j, "layer_norm_eps", c.layer_norm_eps, path);
  c.eos_token_id = get(j, "eos_token_id", c.eos_token_id, path);
  const auto architectures = get(j, "architectures", std::vector<std::string>{}, path);
  if (std::find(architectures.begin(), architectures.end(), "CLIPTextModelWithProjection") != architectures.end()) {
    c.projection_dim = get(j, "projection_dim", c.hidden_size, path);
  }
  if (c.act != "quick_gelu" && c.act != "gelu") fail(path + ": hidden_act", "'{}' is not quick_gelu or gelu", c.act);
  return c;
}

void load_unet_weights(UNet2DConditionModel& unet, const safetensors::File& file, WeightLayout layout) {
  if (layout == WeightLayout::diffusers) {
    load_parameters(*unet, file, [](const std::string& n) { return Source{n}; }, everything, nothing, "U-Net");
    return;
  }
  load_parameters(*unet, file, ldm::unet_map(unet->config), [](const std::string& k) { return starts_with(k, kLdmUnet); },
                  nothing, "U-Net");
}

void load_vae_weights(AutoencoderKL& vae, const safetensors::File& file, WeightLayout layout) {
  if (layout == WeightLayout::diffusers) {
    // diffusers before 0.17 named the mid-block attention query/key/value/proj_attn; VAEs from then (sd-vae-ft-mse)
    // are still in use.
    const bool old_names = file.contains("encoder.mid_block.attentions.0.query.weight");
    static const std::vector<std::pair<std::string, std::string>> renames = {
        {".to_q.", ".query."}, {".to_k.", ".key."}, {".to_v.", ".value."}, {".to_out.0.", ".proj_attn."}};
    load_parameters(
        *vae, file,
        [&](const std::string& n) {
          std::string key = n;
          for (const auto& [now, before] : renames) {
            if (old_names && key.find(now) != std::string::npos) key.replace(key.find(now), now.size(), before);
          }
          return Source{key};
        },
        everything, nothing, "VAE");
    return;
  }
  // A full checkpoint, or a VAE-only file without the prefix (whose `loss.*` training weights are not the VAE's).
  const std::string prefix = file.contains(std::string(kLdmVae) + "encoder.conv_in.weight") ? kLdmVae : "";
  load_parameters(
      *vae, file, ldm::vae_map(vae->config, prefix),
      [&](const std::string& k) { return prefix.empty() ? !starts_with(k, "loss.") : starts_with(k, prefix); }, nothing,
      "VAE");
}

void load_clip_weights(ClipTextModel& text, const safetensors::File& file, ClipLayout layout, const std::string& prefix,
                       bool projection_as_kohya) {
  auto position_ids = [](const std::string& k) { return ends_with(k, "position_ids"); };  // a buffer, not a weight
  auto owned = [&](const std::string& k) { return starts_with(k, prefix); };
  if (layout == ClipLayout::transformers) {
    // transformers 5 writes CLIPTextModel without the `text_model.` level, as old SD1 files did; most files carry it.
    const bool nested = file.contains(prefix + "text_model.final_layer_norm.weight");
    load_parameters(
        *text, file,
        [&](const std::string& n) {
          const std::string level = "text_model.";
          return Source{prefix + (nested || !starts_with(n, level) ? n : n.substr(level.size()))};
        },
        owned, position_ids, "text encoder");
    return;
  }
  // OpenCLIP ViT-H has one layer more than SD2 uses (it conditions on the penultimate layer); the projection of CLIP's
  // contrastive head is used by SDXL's bigG only, its logit scale by neither.
  const int64_t layers = text->config.num_layers;
  auto unused = [&](const std::string& k) {
    if (position_ids(k) || ends_with(k, "logit_scale")) return true;
    if (ends_with(k, "text_projection")) return !text->text_projection;
    const std::string resblocks = prefix + "transformer.resblocks.";
    if (!starts_with(k, resblocks)) return false;
    return std::stoll(split(k.substr(resblocks.size()), '.')[0]) >= layers;
  };
  load_parameters(*text, file, ldm::openclip_map(prefix, projection_as_kohya), owned, unused, "OpenCLIP text encoder");
}

SdModels load_diffusers_folder(const std::string& folder, at::ScalarType dtype) {
  const fs::path root(folder);
  if (!fs::is_directory(root)) fail(folder, "not a diffusers folder (expected unet/, vae/ and text_encoder/)");
  SdModels m;
  const ClipTextConfig text_config = read_clip_text_config((root / "text_encoder" / "config.json").string());
  m.text_encoder = build_in(dtype, [&] { return ClipTextModel(text_config); });
  load_clip_weights(m.text_encoder,
                    safetensors::File(find_weights((root / "text_encoder").string(), {"model.safetensors", "model.fp16.safetensors"})),
                    ClipLayout::transformers, "");

  m.vae = load_vae((root / "vae").string(), VaeConfig::sd(), dtype);

  const UNetConfig unet_config = read_unet_config((root / "unet" / "config.json").string());
  m.unet = build_in(dtype, [&] { return UNet2DConditionModel(unet_config); });
  load_unet_weights(m.unet,
                    safetensors::File(find_weights((root / "unet").string(),
                                                   {"diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"})),
                    WeightLayout::diffusers);
  return m;
}

SdModels load_ldm_checkpoint(const std::string& path, const SdConfig& config, at::ScalarType dtype) {
  const safetensors::File file(path);
  const bool openclip = file.contains(std::string(kLdmOpenClip) + "token_embedding.weight");
  if (openclip != config.v2) {
    fail(path, "the text encoder is in the {} layout, but the model was configured as {}",
         openclip ? "SD2 (OpenCLIP, cond_stage_model.model.*)" : "SD1 (cond_stage_model.transformer.*)",
         config.v2 ? "SD2 (--v2)" : "SD1 (pass --v2 for SD 2.x checkpoints)");
  }
  SdModels m;
  m.text_encoder = build_in(dtype, [&] { return ClipTextModel(config.text); });
  load_clip_weights(m.text_encoder, file, config.v2 ? ClipLayout::openclip : ClipLayout::transformers,
                    config.v2 ? kLdmOpenClip : kLdmClip);
  m.vae = build_in(dtype, [&] { return AutoencoderKL(config.vae); });
  load_vae_weights(m.vae, file, WeightLayout::ldm);
  m.unet = build_in(dtype, [&] { return UNet2DConditionModel(config.unet); });
  load_unet_weights(m.unet, file, WeightLayout::ldm);
  return m;
}

AutoencoderKL load_vae(const std::string& path, const VaeConfig& config, at::ScalarType dtype) {
  if (fs::is_directory(path)) {
    // A diffusers VAE folder, or a pipeline folder holding one in vae/.
    const fs::path folder = fs::exists(fs::path(path) / "config.json") ? fs::path(path) : fs::path(path) / "vae";
    const VaeConfig folder_config = read_vae_config((folder / "config.json").string());
    AutoencoderKL vae = build_in(dtype, [&] { return AutoencoderKL(folder_config); });
    load_vae_weights(vae,
                     safetensors::File(find_weights(folder.string(),
                                                    {"diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"})),
                     WeightLayout::diffusers);
    return vae;
  }
  const safetensors::File file(path);
  AutoencoderKL vae = build_in(dtype, [&] { return AutoencoderKL(config); });
  const bool diffusers = file.contains("encoder.conv_norm_out.weight");
  load_vae_weights(vae, file, diffusers ? WeightLayout::diffusers : WeightLayout::ldm);
  return vae;
}

void save_ldm_checkpoint(const std::string& path, const SdModels& m, const SdConfig& config,
                         std::optional<at::ScalarType> dtype, const safetensors::Metadata& metadata) {
  ldm::SingleFileWriter writer(dtype);
  writer.add(*m.unet, ldm::unet_map(m.unet->config));
  writer.add(*m.vae, ldm::vae_map(m.vae->config, kLdmVae));
  writer.add(*m.text_encoder, config.v2 ? ldm::openclip_map(kLdmOpenClip) : ldm::prefixed_map(kLdmClip));
  NamedTensors out = writer.tensors();

  if (config.v2) {
    // What OpenCLIP loaders expect besides SD2's 23 layers, made up as kohya does when no source checkpoint is at
    // hand: the 24th layer as a copy of the 23rd, an identity-like projection, a unit logit scale.
    const int64_t last = m.text_encoder->config.num_layers - 1;
    const std::string from = fmt::format("{}transformer.resblocks.{}.", kLdmOpenClip, last);
    const std::string to = fmt::format("{}transformer.resblocks.{}.", kLdmOpenClip, last + 1);
    const size_t count = out.size();
    for (size_t i = 0; i < count; ++i) {
      if (starts_with(out[i].first, from)) out.emplace_back(to + out[i].first.substr(from.size()), out[i].second);
    }
    const int64_t hidden = m.text_encoder->config.hidden_size;
    const auto options = out.front().second.options();
    out.emplace_back(std::string(kLdmOpenClip) + "text_projection", at::ones({hidden, hidden}, options));
    out.emplace_back(std::string(kLdmOpenClip) + "logit_scale", at::ones(std::vector<int64_t>{}, options));
  }
  save_safetensors(path, out, metadata);
}

}  // namespace sdt
