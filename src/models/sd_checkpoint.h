// Loading and saving SD 1.x / 2.x weights in the layouts users have:
//
//   - a diffusers folder: unet/, vae/, text_encoder/, each with config.json and diffusion_pytorch_model.safetensors
//     or model.safetensors (or the .fp16.safetensors variants); the models take these names as they are;
//   - a single-file LDM checkpoint (.safetensors): `model.diffusion_model.*` (U-Net), `first_stage_model.*` (VAE),
//     and `cond_stage_model.transformer.*` (SD1, the transformers CLIP layout, also in old files that lack the
//     `text_model.` level) or `cond_stage_model.model.*` (SD2, OpenCLIP: fused q/k/v `in_proj`, one layer more than
//     SD2 uses, text_projection and logit_scale, all of which are skipped);
//   - a separate VAE (--vae): a diffusers folder, a diffusers-layout file (also with the attention names of
//     diffusers < 0.17), or an LDM file with or without the `first_stage_model.` prefix.
//
// The mapping between diffusers names and LDM keys is one function per model (diffusers name -> LDM key), written
// for any number of levels and layers from the model's config; loading and saving both use it, so they are each
// other's inverse by construction.
//
// Weights load straight into the requested dtype: the models are built in that dtype and each parameter is copied
// from a zero-copy view of the memory-mapped file, so no fp32 copy of a model is ever held. A key the model needs
// that the file lacks, or a key of the model's part of the file that nothing reads, is an sdt::Error that names the
// file, the first few keys and their count.
#pragma once

#include <optional>
#include <string>

#include <torch/torch.h>

#include "src/core/safetensors.h"
#include "src/models/clip_text.h"
#include "src/models/unet.h"
#include "src/models/vae.h"

namespace sdt {

struct SdConfig {
  bool v2 = false;  // SD 2.x: OpenCLIP text-encoder layout in single files
  ClipTextConfig text;
  VaeConfig vae;
  UNetConfig unet;

  static SdConfig sd1();
  static SdConfig sd2();
};

struct SdModels {
  ClipTextModel text_encoder{nullptr};
  AutoencoderKL vae{nullptr};
  UNet2DConditionModel unet{nullptr};
};

// Model configs from diffusers / transformers config.json files. Settings SD 1.x / 2.x never use (class embeddings,
// other block types, other activations ...) are errors rather than silently ignored.
UNetConfig read_unet_config(const std::string& config_json);
VaeConfig read_vae_config(const std::string& config_json);
ClipTextConfig read_clip_text_config(const std::string& config_json);

// A diffusers folder; the architecture comes from its config.json files.
SdModels load_diffusers_folder(const std::string& folder, at::ScalarType dtype = at::kFloat);

// A single-file LDM checkpoint with the architecture `config` describes.
SdModels load_ldm_checkpoint(const std::string& path, const SdConfig& config, at::ScalarType dtype = at::kFloat);

// --vae: a diffusers folder (its own config.json wins), or a single file in the diffusers or the LDM layout.
AutoencoderKL load_vae(const std::string& path, const VaeConfig& config, at::ScalarType dtype = at::kFloat);

// Writes all three models in the single-file LDM layout (`config.v2` picks the text-encoder layout; SD2 files get
// the extra OpenCLIP layer, text_projection and logit_scale other tools expect, as kohya writes them), in `dtype`
// or each parameter's own dtype.
void save_ldm_checkpoint(const std::string& path, const SdModels& models, const SdConfig& config,
                         std::optional<at::ScalarType> dtype = std::nullopt, const safetensors::Metadata& metadata = {});

// The lower level, for tests and other families: one model's parameters from `file`, each read from
// `key_prefix + ldm_or_diffusers_key`. `layout` picks the key mapping.
enum class WeightLayout { diffusers, ldm };
void load_unet_weights(UNet2DConditionModel& unet, const safetensors::File& file, WeightLayout layout);
void load_vae_weights(AutoencoderKL& vae, const safetensors::File& file, WeightLayout layout);

// A CLIP text encoder's weights under `prefix`, in transformers' names (a diffusers text_encoder/ with prefix "", SD1
// files' "cond_stage_model.transformer.", SDXL files' "conditioner.embedders.0.transformer.") or OpenCLIP's (SD2
// files' "cond_stage_model.model.", SDXL files' "conditioner.embedders.1.model."). OpenCLIP's text_projection P is
// used as x @ P, so it loads transposed into the Linear; `projection_as_kohya` loads it untransposed as kohya's
// sdxl_model_util does (its pooled vector is then x @ Pᵀ, not the model's).
enum class ClipLayout { transformers, openclip };
void load_clip_weights(ClipTextModel& text, const safetensors::File& file, ClipLayout layout, const std::string& prefix,
                       bool projection_as_kohya = false);

}  // namespace sdt
