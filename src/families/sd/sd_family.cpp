// SD 1.x / 2.x strategies and the family that loads their models.
#include "src/families/sd/sd_family.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <regex>
#include <utility>

#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include "src/core/error.h"
#include "src/families/sd/sampling.h"
#include "src/objectives/ddpm.h"
#include "src/tokenizers/kohya_prompt.h"

namespace sdt {
namespace fs = std::filesystem;

ClipTokenizer load_clip_tokenizer(const FamilyOptions& options) {
  const std::string_view pad_token = options.v2 ? ClipTokenizer::kSd2PadToken : ClipTokenizer::kSd1PadToken;
  fs::path path = options.tokenizer;
  if (path.empty()) {
    path = fs::path(options.pretrained_model_name_or_path) / "tokenizer";
    if (!fs::is_directory(path)) path = ClipTokenizer::bundled_vocab_gz();
  }
  if (fs::is_directory(path)) {
    return ClipTokenizer::from_vocab_json_and_merges((path / "vocab.json").string(), (path / "merges.txt").string(),
                                                     pad_token);
  }
  return ClipTokenizer::from_bpe_vocab_gz(path.string(), pad_token);
}

// ---------------------------------------------------------------- network targets (kohya's networks/lora.py)

namespace {

namespace nn = torch::nn;

// kohya's block index of a U-Net module name: 25 blocks, 0 unused, 1..12 the down side (3 per level: two resnets or
// attentions, then the downsampler), 12 also the mid block, 13..24 the up side; -1 outside the blocks.
constexpr int kBlocksPerSide = 12;

int lora_block_index(const std::string& lora_name) {
  static const std::regex updown(R"((up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_)");
  std::smatch m;
  if (std::regex_search(lora_name, m, updown)) {
    const int i = std::stoi(m[2]), j = std::stoi(m[4]);
    const int idx = (m[3] == "upsamplers" || m[3] == "downsamplers") ? 3 * i + 2 : 3 * i + j;
    return m[1] == "down" ? 1 + idx : kBlocksPerSide + 1 + idx;
  }
  if (lora_name.find("mid_block_") != std::string::npos) return kBlocksPerSide;
  return -1;
}

// diffusers and transformers register some children in another order than our models do, and kohya creates its
// modules in their named_modules() order (which decides the initial weights drawn and the order of parameter
// groups): up_blocks before mid_block, attentions before resnets, CLIP's k_proj, v_proj, q_proj, out_proj.
int diffusers_child_rank(const std::string& name) {
  static const std::map<std::string, int> rank{{"up_blocks", 1}, {"mid_block", 2}, {"attentions", 0},
                                               {"resnets", 1},    {"downsamplers", 2}, {"upsamplers", 2},
                                               {"k_proj", 0},     {"v_proj", 1},       {"q_proj", 2},
                                               {"out_proj", 3}};
  auto it = rank.find(name);
  return it == rank.end() ? 0 : it->second;
}

std::vector<std::pair<std::string, std::shared_ptr<nn::Module>>> children_in_diffusers_order(const nn::Module& module) {
  std::vector<std::pair<std::string, std::shared_ptr<nn::Module>>> children;
  for (const auto& item : module.named_children()) children.emplace_back(item.key(), item.value());
  std::stable_sort(children.begin(), children.end(), [](const auto& a, const auto& b) {
    return diffusers_child_rank(a.first) < diffusers_child_rank(b.first);
  });
  return children;
}

bool is_layer(const nn::Module& m) { return dynamic_cast<const Adaptable*>(&m) != nullptr; }

// Every Linear / Conv2d below `module` (named_modules order, the module itself included).
void collect_layers(const std::shared_ptr<nn::Module>& module, const std::string& path,
                    std::vector<std::pair<std::string, std::shared_ptr<nn::Module>>>& out) {
  if (is_layer(*module)) out.emplace_back(path, module);
  for (const auto& [name, child] : children_in_diffusers_order(*module)) {
    if (name == "lora") continue;  // a LoRA already applied to this layer
    collect_layers(child, path.empty() ? name : path + "." + name, out);
  }
}

}  // namespace

std::vector<NetworkTarget> lora_targets(const std::shared_ptr<nn::Module>& model, const std::string& prefix,
                                        const std::vector<ModuleTest>& parents, bool in_denoiser,
                                        const std::function<std::string(const std::string&)>& rename) {
  std::vector<NetworkTarget> out;
  const std::function<void(const std::shared_ptr<nn::Module>&, const std::string&)> visit =
      [&](const std::shared_ptr<nn::Module>& module, const std::string& path) {
        for (const auto& [name, child] : children_in_diffusers_order(*module)) {
          const std::string child_path = path.empty() ? name : path + "." + name;
          if (std::any_of(parents.begin(), parents.end(), [&](ModuleTest t) { return t(*child); })) {
            std::vector<std::pair<std::string, std::shared_ptr<nn::Module>>> layers;
            collect_layers(child, "", layers);
            for (auto& [layer_path, layer] : layers) {
              const std::string module_path = child_path + "." + layer_path;
              std::string lora_name = prefix + "." + (rename ? rename(module_path) : module_path);
              std::replace(lora_name.begin(), lora_name.end(), '.', '_');
              out.push_back({lora_name, layer, in_denoiser, -1});
            }
          }
          visit(child, child_path);
        }
      };
  visit(model, "");
  return out;
}

std::vector<NetworkTarget> sd_network_targets(ClipTextModel text_encoder, UNet2DConditionModel unet, bool conv_blocks) {
  std::vector<NetworkTarget> targets;
  if (text_encoder) targets = lora_targets(text_encoder.ptr(), "lora_te", {&is_a<ClipAttentionImpl>, &is_a<ClipMlpImpl>}, false);
  if (unet) {
    std::vector<ModuleTest> parents{&is_a<Transformer2DImpl>};
    if (conv_blocks) {
      parents.push_back(&is_a<ResnetBlock2DImpl>);
      parents.push_back(&is_a<Downsample2DImpl>);
      parents.push_back(&is_a<Upsample2DImpl>);
    }
    for (NetworkTarget& t : lora_targets(unet.ptr(), "lora_unet", parents, true)) {
      t.block = lora_block_index(t.lora_name);
      targets.push_back(std::move(t));
    }
  }
  return targets;
}

// ---------------------------------------------------------------- tokenize

SdTokenizeStrategy::SdTokenizeStrategy(ClipTokenizer tokenizer, std::optional<int> max_token_length)
    : tokenizer_(std::move(tokenizer)), max_token_length_(max_token_length) {}

Tokens SdTokenizeStrategy::tokenize(const std::vector<std::string>& captions, bool weighted) const {
  if (captions.empty()) fail("tokenize", "expected at least one caption");
  std::vector<int64_t> ids;
  std::vector<float> weights;
  int64_t windows = 0;
  for (const std::string& caption : captions) {
    const WeightedTokenChunks chunks = weighted ? kohya_tokenize_with_weights(tokenizer_, caption, max_token_length_)
                                                : WeightedTokenChunks{kohya_tokenize(tokenizer_, caption, max_token_length_), {}};
    windows = static_cast<int64_t>(chunks.ids.size());
    for (const auto& window : chunks.ids) ids.insert(ids.end(), window.begin(), window.end());
    for (const auto& window : chunks.weights) weights.insert(weights.end(), window.begin(), window.end());
  }
  const std::vector<int64_t> shape{static_cast<int64_t>(captions.size()), windows, ClipTokenizer::kModelMaxLength};
  Tokens tokens;
  tokens.ids.push_back(at::tensor(ids, at::kLong).reshape(shape));  // (B, n, 77)
  if (weighted) tokens.weights.push_back(at::tensor(weights, at::kFloat).reshape(shape));
  return tokens;
}

// ---------------------------------------------------------------- text encoding

SdTextEncodingStrategy::SdTextEncodingStrategy(ClipTextModel text_encoder, std::optional<int64_t> clip_skip)
    : text_encoder_(std::move(text_encoder)), clip_skip_(clip_skip) {}

Conditioning SdTextEncodingStrategy::encode(const Tokens& tokens) const {
  if (tokens.ids.size() != 1) fail("SD text encoding", "expected the ids of one tokenizer, got {}", tokens.ids.size());
  ClipTextModel text_encoder = text_encoder_;
  const at::Tensor ids = tokens.ids[0].to(module_device(*text_encoder));     // (B, n, 77)
  at::Tensor hidden = encode_prompt_chunks(text_encoder, ids, clip_skip_);   // (B, 2 + 75n, D); n = 1: (B, 77, D)
  if (tokens.weights.empty()) return {{"hidden_state", hidden}};
  return {{"hidden_state", weight_prompt_chunks(hidden, tokens.weights[0])}};
}

// ---------------------------------------------------------------- latents

SdLatentsCachingStrategy::SdLatentsCachingStrategy(AutoencoderKL vae, double scaling_factor, std::string suffix,
                                                   double shift_factor, bool resolution_in_keys)
    : vae_(std::move(vae)), scaling_factor_(scaling_factor), suffix_(std::move(suffix)), shift_factor_(shift_factor),
      resolution_in_keys_(resolution_in_keys) {}

LatentsCacheLayout SdLatentsCachingStrategy::cache_layout(int64_t bucket_width, int64_t bucket_height,
                                                          bool flip_aug) const {
  const int64_t factor = vae_->downscale_factor();
  if (bucket_width <= 0 || bucket_height <= 0 || bucket_width % factor != 0 || bucket_height % factor != 0) {
    fail("latent cache", "bucket {}x{}: expected positive sides that are multiples of the VAE's {} pixels per latent",
         bucket_width, bucket_height, factor);
  }
  const std::string size = resolution_in_keys_ ? fmt::format("_{}x{}", bucket_height / factor, bucket_width / factor) : "";
  return {"latents" + size, flip_aug ? "latents_flipped" + size : "",
          {vae_->config.latent_channels, bucket_height / factor, bucket_width / factor}};
}

EncodedLatents SdLatentsCachingStrategy::encode(const at::Tensor& images, bool flip_aug, LatentSampling sampling,
                                                std::optional<at::Generator> generator) const {
  torch::NoGradGuard no_grad;
  AutoencoderKL vae = vae_;
  const auto latents_of = [&](const at::Tensor& x) {  // (B, 3, H, W) -> (B, 4, H/8, W/8)
    const DiagonalGaussian posterior = vae->encode(x);
    const at::Tensor z = sampling == LatentSampling::mean ? posterior.mean : posterior.sample(generator);
    return (z - shift_factor_) * scaling_factor_;
  };
  // kohya's cache_batch_latents: the images in the VAE's device and dtype (bf16 under --mixed_precision).
  const at::Tensor on_device = images.to(module_device(*vae), vae->parameters().front().scalar_type());
  EncodedLatents out{latents_of(on_device), {}};
  if (flip_aug) out.flipped = latents_of(on_device.flip({3}));
  return out;
}

// ---------------------------------------------------------------- text-encoder outputs

SdTextEncoderOutputsCachingStrategy::SdTextEncoderOutputsCachingStrategy(const TokenizeStrategy& tokenize,
                                                                         const TextEncodingStrategy& encode,
                                                                         std::string suffix, std::vector<std::string> names)
    : tokenize_(tokenize), encode_(encode), suffix_(std::move(suffix)), names_(std::move(names)) {}

NamedTensors SdTextEncoderOutputsCachingStrategy::outputs_to_cache(const std::vector<std::string>& captions,
                                                                   bool weighted) const {
  torch::NoGradGuard no_grad;
  return encode_.encode(tokenize_.tokenize(captions, weighted));
}

Conditioning SdTextEncoderOutputsCachingStrategy::outputs_from_cache(const NamedTensors& stored) const {
  Conditioning conditioning;
  for (const std::string& name : names_) {
    const auto it = std::find_if(stored.begin(), stored.end(), [&](const auto& named) { return named.first == name; });
    if (it == stored.end()) {
      fail("text-encoder output cache", "no '{}': expected {} (a cache of another family?)", name, fmt::join(names_, ", "));
    }
    conditioning.push_back(*it);
  }
  return conditioning;
}

// ---------------------------------------------------------------- the family

SdFamily::SdFamily(SdModels models, ClipTokenizer tokenizer, const FamilyOptions& options)
    : models_(std::move(models)),
      v2_(options.v2),
      bundle_{models_.unet.ptr(), models_.vae.ptr(), {models_.text_encoder.ptr()}},
      v_parameterization_(options.v_parameterization),
      clip_skip_(options.clip_skip ? std::optional<int64_t>(*options.clip_skip) : std::nullopt),
      max_token_length_(options.max_token_length),
      tokenize_(std::move(tokenizer), options.max_token_length),
      encode_(models_.text_encoder, clip_skip_),
      latents_(models_.vae, models_.vae->config.scaling_factor, "_sd"),
      outputs_(tokenize_, encode_, "_sd_te", {"hidden_state"}) {}

at::Tensor SdFamily::sample(const SampleOptions& options) const {
  SdModels models = models_;
  return sample_image(models, tokenize_.tokenizer(), options, v_parameterization_ ? Prediction::v : Prediction::epsilon,
                      clip_skip_);
}

void SdFamily::save_checkpoint(const std::string& path, std::optional<at::ScalarType> dtype,
                               const safetensors::Metadata& metadata) const {
  SdConfig config{v2_, models_.text_encoder->config, models_.vae->config, models_.unet->config};
  save_ldm_checkpoint(path, models_, config, dtype, metadata);
}

// ---------------------------------------------------------------- training hooks (kohya's train_network.py for SD)

std::unique_ptr<TrainingObjective> SdFamily::make_objective(const TrainArgs& args) const {
  return std::make_unique<DdpmObjective>(ddpm_options_from_args(args));
}

at::Tensor SdFamily::predict(const NoisedBatch& batch, const Conditioning& conditioning) const {
  UNet2DConditionModel unet = models_.unet;  // a handle: the holder's const-ness is not the model's
  return unet->forward(batch.model_input, batch.timesteps, conditioning_tensor(conditioning, "hidden_state"));
}

std::vector<FullTrainingGroup> SdFamily::full_training_groups(const TrainArgs& args) const {
  for (const auto& [given, flag] : {std::pair{args.train_text_encoder, "--train_text_encoder"},
                                    {args.learning_rate_te1.has_value(), "--learning_rate_te1"},
                                    {args.learning_rate_te2.has_value(), "--learning_rate_te2"},
                                    {args.block_lr.has_value(), "--block_lr"}}) {
    if (given) fail(flag, "is sdxl_train.py's (SDXL); SD trains as train_db.py: --learning_rate_te, --stop_text_encoder_training");
  }
  std::vector<FullTrainingGroup> groups{{.prefix = "unet.", .model = models_.unet.ptr(), .lr = args.learning_rate}};
  if (!args.stop_text_encoder_training || *args.stop_text_encoder_training >= 0) {
    groups.push_back({.prefix = "text_encoder.", .model = models_.text_encoder.ptr(),
                      .lr = args.learning_rate_te.value_or(args.learning_rate), .text_encoder = true});
  }
  return groups;
}

LoRANetworkConfig SdFamily::network_config(const TrainArgs& args) const {
  return parse_lora_network_args(args.network_dim, args.network_alpha, args.network_dropout, args.network_args, NetworkBlockLayout::sd());
}

std::vector<NetworkTarget> SdFamily::network_targets(bool conv_blocks) const {
  return sd_network_targets(models_.text_encoder, models_.unet, conv_blocks);
}

ParallelPlan SdFamily::parallel_plan() const {
  return {.blocks = models_.unet->blocks(),
          .no_block_swap_reason = "SD 1.x/2.x have no stack of transformer blocks to swap (kohya offers block swap for "
                                  "FLUX, SD3 and the other transformer families only)"};
}

void SdFamily::set_block_runner(BlockRunner* runner) { models_.unet->block_runner = runner; }

void SdFamily::set_gradient_checkpointing(bool on) { models_.unet->gradient_checkpointing = on; }

ModelSpec SdFamily::model_spec() const {
  ModelSpec spec;
  spec.architecture = !v2_ ? "stable-diffusion-v1" : v_parameterization_ ? "stable-diffusion-v2-768-v" : "stable-diffusion-v2-512";
  spec.prediction_type = v_parameterization_ ? "v" : "epsilon";
  spec.native_resolution = v2_ && v_parameterization_ ? 768 : 512;
  return spec;
}

safetensors::Metadata SdFamily::training_metadata() const {
  return {{"ss_v2", v2_ ? "True" : "False"},
          {"ss_base_model_version", v2_ ? (v_parameterization_ ? "sd_v2_768_v" : "sd_v2_512") : "sd_v1"}};
}

std::string SdFamily::text_encoder_settings() const {
  return fmt::format("v2={} clip_skip={} max_token_length={}", v2_, clip_skip_ ? std::to_string(*clip_skip_) : "none",
                     max_token_length_ ? std::to_string(*max_token_length_) : "75");
}

bool is_sd_checkpoint(const std::string& checkpoint) {
  if (fs::is_directory(checkpoint)) {
    const fs::path config = fs::path(checkpoint) / "unet" / "config.json";
    if (!fs::exists(config)) return false;
    std::ifstream in(config);
    const nlohmann::json unet = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
    return unet.is_object() && (!unet.contains("addition_embed_type") || unet["addition_embed_type"].is_null());
  }
  const safetensors::File file(checkpoint);
  bool denoiser = false;
  for (const auto& t : file.tensors()) {
    if (t.name.starts_with("conditioner.")) return false;
    denoiser = denoiser || t.name.starts_with("model.diffusion_model.input_blocks.");
  }
  return denoiser;
}

std::unique_ptr<Family> load_sd_family(const FamilyOptions& options) {
  const std::string& path = options.pretrained_model_name_or_path;
  if (path.empty()) fail("pretrained_model_name_or_path", "required: a single-file SD checkpoint or a diffusers folder");
  if (options.clip_skip && *options.clip_skip < 1) fail("clip_skip", "expected 1 or more, got {}", *options.clip_skip);

  const at::ScalarType dtype = weights_dtype(options);
  SdModels models = fs::is_directory(path) ? load_diffusers_folder(path, dtype)
                                           : load_ldm_checkpoint(path, options.v2 ? SdConfig::sd2() : SdConfig::sd1(), dtype);
  if (options.vae) models.vae = load_vae(*options.vae, models.vae->config, dtype);
  ClipTokenizer tokenizer = load_clip_tokenizer(options);
  const int64_t vocab = models.text_encoder->config.vocab_size;
  if (std::max(tokenizer.bos_id(), tokenizer.eos_id()) >= vocab) {
    fail(options.tokenizer.empty() ? path : options.tokenizer,
         "the tokenizer's ids reach {} but the text encoder has {} tokens: a vocabulary for another model?",
         std::max(tokenizer.bos_id(), tokenizer.eos_id()), vocab);
  }
  return std::make_unique<SdFamily>(std::move(models), std::move(tokenizer), options);
}

}  // namespace sdt
