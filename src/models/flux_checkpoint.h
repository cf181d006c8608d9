// FLUX.1 / Chroma checkpoints as kohya's flux_train_network.py takes them: the transformer in Black Forest Labs' single
// file (flux1-dev.safetensors; keys with or without `model.diffusion_model.`) or a diffusers FluxTransformer2DModel
// folder, CLIP-L (--clip_l), T5-XXL (--t5xxl) and the autoencoder (--ae) each in its own file. The transformer's variant comes from its weights, as kohya's
// analyze_checkpoint_state finds it: dev (guidance_in) or schnell (none), Chroma (distilled_guidance_layer), the block
// counts, widths and head size.
#pragma once

#include <optional>
#include <string>

#include "src/core/safetensors.h"
#include "src/models/clip_text.h"
#include "src/models/flux.h"
#include "src/models/t5.h"
#include "src/models/vae.h"

namespace sdt {

struct FluxModels {
  FluxTransformer transformer{nullptr};
  ClipTextModel clip_l{nullptr};  // none for Chroma
  T5EncoderModel t5xxl{nullptr};
  AutoencoderKL ae{nullptr};
};

// The transformer's config from a BFL file's tensors (`prefix`: "" or "model.diffusion_model."). RoPE's axes are
// FLUX's [16, 56, 56] for its head size of 128; a file with another head size (a test model) names its axes in the
// metadata key "flux_axes_dim" ("[4, 6, 6]"), else it is an sdt::Error.
FluxConfig flux_config_from_file(const safetensors::File& file, const std::string& prefix);
// Whether `path` holds a FLUX or Chroma transformer: a file with BFL's keys, or a diffusers FluxTransformer2DModel
// folder (or a pipeline folder with one in transformer/).
bool is_flux_checkpoint(const std::string& path);

// A BFL file, or a diffusers folder: its config.json and its weights (one file, or shards with their index) under
// BFL's names, as diffusers' convert_flux_transformer_checkpoint_to_diffusers maps them, reversed (q, k, v and the
// single blocks' MLP input fused again; the final modulation's halves back in BFL's shift-then-scale order).
FluxTransformer load_flux_transformer(const std::string& path, at::ScalarType dtype = at::kFloat);
// --clip_l: a transformers CLIPTextModel file (CLIP ViT-L/14's config), or a folder with config.json and its weights.
ClipTextModel load_flux_clip_l(const std::string& path, at::ScalarType dtype = at::kFloat);
// --t5xxl: a transformers T5EncoderModel file (config read from the weights' shapes), or a folder with config.json.
T5EncoderModel load_t5_encoder(const std::string& path, at::ScalarType dtype = at::kFloat);
// --ae: BFL's ae.safetensors (FLUX's autoencoder config), or a diffusers folder.
AutoencoderKL load_flux_autoencoder(const std::string& path, at::ScalarType dtype = at::kFloat);

// The transformer as BFL's single file (full fine-tuning's output): its own names, `dtype` or each weight's own.
void save_flux_transformer(const std::string& path, const FluxTransformer& transformer, std::optional<at::ScalarType> dtype,
                           const safetensors::Metadata& metadata);
// CLIP-L and T5 as the files --clip_l and --t5xxl read (transformers' names, T5's embedding as shared.weight): kohya's
// flux_merge_lora.py --clip_l_save_to / --t5xxl_save_to. `dtype` or each weight's own.
void save_flux_clip_l(const std::string& path, const ClipTextModel& clip, std::optional<at::ScalarType> dtype);
void save_t5_encoder(const std::string& path, const T5EncoderModel& t5, std::optional<at::ScalarType> dtype);

}  // namespace sdt
