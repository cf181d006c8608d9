// Loading and saving SDXL weights in the layouts users have:
//
//   - a diffusers folder: unet/, vae/, text_encoder/ (CLIP ViT-L/14), text_encoder_2/ (OpenCLIP ViT-bigG/14 as
//     transformers' CLIPTextModelWithProjection), each with config.json and weights;
//   - an SGM single file (Stability's generative-models, what SDXL fine-tunes ship as): `model.diffusion_model.*`
//     (the U-Net in LDM numbering, add_embedding as label_emb.0), `conditioner.embedders.0.transformer.*` (the
//     first encoder in transformers' names), `conditioner.embedders.1.model.*` (the second in OpenCLIP's: fused
//     in_proj, text_projection, logit_scale), `first_stage_model.*` (the VAE).
//
// OpenCLIP's text_projection P is used as pooled @ P (open_clip's encode_text); a Linear holds Pᵀ, so loading
// transposes it and saving transposes it back, and the pooled vector from a single file equals the one from a
// diffusers folder. kohya's sdxl_model_util copies P into the Linear untransposed (its pooled vector from a single file
// is pooled @ Pᵀ); `projection_as_kohya` loads it that way, for results equal to kohya's.
#pragma once

#include <optional>
#include <string>

#include <torch/torch.h>

#include "src/core/safetensors.h"
#include "src/models/clip_text.h"
#include "src/models/unet.h"
#include "src/models/vae.h"

namespace sdt {

// kohya's sdxl_model_util.VAE_SCALE_FACTOR: what SDXL's latents are multiplied by.
inline constexpr double kSdxlVaeScale = 0.13025;

struct SdxlConfig {
  ClipTextConfig text1;  // CLIP ViT-L/14
  ClipTextConfig text2;  // OpenCLIP ViT-bigG/14 with its projection
  VaeConfig vae;
  UNetConfig unet;

  static SdxlConfig base();  // SDXL base 1.0 and its fine-tunes
};

struct SdxlModels {
  ClipTextModel text_encoder1{nullptr};
  ClipTextModel text_encoder2{nullptr};
  AutoencoderKL vae{nullptr};
  UNet2DConditionModel unet{nullptr};
};

// A diffusers folder; the architecture comes from its config.json files.
SdxlModels load_sdxl_diffusers_folder(const std::string& folder, at::ScalarType dtype = at::kFloat);

// An SGM single file with the architecture `config` describes.
SdxlModels load_sgm_checkpoint(const std::string& path, const SdxlConfig& config, at::ScalarType dtype = at::kFloat,
                               bool projection_as_kohya = false);

// Writes all four models in the SGM single-file layout (with the logit_scale OpenCLIP loaders expect), in `dtype` or
// each parameter's own dtype. `projection_as_kohya` writes text_projection as kohya does, untransposed: the inverse of
// loading with it.
void save_sgm_checkpoint(const std::string& path, const SdxlModels& models, std::optional<at::ScalarType> dtype,
                         const safetensors::Metadata& metadata = {}, bool projection_as_kohya = false);

// Whether `checkpoint` is an SDXL model: an SGM single file (`conditioner.embedders.1.model.*` beside
// `model.diffusion_model.*`), or a diffusers folder whose U-Net has SDXL's text_time conditioning.
bool is_sdxl_checkpoint(const std::string& checkpoint);

}  // namespace sdt
