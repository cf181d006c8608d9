// The family registry and PNG output.
#include "src/families/family.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <map>

#include <fmt/ranges.h>

#include "src/core/error.h"
#include "src/data/image.h"
#include "src/families/sd/sd_family.h"
#include "src/families/flux/flux_family.h"
#include "src/families/sdxl/sdxl_family.h"

namespace sdt {
namespace {

namespace fs = std::filesystem;

// Every family this build has, under the name --family takes and caches record. A new family adds its line.
std::map<std::string, FamilyRow>& registry() {
  static std::map<std::string, FamilyRow> families{
      {"sd", {&load_sd_family, &is_sd_checkpoint}},        // SD 1.x / 2.x (--v2, --v_parameterization)
      {"sdxl", {&load_sdxl_family, &is_sdxl_checkpoint}},  // SDXL and its fine-tunes
      {"flux", {&load_flux_family, &is_flux_checkpoint}},  // FLUX.1 dev / schnell and Chroma (--model_type chroma)
  };
  return families;
}

}  // namespace

void register_family(const std::string& name, FamilyRow row) {
  if (!registry().emplace(name, row).second) fail("model family", "'{}' is registered already", name);
}

std::vector<std::string> family_names() {
  std::vector<std::string> names;
  for (const auto& [name, row] : registry()) names.push_back(name);
  return names;
}

std::string family_of_checkpoint(const std::optional<std::string>& family, const std::string& checkpoint) {
  if (family) {
    if (!registry().contains(*family)) fail("--family", "unknown family '{}': this build has {}", *family, fmt::join(family_names(), ", "));
    return *family;
  }
  if (!fs::exists(checkpoint)) fail(checkpoint, "no such checkpoint file or diffusers folder");
  std::vector<std::string> found;
  for (const auto& [name, row] : registry()) {
    if (row.recognises(checkpoint)) found.push_back(name);
  }
  if (found.size() == 1) return found.front();
  if (found.empty()) {
    fail(checkpoint, "no model family of this build ({}) recognises it as a checkpoint file or diffusers folder; name the "
                     "family with --family", fmt::join(family_names(), ", "));
  }
  fail(checkpoint, "it could be a model of {}: name one with --family", fmt::join(found, " or "));
}

std::unique_ptr<Family> load_family_for_training(const TrainArgs& args) {
  const FamilyOptions options = family_options_from_args(args);
  return load_family(family_of_checkpoint(args.family, options.pretrained_model_name_or_path), options);
}

at::ScalarType weights_dtype(const FamilyOptions& options) {
  switch (options.weights_dtype) {
    case WeightsDtype::bfloat16: return at::kBFloat16;
    case WeightsDtype::float16: return at::kHalf;
    case WeightsDtype::float32: break;
  }
  return at::kFloat;
}

FamilyOptions family_options_from_args(const TrainArgs& args) {
  if (!args.pretrained_model_name_or_path) fail("--pretrained_model_name_or_path", "required: a checkpoint file or a diffusers folder");
  FamilyOptions o;
  o.pretrained_model_name_or_path = *args.pretrained_model_name_or_path;
  o.vae = args.vae;
  o.tokenizer = args.tokenizer.value_or("");
  o.v2 = args.v2;
  o.v_parameterization = args.v_parameterization;
  o.text_projection_as_kohya = args.text_projection_as_kohya;
  if (args.max_token_length) o.max_token_length = static_cast<int>(*args.max_token_length);
  if (args.clip_skip) o.clip_skip = static_cast<int>(*args.clip_skip);
  o.clip_l = args.clip_l;
  o.t5xxl = args.t5xxl;
  o.ae = args.ae;
  if (args.t5xxl_max_token_length) o.t5xxl_max_token_length = static_cast<int>(*args.t5xxl_max_token_length);
  o.apply_t5_attn_mask = args.apply_t5_attn_mask;
  o.guidance_scale = args.guidance_scale;
  o.model_type = args.model_type;
  return o;
}

std::unique_ptr<Family> load_family(const std::string& name, const FamilyOptions& options) {
  const auto it = registry().find(name);
  if (it == registry().end()) {
    fail("model family", "unknown family '{}': this build has {}", name, fmt::join(family_names(), ", "));
  }
  return it->second.load(options);
}

std::vector<SwapStack> ParallelPlan::swapped(int64_t blocks_to_swap) const {
  if (!swap) fail("--blocks_to_swap", "{}", no_block_swap_reason);
  std::vector<SwapStack> stacks;
  for (const SwapStack& stack : swap(blocks_to_swap)) {
    if (stack.blocks_to_swap > 0) stacks.push_back(stack);
  }
  return stacks;
}

bool TextEncodingStrategy::encodes_alone(const std::set<int>&) const { return false; }

Conditioning TextEncodingStrategy::encode_alone(const Tokens&, const std::set<int>& encoders) const {
  fail("text encoding", "this family encodes its captions with all its text encoders at once, not {} alone", fmt::join(encoders, ", "));
}

void Family::save_text_encoder(const std::string& name, const std::string&, std::optional<at::ScalarType>) const {
  fail(name, "{}'s checkpoint holds its text encoders; there is no separate file to write", this->name());
}

Conditioning Family::image_conditioning(const std::vector<ImageGeometry>&) const { return {}; }

const at::Tensor& conditioning_tensor(const Conditioning& conditioning, std::string_view name) {
  for (const auto& [key, tensor] : conditioning) {
    if (key == name) return tensor;
  }
  std::vector<std::string> names;
  for (const auto& named : conditioning) names.push_back(named.first);
  fail("conditioning", "no '{}' (it has: {})", name, names.empty() ? "nothing" : fmt::format("{}", fmt::join(names, ", ")));
}

void write_png(const std::string& path, const at::Tensor& image) {
  if (image.dim() != 3 || image.size(2) != 3 || image.scalar_type() != at::kByte) {
    fail(path, "expected an (H, W, 3) uint8 RGB image, got {} {}", c10::str(image.sizes()),
         c10::toString(image.scalar_type()));
  }
  const at::Tensor rgb = image.contiguous();
  Image out{.width = static_cast<int>(rgb.size(1)), .height = static_cast<int>(rgb.size(0)), .channels = 3};
  out.data.assign(rgb.data_ptr<uint8_t>(), rgb.data_ptr<uint8_t>() + rgb.numel());
  sdt::write_png(path, out);
}

}  // namespace sdt
