// FLUX.1 / Chroma checkpoints as kohya's flux_train_network.py takes them: the transformer in Black Forest Labs' single
// file (flux1-dev.safetensors; keys with or without `model.diffusion_model.`) or a diffusers FluxTransformer2DModel
// folder, CLIP-L (--clip_l), T5-XXL (--t5xxl) and the autoencoder (--ae) each in its own file. The transformer's variant comes from its weights, as kohya's
// analyze_checkpoint_state finds it: dev (guidance_in) or schnell (none), Chroma (distilled_guidance_layer), the block
// counts, widths and head size.
#pragma once

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "src/core/safetensors.h"
#include "src/models/clip_text.h"
#include "src/models/flux.h"
#include "src/models/t5.h"
#include "src/models/vae.h"

namespace sdt {


// The transformer's config from a BFL file's tensors (`prefix`: "" or "model.diffusion_model."). RoPE's axes are
// FLUX's [16, 56, 56] for its head size of 128; a file with another head size (a test model) names its axes in the
// metadata key "flux_axes_dim" ("[4, 6, 6]"), else it is an sdt::Error.
FluxConfig flux_config_from_file(const safetensors::File& file, const std::string& prefix);
// Whether `path` holds a FLUX or Chroma transformer: a file with BFL's keys, or a diffusers FluxTransformer2DModel
// folder (or a pipeline folder with one in transformer/).
bool is_flux_checkpoint(const std::string& path);

// A FLUX transformer checkpoint read tensor by tensor under BFL's names (without `model.diffusion_model.`): a BFL file,
// or a diffusers folder (itself, or a pipeline's transformer/): its config.json and its weights (one file, or shards),
// mapped as diffusers' convert_flux_transformer_checkpoint_to_diffusers maps them, reversed (q, k, v and the single
// blocks' MLP input fused again; the final modulation's halves back in BFL's shift-then-scale order). The files stay
// memory-mapped: a tensor read without conversion is a view of them, of which only the pages used are read.
class FluxTransformerFile {
 public:
  explicit FluxTransformerFile(const std::string& path);
  const std::string& path() const { return path_; }  // the file, or the diffusers folder
  const FluxConfig& config() const { return config_; }
  // The tensor BFL calls `name`, in `dtype` (none: as stored). An sdt::Error when there is none.
  at::Tensor read(const std::string& name, std::optional<at::ScalarType> dtype = std::nullopt) const;
  // That every parameter of `transformer` is here with its shape and nothing else is: else an sdt::Error naming the
  // checkpoint, the missing and unexpected names (count and first few) or the misshaped one.
  void check_names_and_shapes(const torch::nn::Module& transformer) const;

 private:
  struct Part {
    size_t file = 0;
    std::string key;
  };
  struct Source {  // one BFL tensor: its parts, concatenated along dim 0
    std::vector<Part> parts;
    bool swap_halves = false;  // diffusers' final modulation
    std::vector<int64_t> shape;
  };
  void open_bfl_file();
  void open_diffusers_folder();

  std::string path_;
  std::vector<safetensors::File> files_;
  std::map<std::string, Source> sources_;
  FluxConfig config_;
};

struct FluxModels {
  FluxTransformer transformer{nullptr};
  ClipTextModel clip_l{nullptr};  // none for Chroma
  T5EncoderModel t5xxl{nullptr};
  AutoencoderKL ae{nullptr};
  // The checkpoint the transformer's blocks are read from when they were built without weights, and the dtype the
  // models were read in; none when the blocks hold theirs.
  std::shared_ptr<const FluxTransformerFile> deferred_blocks;
  at::ScalarType dtype = at::kFloat;
};

// The transformer in `dtype`. With BlockWeights::deferred its double and single blocks are built without weights (a
// block engine reads them from `file`, a rank its part) and everything else is read.
FluxTransformer load_flux_transformer(const FluxTransformerFile& file, at::ScalarType dtype, BlockWeights blocks = BlockWeights::allocated);
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
