#include "src/models/flux_checkpoint.h"

#include <filesystem>
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
  if (fs::is_directory(path) || !path.ends_with(".safetensors")) return false;
  const safetensors::File file(path);
  const std::string prefix = prefix_of(file);
  return file.contains(prefix + "double_blocks.0.img_attn.qkv.weight") && file.contains(prefix + "img_in.weight");
}

FluxTransformer load_flux_transformer(const std::string& path, at::ScalarType dtype) {
  const safetensors::File file(path);
  const std::string prefix = prefix_of(file);
  if (!file.contains(prefix + "double_blocks.0.img_attn.qkv.weight")) {
    fail(path, "not a FLUX transformer in Black Forest Labs' layout (no double_blocks.0.img_attn.qkv.weight){}",
         file.contains("transformer_blocks.0.attn.add_k_proj.bias") ? ": a diffusers transformer, which sdt does not read yet" : "");
  }
  FluxTransformer transformer = ldm::build_in(dtype, [&] { return FluxTransformer(flux_config_from_file(file, prefix)); });
  ldm::load_parameters(*transformer, file, [&](const std::string& name) { return ldm::Source{prefix + name}; },
                       [&](const std::string& key) { return key.starts_with(prefix); }, [](const std::string&) { return false; },
                       "FLUX transformer");
  return transformer;
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

void save_flux_transformer(const std::string& path, const FluxTransformer& transformer, std::optional<at::ScalarType> dtype,
                           const safetensors::Metadata& metadata) {
  NamedTensors tensors;
  for (const auto& item : transformer->named_parameters()) {
    const at::Tensor value = item.value().detach();
    tensors.emplace_back(item.key(), dtype ? value.to(*dtype) : value);
  }
  safetensors::Metadata m = metadata;
  if (transformer->config.head_dim() != 128) m["flux_axes_dim"] = nlohmann::json(transformer->config.axes_dim).dump();
  save_safetensors(path, tensors, m);
}

}  // namespace sdt
