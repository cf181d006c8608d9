#include "src/models/sdxl_checkpoint.h"

#include <array>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>

#include <nlohmann/json.hpp>

#include "src/core/error.h"
#include "src/core/tensor_io.h"
#include "src/models/ldm_layout.h"
#include "src/models/sd_checkpoint.h"

namespace sdt {
namespace fs = std::filesystem;

namespace {

constexpr const char* kText1Prefix = "conditioner.embedders.0.transformer.";
constexpr const char* kText2Prefix = "conditioner.embedders.1.model.";

const std::vector<std::string> kTransformersWeights{"model.safetensors", "model.fp16.safetensors"};
const std::vector<std::string> kDiffusersWeights{"diffusion_pytorch_model.safetensors",
                                                 "diffusion_pytorch_model.fp16.safetensors"};

ClipTextModel load_text_encoder_folder(const fs::path& folder, at::ScalarType dtype) {
  const ClipTextConfig config = read_clip_text_config((folder / "config.json").string());
  ClipTextModel text = ldm::build_in(dtype, [&] { return ClipTextModel(config); });
  load_clip_weights(text, safetensors::File(ldm::find_weights(folder.string(), kTransformersWeights)),
                    ClipLayout::transformers, "");
  return text;
}

}  // namespace

SdxlConfig SdxlConfig::base() {
  VaeConfig vae = VaeConfig::sd();
  vae.scaling_factor = kSdxlVaeScale;
  return {ClipTextConfig::sd1(), ClipTextConfig::sdxl_bigg(), vae, UNetConfig::sdxl()};
}

SdxlModels load_sdxl_diffusers_folder(const std::string& folder, at::ScalarType dtype) {
  const fs::path root(folder);
  if (!fs::is_directory(root / "text_encoder_2")) {
    fail(folder, "not an SDXL diffusers folder (expected unet/, vae/, text_encoder/ and text_encoder_2/)");
  }
  SdxlModels m;
  m.text_encoder1 = load_text_encoder_folder(root / "text_encoder", dtype);
  m.text_encoder2 = load_text_encoder_folder(root / "text_encoder_2", dtype);
  if (!m.text_encoder2->text_projection) {
    fail((root / "text_encoder_2" / "config.json").string(), "SDXL's second text encoder is a CLIPTextModelWithProjection");
  }
  m.vae = load_vae((root / "vae").string(), SdxlConfig::base().vae, dtype);
  const UNetConfig unet_config = read_unet_config((root / "unet" / "config.json").string());
  m.unet = ldm::build_in(dtype, [&] { return UNet2DConditionModel(unet_config); });
  load_unet_weights(m.unet, safetensors::File(ldm::find_weights((root / "unet").string(), kDiffusersWeights)),
                    WeightLayout::diffusers);
  return m;
}

SdxlModels load_sgm_checkpoint(const std::string& path, const SdxlConfig& config, at::ScalarType dtype,
                               bool projection_as_kohya) {
  const safetensors::File file(path);
  if (!file.contains(std::string(kText2Prefix) + "token_embedding.weight")) {
    fail(path, "not an SGM (SDXL) single file: it has no {}* text encoder", kText2Prefix);
  }
  SdxlModels m;
  m.text_encoder1 = ldm::build_in(dtype, [&] { return ClipTextModel(config.text1); });
  load_clip_weights(m.text_encoder1, file, ClipLayout::transformers, kText1Prefix);
  m.text_encoder2 = ldm::build_in(dtype, [&] { return ClipTextModel(config.text2); });
  load_clip_weights(m.text_encoder2, file, ClipLayout::openclip, kText2Prefix, projection_as_kohya);
  m.vae = ldm::build_in(dtype, [&] { return AutoencoderKL(config.vae); });
  load_vae_weights(m.vae, file, WeightLayout::ldm);
  m.unet = ldm::build_in(dtype, [&] { return UNet2DConditionModel(config.unet); });
  load_unet_weights(m.unet, file, WeightLayout::ldm);
  return m;
}

void save_sgm_checkpoint(const std::string& path, const SdxlModels& m, std::optional<at::ScalarType> dtype,
                         const safetensors::Metadata& metadata, bool projection_as_kohya) {
  NamedTensors out;
  std::map<std::string, std::array<at::Tensor, 3>> fused;  // OpenCLIP in_proj: q, k, v
  auto add = [&](const ldm::Source& s, at::Tensor t) {
    t = t.detach();
    if (dtype) t = t.to(*dtype);
    if (s.conv1x1) t = t.unsqueeze(-1).unsqueeze(-1);  // (O, I) -> (O, I, 1, 1)
    if (s.transposed && !projection_as_kohya) t = t.t().contiguous();
    if (s.fused_third >= 0) {
      fused[s.key][s.fused_third] = t;
    } else {
      out.emplace_back(s.key, t);
    }
  };
  for (const auto& item : m.unet->named_parameters()) add({ldm::kUnetPrefix + ldm::unet_key(item.key(), m.unet->config)}, item.value());
  for (const auto& item : m.vae->named_parameters()) {
    ldm::Source s = ldm::vae_key(item.key(), m.vae->config);
    s.key = ldm::kVaePrefix + s.key;
    add(s, item.value());
  }
  for (const auto& item : m.text_encoder1->named_parameters()) add({kText1Prefix + item.key()}, item.value());
  for (const auto& item : m.text_encoder2->named_parameters()) {
    ldm::Source s = ldm::openclip_key(item.key());
    s.key = kText2Prefix + s.key;
    add(s, item.value());
  }
  for (auto& [key, qkv] : fused) out.emplace_back(key, at::cat({qkv[0], qkv[1], qkv[2]}));
  // CLIP's contrastive temperature, which OpenCLIP loaders expect and nothing here uses: ln(100), its trained value.
  out.emplace_back(std::string(kText2Prefix) + "logit_scale",
                   at::full({}, std::log(100.0), out.front().second.options()));
  save_safetensors(path, out, metadata);
}

bool is_sdxl_checkpoint(const std::string& checkpoint) {
  if (fs::is_directory(checkpoint)) {
    const fs::path config = fs::path(checkpoint) / "unet" / "config.json";
    if (!fs::exists(config)) return false;
    std::ifstream in(config);
    const nlohmann::json unet = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
    return unet.is_object() && unet.value("addition_embed_type", nlohmann::json()) == "text_time";
  }
  const safetensors::File file(checkpoint);
  return file.contains(std::string(kText2Prefix) + "token_embedding.weight") &&
         file.contains(std::string(ldm::kUnetPrefix) + "label_emb.0.0.weight");
}

}  // namespace sdt
