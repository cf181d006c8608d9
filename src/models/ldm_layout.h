// The single-file layouts of Stability's LDM (SD 1.x / 2.x) and its successor SGM (SDXL), shared by the families whose
// checkpoints use them: where each parameter of our diffusers-named models lives in such a file, and the loader that
// copies a model's parameters from a file through such a mapping. sd_checkpoint.cpp defines them.
#pragma once

#include <array>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "src/core/error.h"
#include "src/core/safetensors.h"
#include "src/core/tensor_io.h"
#include "src/models/unet.h"
#include "src/models/vae.h"

namespace sdt::ldm {

inline constexpr const char* kUnetPrefix = "model.diffusion_model.";
inline constexpr const char* kVaePrefix = "first_stage_model.";

// One parameter's tensor in a file.
struct Source {
  std::string key;
  int fused_third = -1;     // OpenCLIP's in_proj holds q, k, v stacked along dim 0: which third is this parameter
  bool conv1x1 = false;     // LDM stores this Linear weight (O, I) as a 1x1 convolution (O, I, 1, 1)
  bool transposed = false;  // the file holds this Linear weight transposed (OpenCLIP's text_projection, used as x @ P)
};
using KeyMap = std::function<Source(const std::string& name)>;

// diffusers U-Net name -> LDM / SGM key (without model.diffusion_model.). LDM numbers the U-Net's blocks flat:
// input_blocks.0 is conv_in, then per level `layers_per_block` blocks of [resnet, attention] and one downsampler;
// middle_block is [resnet, attention, resnet]; output_blocks per level `layers_per_block + 1` blocks of
// [resnet, attention, upsampler]; SDXL's add_embedding is label_emb.0.
std::string unet_key(const std::string& name, const UNetConfig& config);

// diffusers VAE name -> LDM key (without first_stage_model.).
Source vae_key(const std::string& name, const VaeConfig& config);

// transformers CLIP name (text_model.*, text_projection.weight) -> OpenCLIP key (without its model's prefix).
Source openclip_key(const std::string& name);

// The key maps of whole models in a single file, used to load and to save (so each is the other's inverse): the U-Net
// under model.diffusion_model., a VAE under `prefix`, an OpenCLIP text encoder under `prefix` (with
// `projection_as_kohya`, text_projection as kohya holds it: untransposed), a transformers-named one under `prefix`.
KeyMap unet_map(const UNetConfig& config);
KeyMap vae_map(const VaeConfig& config, const std::string& prefix);
KeyMap openclip_map(const std::string& prefix, bool projection_as_kohya = false);
KeyMap prefixed_map(const std::string& prefix);

// A single file's tensors, gathered model by model through their key maps (the inverse of load_parameters): each
// parameter in `dtype` (or its own), as the file holds it (1x1 convolutions, transposed weights, OpenCLIP's q, k, v
// fused into in_proj, which come last).
class SingleFileWriter {
 public:
  explicit SingleFileWriter(std::optional<at::ScalarType> dtype) : dtype_(dtype) {}
  void add(const torch::nn::Module& module, const KeyMap& map);
  NamedTensors tensors() const;

 private:
  std::optional<at::ScalarType> dtype_;
  NamedTensors tensors_;
  std::map<std::string, std::array<at::Tensor, 3>> fused_;  // in_proj: q, k, v
};

// Copies every parameter of `module` from `file` through `map`. `owned` says which keys of the file belong to this
// model (the rest belong to the other models of a single file, or are schedule buffers and the like); of those, any
// key nothing read that `ignored` does not excuse is unexpected. Missing, unexpected and misshaped keys are an
// sdt::Error naming the file, the first few keys and their count; `what` names the model in it.
void load_parameters(torch::nn::Module& module, const safetensors::File& file, const KeyMap& map,
                     const std::function<bool(const std::string&)>& owned,
                     const std::function<bool(const std::string&)>& ignored, const std::string& what);

// The sdt::Error load_parameters raises when a checkpoint's keys (`missing` from it, `unexpected` in it) do not match
// the model `what`: the count and the first few of each. Nothing when both are empty.
void check_keys_match(const std::string& path, const std::string& what, const std::vector<std::string>& missing,
                      const std::vector<std::string>& unexpected);

// The first of `names` in `folder` (weights files in the order a diffusers folder may hold them); an sdt::Error
// naming them when there is none.
std::string find_weights(const std::string& folder, const std::vector<std::string>& names);

// Builds a model with its parameters born in `dtype`, so that loading never holds an fp32 copy of a bf16 model.
// The default dtype is process-wide: build models from one thread at a time.
template <typename Make>
auto build_in(at::ScalarType dtype, Make make) {
  if (!at::isFloatingType(dtype)) fail("model dtype", "expected a floating-point dtype, got {}", c10::toString(dtype));
  const caffe2::TypeMeta saved = c10::get_default_dtype();
  c10::set_default_dtype(c10::scalarTypeToTypeMeta(dtype));
  try {
    auto model = make();
    c10::set_default_dtype(saved);
    return model;
  } catch (...) {
    c10::set_default_dtype(saved);
    throw;
  }
}

}  // namespace sdt::ldm
