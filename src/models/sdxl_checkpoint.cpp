#include "src/models/sdxl_checkpoint.h"

#include <cmath>
#include <filesystem>
#include <fstream>

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
  ldm::SingleFileWriter writer(dtype);
  writer.add(*m.unet, ldm::unet_map(m.unet->config));
  writer.add(*m.vae, ldm::vae_map(m.vae->config, ldm::kVaePrefix));
  writer.add(*m.text_encoder1, ldm::prefixed_map(kText1Prefix));
  writer.add(*m.text_encoder2, ldm::openclip_map(kText2Prefix, projection_as_kohya));
  NamedTensors out = writer.tensors();
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
