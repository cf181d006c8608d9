#include "src/models/flux_checkpoint.h"

#include <filesystem>
#include <fstream>
#include <map>
#include <set>

#include <nlohmann/json.hpp>

#include "src/core/error.h"
#include "src/core/tensor_io.h"
#include "src/models/ldm_layout.h"
#include "src/models/sd_checkpoint.h"

namespace sdt {
namespace fs = std::filesystem;

namespace {

const std::string kBflPrefix = "model.diffusion_model.";

std::string prefix_of(const safetensors::File& file) {
  return file.contains(kBflPrefix + "img_in.weight") ? kBflPrefix : "";
}

// One more than the largest index n of "<list>.<n>.<rest>" among the keys.
int64_t count_of(const safetensors::File& file, const std::string& prefix, const std::string& list) {
  int64_t count = 0;
  for (const auto& info : file.tensors()) {
    if (!info.name.starts_with(prefix + list + ".")) continue;
    const std::string rest = info.name.substr(prefix.size() + list.size() + 1);
    count = std::max<int64_t>(count, std::stoll(rest.substr(0, rest.find('.'))) + 1);
  }
  return count;
}

std::vector<int64_t> shape_of(const safetensors::File& file, const std::string& key) {
  const auto& shape = file.info(key).shape;
  return {shape.begin(), shape.end()};
}

// A model's weights file in a folder, or the file itself.
std::string weights_in(const std::string& path) {
  if (!fs::is_directory(path)) return path;
  return ldm::find_weights(path, {"model.safetensors", "diffusion_pytorch_model.safetensors", "model.fp16.safetensors"});
}

// The FluxTransformer2DModel folder `path` names: itself, or a pipeline's transformer/; empty when neither.
std::string diffusers_transformer_folder(const std::string& path) {
  for (const fs::path folder : {fs::path(path), fs::path(path) / "transformer"}) {
    const fs::path config = folder / "config.json";
    if (!fs::is_regular_file(config)) continue;
    std::ifstream in(config);
    const nlohmann::json j = nlohmann::json::parse(in, nullptr, false);
    if (!j.is_discarded() && j.value("_class_name", std::string()) == "FluxTransformer2DModel") return folder.string();
  }
  return "";
}

// diffusers' tensors for each of BFL's, the inverse of diffusers' convert_flux_transformer_checkpoint_to_diffusers: one
// renamed, several concatenated along dim 0 (q, k, v; the single blocks' MLP input fused with them), or the final
// modulation's halves swapped (diffusers' AdaLayerNormContinuous holds (scale, shift), BFL's (shift, scale)).
struct DiffusersSource {
  std::vector<std::string> keys;
  bool swap_halves = false;
};

std::map<std::string, DiffusersSource> diffusers_sources(const FluxConfig& c) {
  std::map<std::string, DiffusersSource> out;
  const auto linear = [&](const std::string& from, const std::string& to) {
    for (const char* part : {".weight", ".bias"}) out[to + part] = {{from + part}};
  };
  const auto fused = [&](const std::vector<std::string>& from, const std::string& to) {
    for (const char* part : {".weight", ".bias"}) {
      DiffusersSource& source = out[to + part];
      for (const std::string& f : from) source.keys.push_back(f + part);
    }
  };
  linear("x_embedder", "img_in");
  linear("context_embedder", "txt_in");
  linear("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer");
  linear("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer");
  linear("time_text_embed.text_embedder.linear_1", "vector_in.in_layer");
  linear("time_text_embed.text_embedder.linear_2", "vector_in.out_layer");
  if (c.guidance_embed) {
    linear("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer");
    linear("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer");
  }
  for (int64_t i = 0; i < c.depth; ++i) {
    const std::string a = fmt::format("transformer_blocks.{}.", i), b = fmt::format("double_blocks.{}.", i);
    linear(a + "norm1.linear", b + "img_mod.lin");
    linear(a + "norm1_context.linear", b + "txt_mod.lin");
    fused({a + "attn.to_q", a + "attn.to_k", a + "attn.to_v"}, b + "img_attn.qkv");
    fused({a + "attn.add_q_proj", a + "attn.add_k_proj", a + "attn.add_v_proj"}, b + "txt_attn.qkv");
    out[b + "img_attn.norm.query_norm.scale"] = {{a + "attn.norm_q.weight"}};
    out[b + "img_attn.norm.key_norm.scale"] = {{a + "attn.norm_k.weight"}};
    out[b + "txt_attn.norm.query_norm.scale"] = {{a + "attn.norm_added_q.weight"}};
    out[b + "txt_attn.norm.key_norm.scale"] = {{a + "attn.norm_added_k.weight"}};
    linear(a + "attn.to_out.0", b + "img_attn.proj");
    linear(a + "attn.to_add_out", b + "txt_attn.proj");
    linear(a + "ff.net.0.proj", b + "img_mlp.0");
    linear(a + "ff.net.2", b + "img_mlp.2");
    linear(a + "ff_context.net.0.proj", b + "txt_mlp.0");
    linear(a + "ff_context.net.2", b + "txt_mlp.2");
  }
  for (int64_t i = 0; i < c.depth_single_blocks; ++i) {
    const std::string a = fmt::format("single_transformer_blocks.{}.", i), b = fmt::format("single_blocks.{}.", i);
    linear(a + "norm.linear", b + "modulation.lin");
    fused({a + "attn.to_q", a + "attn.to_k", a + "attn.to_v", a + "proj_mlp"}, b + "linear1");
    linear(a + "proj_out", b + "linear2");
    out[b + "norm.query_norm.scale"] = {{a + "attn.norm_q.weight"}};
    out[b + "norm.key_norm.scale"] = {{a + "attn.norm_k.weight"}};
  }
  for (const char* part : {".weight", ".bias"}) {
    out[std::string("final_layer.adaLN_modulation.1") + part] = {{std::string("norm_out.linear") + part}, true};
  }
  linear("proj_out", "final_layer.linear");
  return out;
}

FluxConfig flux_config_from_diffusers(const std::string& folder) {
  std::ifstream in(fs::path(folder) / "config.json");
  const nlohmann::json j = nlohmann::json::parse(in);
  FluxConfig c;
  c.in_channels = j.value("in_channels", c.in_channels);
  c.depth = j.value("num_layers", c.depth);
  c.depth_single_blocks = j.value("num_single_layers", c.depth_single_blocks);
  c.num_heads = j.value("num_attention_heads", c.num_heads);
  c.hidden_size = c.num_heads * j.value("attention_head_dim", int64_t{128});
  c.context_in_dim = j.value("joint_attention_dim", c.context_in_dim);
  c.vec_in_dim = j.value("pooled_projection_dim", c.vec_in_dim);
  c.guidance_embed = j.value("guidance_embeds", false);
  c.axes_dim = j.value("axes_dims_rope", c.axes_dim);
  if (j.value("patch_size", 1) != 1) fail(folder + "/config.json", "patch_size {}: FLUX's transformer takes 1", j.value("patch_size", 1));
  return c;
}

}  // namespace

FluxConfig flux_config_from_file(const safetensors::File& file, const std::string& prefix) {
  FluxConfig c;
  const auto img_in = shape_of(file, prefix + "img_in.weight");  // (hidden, in_channels)
  c.hidden_size = img_in[0];
  c.in_channels = img_in[1];
  c.context_in_dim = shape_of(file, prefix + "txt_in.weight")[1];
  c.chroma = file.contains(prefix + "distilled_guidance_layer.in_proj.weight");
  if (c.chroma) {
    const auto in_proj = shape_of(file, prefix + "distilled_guidance_layer.in_proj.weight");
    c.approximator_hidden_size = in_proj[0];
    c.approximator_in_dim = in_proj[1];
    c.approximator_depth = count_of(file, prefix, "distilled_guidance_layer.layers");
  } else {
    c.vec_in_dim = shape_of(file, prefix + "vector_in.in_layer.weight")[1];
    c.guidance_embed = file.contains(prefix + "guidance_in.in_layer.weight");
  }
  c.depth = count_of(file, prefix, "double_blocks");
  c.depth_single_blocks = count_of(file, prefix, "single_blocks");
  const int64_t head_dim = shape_of(file, prefix + "double_blocks.0.img_attn.norm.query_norm.scale")[0];
  c.num_heads = c.hidden_size / head_dim;
  c.mlp_ratio = static_cast<double>(shape_of(file, prefix + "double_blocks.0.img_mlp.0.weight")[0]) / static_cast<double>(c.hidden_size);
  c.qkv_bias = file.contains(prefix + "double_blocks.0.img_attn.qkv.bias");
  const auto axes = file.metadata().find("flux_axes_dim");
  if (axes != file.metadata().end()) {
    c.axes_dim = nlohmann::json::parse(axes->second).get<std::vector<int64_t>>();
  } else if (head_dim != 128) {
    fail(file.path(), "the heads are {} wide, not FLUX's 128, and the file does not name its RoPE axes (metadata "
         "\"flux_axes_dim\")", head_dim);
  }
  return c;
}

bool is_flux_checkpoint(const std::string& path) {
  if (fs::is_directory(path)) return !diffusers_transformer_folder(path).empty();
  if (!path.ends_with(".safetensors")) return false;
  const safetensors::File file(path);
  const std::string prefix = prefix_of(file);
  return file.contains(prefix + "double_blocks.0.img_attn.qkv.weight") && file.contains(prefix + "img_in.weight");
}

FluxTransformerFile::FluxTransformerFile(const std::string& path) : path_(path) {
  if (!fs::is_directory(path)) {
    open_bfl_file();
    return;
  }
  path_ = diffusers_transformer_folder(path);
  if (path_.empty()) fail(path, "neither a FLUX transformer file nor a diffusers FluxTransformer2DModel folder");
  open_diffusers_folder();
}

void FluxTransformerFile::open_bfl_file() {
  files_.emplace_back(path_);
  const safetensors::File& file = files_.front();
  const std::string prefix = prefix_of(file);
  if (!file.contains(prefix + "double_blocks.0.img_attn.qkv.weight")) {
    fail(path_, "not a FLUX transformer in Black Forest Labs' layout (no double_blocks.0.img_attn.qkv.weight){}",
         file.contains("transformer_blocks.0.attn.add_k_proj.bias") ? ": diffusers' names; give its folder, with config.json" : "");
  }
  config_ = flux_config_from_file(file, prefix);
  for (const auto& info : file.tensors()) {
    if (info.name.starts_with(prefix)) sources_[info.name.substr(prefix.size())] = {{{0, info.name}}, false, info.shape};
  }
}

void FluxTransformerFile::open_diffusers_folder() {
  config_ = flux_config_from_diffusers(path_);
  // Its weights: one file, or shards (with their index, which is not needed: every shard's keys are in its header).
  std::map<std::string, size_t> file_of;
  for (const auto& entry : fs::directory_iterator(path_)) {
    const std::string name = entry.path().filename().string();
    if (!name.starts_with("diffusion_pytorch_model") || !name.ends_with(".safetensors")) continue;
    files_.emplace_back(entry.path().string());
    for (const auto& info : files_.back().tensors()) file_of[info.name] = files_.size() - 1;
  }
  if (files_.empty()) fail(path_, "no diffusion_pytorch_model*.safetensors weights");
  for (const auto& [name, from] : diffusers_sources(config_)) {
    Source& source = sources_[name];
    source.swap_halves = from.swap_halves;
    for (const std::string& key : from.keys) {
      const auto it = file_of.find(key);
      if (it == file_of.end()) fail(path_, "no tensor '{}': not the FLUX transformer its config describes", key);
      const auto& shape = files_[it->second].info(key).shape;
      if (source.shape.empty()) {
        source.shape.assign(shape.begin(), shape.end());
      } else {
        source.shape[0] += shape.at(0);  // concatenated along dim 0
      }
      source.parts.push_back({it->second, key});
      file_of.erase(it);
    }
  }
  if (!file_of.empty()) fail(path_, "{} tensors of no FLUX transformer layer, first '{}'", file_of.size(), file_of.begin()->first);
}

at::Tensor FluxTransformerFile::read(const std::string& name, std::optional<at::ScalarType> dtype) const {
  const auto it = sources_.find(name);
  if (it == sources_.end()) fail(path_, "no tensor '{}' in this FLUX transformer", name);
  std::vector<at::Tensor> parts;
  for (const Part& part : it->second.parts) parts.push_back(load_tensor(files_[part.file], part.key));
  at::Tensor t = parts.size() == 1 ? parts.front() : at::cat(parts, 0);
  if (it->second.swap_halves) {
    const std::vector<at::Tensor> halves = t.chunk(2, 0);
    t = at::cat({halves[1], halves[0]}, 0);
  }
  return dtype ? t.to(*dtype) : t;
}

void FluxTransformerFile::check_names_and_shapes(const torch::nn::Module& transformer) const {
  std::vector<std::string> missing, unexpected;
  std::set<std::string> parameters;
  for (const auto& item : transformer.named_parameters()) {
    parameters.insert(item.key());
    const auto it = sources_.find(item.key());
    if (it == sources_.end()) {
      missing.push_back(item.key());
    } else if (!item.value().sizes().equals(it->second.shape)) {
      fail(path_, "FLUX transformer parameter {} has shape {}, the checkpoint holds {}", item.key(), c10::str(item.value().sizes()),
           c10::str(at::IntArrayRef(it->second.shape)));
    }
  }
  for (const auto& [name, source] : sources_) {
    if (!parameters.contains(name)) unexpected.push_back(name);
  }
  ldm::check_keys_match(path_, "FLUX transformer", missing, unexpected);
}

FluxTransformer load_flux_transformer(const FluxTransformerFile& file, at::ScalarType dtype, BlockWeights blocks) {
  FluxTransformer transformer = ldm::build_in(dtype, [&] { return FluxTransformer(file.config(), blocks); });
  file.check_names_and_shapes(*transformer);
  torch::NoGradGuard no_grad;
  for (auto& item : transformer->named_parameters()) {
    if (!item.value().is_meta()) item.value().copy_(file.read(item.key()));  // copy_ converts element by element
  }
  return transformer;
}

FluxTransformer load_flux_transformer(const std::string& path, at::ScalarType dtype) {
  return load_flux_transformer(FluxTransformerFile(path), dtype);
}

ClipTextModel load_flux_clip_l(const std::string& path, at::ScalarType dtype) {
  const ClipTextConfig config = fs::is_directory(path) ? read_clip_text_config((fs::path(path) / "config.json").string())
                                                       : ClipTextConfig::sd1();
  const safetensors::File file(weights_in(path));
  ClipTextModel clip = ldm::build_in(dtype, [&] { return ClipTextModel(config); });
  load_clip_weights(clip, file, ClipLayout::transformers, "", false);
  return clip;
}

T5EncoderModel load_t5_encoder(const std::string& path, at::ScalarType dtype) {
  const safetensors::File file(weights_in(path));
  T5Config config;
  if (fs::is_directory(path)) {
    config = read_t5_config((fs::path(path) / "config.json").string());
  } else {
    // Everything but the epsilon and the buckets' reach is in the shapes (kohya's t5xxl files are google/t5-v1_1-xxl).
    const auto bias = shape_of(file, "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight");  // (buckets, heads)
    const auto q = shape_of(file, "encoder.block.0.layer.0.SelfAttention.q.weight");                            // (heads * d_kv, d_model)
    const auto wi = shape_of(file, "encoder.block.0.layer.1.DenseReluDense.wi_0.weight");                       // (d_ff, d_model)
    config.relative_attention_num_buckets = bias[0];
    config.num_heads = bias[1];
    config.d_model = q[1];
    config.d_kv = q[0] / bias[1];
    config.d_ff = wi[0];
    config.num_layers = count_of(file, "", "encoder.block");
    config.vocab_size = shape_of(file, file.contains("shared.weight") ? "shared.weight" : "encoder.embed_tokens.weight")[0];
  }
  T5EncoderModel t5 = ldm::build_in(dtype, [&] { return T5EncoderModel(config); });
  // The embedding is stored as shared.weight, as encoder.embed_tokens.weight, or as both (the same values).
  const std::string embedding = file.contains("shared.weight") ? "shared.weight" : "encoder.embed_tokens.weight";
  ldm::load_parameters(*t5, file, [&](const std::string& name) { return ldm::Source{name == "shared.weight" ? embedding : name}; },
                       [](const std::string&) { return true; },
                       [](const std::string& key) { return key == "encoder.embed_tokens.weight" || key == "shared.weight"; }, "T5 encoder");
  return t5;
}

AutoencoderKL load_flux_autoencoder(const std::string& path, at::ScalarType dtype) { return load_vae(path, VaeConfig::flux(), dtype); }

namespace {

// A model's parameters under their own names (sdt's names are the reference's), in `dtype` or each weight's own.
NamedTensors parameters_of(const torch::nn::Module& model, std::optional<at::ScalarType> dtype) {
  NamedTensors tensors;
  for (const auto& item : model.named_parameters()) {
    const at::Tensor value = item.value().detach();
    tensors.emplace_back(item.key(), dtype ? value.to(*dtype) : value);
  }
  return tensors;
}

}  // namespace

void save_flux_transformer(const std::string& path, const FluxTransformer& transformer, std::optional<at::ScalarType> dtype,
                           const safetensors::Metadata& metadata) {
  safetensors::Metadata m = metadata;
  if (transformer->config.head_dim() != 128) m["flux_axes_dim"] = nlohmann::json(transformer->config.axes_dim).dump();
  save_safetensors(path, parameters_of(*transformer, dtype), m);
}

void save_flux_clip_l(const std::string& path, const ClipTextModel& clip, std::optional<at::ScalarType> dtype) {
  save_safetensors(path, parameters_of(*clip, dtype), {});
}

void save_t5_encoder(const std::string& path, const T5EncoderModel& t5, std::optional<at::ScalarType> dtype) {
  save_safetensors(path, parameters_of(*t5, dtype), {});
}

}  // namespace sdt
