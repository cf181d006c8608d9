// SD 1.x / 2.x as a family (kohya-ss/sd-scripts' strategy_sd.py and the SD parts of train_network.py): the CLIP
// tokenizer with kohya's 77-token windows, the CLIP text encoder with clip_skip and kohya's window stitching, the
// VAE's latents times 0.18215, and the U-Net sampled with DDIM / Euler / Euler ancestral.
#pragma once

#include <functional>
#include <memory>
#include <optional>

#include "src/families/family.h"
#include "src/models/sd_checkpoint.h"
#include "src/networks/network_target.h"
#include "src/tokenizers/clip_tokenizer.h"

namespace sdt {

// kohya's networks/lora.py module selection on one model: every Linear and Conv2d below each module a `parents` test
// accepts, in the named_modules() order of the reference's model (diffusers' and transformers' registration order),
// named `prefix` + "_" + its module path with "." replaced by "_" (`rename`, when given, rewrites the dotted path
// first: SDXL's SGM names); no block indices.
using ModuleTest = bool (*)(const torch::nn::Module&);
std::vector<NetworkTarget> lora_targets(const std::shared_ptr<torch::nn::Module>& model, const std::string& prefix,
                                        const std::vector<ModuleTest>& parents, bool in_denoiser,
                                        const std::function<std::string(const std::string&)>& rename = {});

template <typename T>
bool is_a(const torch::nn::Module& m) {
  return dynamic_cast<const T*>(&m) != nullptr;
}

// The layers kohya's networks/lora.py adapts, in its creation order (diffusers' named_modules order): every Linear and
// Conv2d inside a Transformer2DModel of the U-Net (inside ResnetBlock2D / Downsample2D / Upsample2D as well with
// `conv_blocks`) and inside CLIPAttention / CLIPMLP of the text encoder, named `lora_unet_` / `lora_te_` + the
// diffusers module path with `.` replaced by `_`, with kohya's block indices. Either model may be null.
std::vector<NetworkTarget> sd_network_targets(ClipTextModel text_encoder, UNet2DConditionModel unet, bool conv_blocks);

// kohya's SdTokenizeStrategy(v2, max_token_length): (B, n, 77) ids, n = max_token_length / 75 windows (1 without
// it), with SD 1.x's padding (EOS) or SD 2.x's ("!", id 0) and its window rules (kohya_prompt.h).
class SdTokenizeStrategy : public TokenizeStrategy {
 public:
  SdTokenizeStrategy(ClipTokenizer tokenizer, std::optional<int> max_token_length);
  Tokens tokenize(const std::vector<std::string>& captions, bool weighted) const override;
  const ClipTokenizer& tokenizer() const { return tokenizer_; }

 private:
  ClipTokenizer tokenizer_;
  std::optional<int> max_token_length_;
};

// kohya's SdTextEncodingStrategy(clip_skip): each 77-id window through the text encoder, the last layer's output
// (or hidden_states[-clip_skip]) after the final layer norm, windows stitched to (B, 2 + 75n, D). Caption weights
// multiply the hidden states of each window's 75 text positions (encode_tokens_with_weights).
class SdTextEncodingStrategy : public TextEncodingStrategy {
 public:
  SdTextEncodingStrategy(ClipTextModel text_encoder, std::optional<int64_t> clip_skip);
  Conditioning encode(const Tokens& tokens) const override;

 private:
  ClipTextModel text_encoder_;
  std::optional<int64_t> clip_skip_;
};

// The VAE's posterior mean or sample, less the shift, times the family's scaling factor (SD: 0.18215, SDXL: 0.13025,
// FLUX: (z - 0.1159) x 0.3611): what the denoiser is trained on (kohya's SdSdxlLatentsCachingStrategy; FLUX's
// FluxLatentsCachingStrategy). kohya's "_sd.npz" / "_sdxl.npz" files hold SD's latents unscaled, "_flux.npz" FLUX's
// scaled, under keys with the latents' size (`resolution_in_keys`: "latents_64x64").
class SdLatentsCachingStrategy : public LatentsCachingStrategy {
 public:
  SdLatentsCachingStrategy(AutoencoderKL vae, double scaling_factor, std::string suffix, double shift_factor = 0,
                           bool resolution_in_keys = false);
  std::string cache_suffix() const override { return suffix_; }
  LatentsCacheLayout cache_layout(int64_t bucket_width, int64_t bucket_height, bool flip_aug) const override;
  EncodedLatents encode(const at::Tensor& images, bool flip_aug, LatentSampling sampling,
                        std::optional<at::Generator> generator = std::nullopt) const override;

 private:
  AutoencoderKL vae_;
  double scaling_factor_;
  std::string suffix_;
  double shift_factor_;
  bool resolution_in_keys_;
};

// What a family's text-encoding strategy makes, stored under its names (SD: "hidden_state" (B, 2 + 75n, D); SDXL:
// kohya's "hidden_state1", "hidden_state2", "pool2"), weights applied for weighted captions. (kohya caches no
// text-encoder outputs for SD 1.x / 2.x.)
class SdTextEncoderOutputsCachingStrategy : public TextEncoderOutputsCachingStrategy {
 public:
  SdTextEncoderOutputsCachingStrategy(const TokenizeStrategy& tokenize, const TextEncodingStrategy& encode,
                                      std::string suffix, std::vector<std::string> names);
  std::string cache_suffix() const override { return suffix_; }
  NamedTensors outputs_to_cache(const std::vector<std::string>& captions, bool weighted) const override;
  Conditioning outputs_from_cache(const NamedTensors& stored) const override;

 private:
  const TokenizeStrategy& tokenize_;
  const TextEncodingStrategy& encode_;
  std::string suffix_;
  std::vector<std::string> names_;
};

class SdFamily : public Family {
 public:
  SdFamily(SdModels models, ClipTokenizer tokenizer, const FamilyOptions& options);
  SdFamily(const SdFamily&) = delete;  // outputs_ refers to tokenize_ and encode_
  SdFamily& operator=(const SdFamily&) = delete;
  const ModelBundle& models() const override { return bundle_; }
  const TokenizeStrategy& tokenize_strategy() const override { return tokenize_; }
  const TextEncodingStrategy& text_encoding_strategy() const override { return encode_; }
  const LatentsCachingStrategy& latents_caching_strategy() const override { return latents_; }
  const TextEncoderOutputsCachingStrategy& text_encoder_outputs_caching_strategy() const override { return outputs_; }
  at::Tensor sample(const SampleOptions& options) const override;
  // kohya's save_stable_diffusion_checkpoint: the LDM single-file layout (SD 2.x with OpenCLIP's names).
  void save_checkpoint(const std::string& path, std::optional<at::ScalarType> dtype,
                       const safetensors::Metadata& metadata) const override;

  std::string name() const override { return "sd"; }
  std::unique_ptr<TrainingObjective> make_objective(const TrainArgs& args) const override;  // DdpmObjective
  at::Tensor predict(const NoisedBatch& batch, const Conditioning& conditioning) const override;
  // train_db.py: the U-Net at --learning_rate, the text encoder (unless --stop_text_encoder_training -1) at
  // --learning_rate_te or the same rate.
  std::vector<FullTrainingGroup> full_training_groups(const TrainArgs& args) const override;
  std::vector<NetworkTarget> network_targets(bool conv_blocks) const override;
  LoRANetworkConfig network_config(const TrainArgs& args) const override;
  ParallelPlan parallel_plan() const override;  // the U-Net's ResNets and Transformer2Ds; no block swap
  void set_block_runner(BlockRunner* runner) override;
  void set_gradient_checkpointing(bool on) override;
  safetensors::Metadata training_metadata() const override;
  ModelSpec model_spec() const override;  // stable-diffusion-v1, -v2-512, -v2-768-v
  std::string text_encoder_settings() const override;

 private:
  SdModels models_;
  bool v2_;
  ModelBundle bundle_;
  bool v_parameterization_;
  std::optional<int64_t> clip_skip_;
  std::optional<int> max_token_length_;
  SdTokenizeStrategy tokenize_;
  SdTextEncodingStrategy encode_;
  SdLatentsCachingStrategy latents_;
  SdTextEncoderOutputsCachingStrategy outputs_;
};

// The CLIP vocabulary with SD 1.x's padding (EOS) or, with options.v2, SD 2.x's ("!"): options.tokenizer (OpenAI's
// .txt.gz, or a folder with vocab.json and merges.txt), else a diffusers model's tokenizer/, else (a single-file
// checkpoint) the vocabulary the project ships, as kohya users never need to find one.
ClipTokenizer load_clip_tokenizer(const FamilyOptions& options);

// The registry's loader for "sd": the models from a single file (SD 1.x or, with options.v2, SD 2.x architecture)
// or a diffusers folder, the --vae replacement, and the CLIP tokenizer (options.tokenizer, or the model folder's
// tokenizer/).
std::unique_ptr<Family> load_sd_family(const FamilyOptions& options);

// Whether `checkpoint` is an SD 1.x/2.x model: an LDM single file (`model.diffusion_model.*` without SGM's
// `conditioner.*`), or a diffusers folder whose U-Net has no added conditioning (SDXL's text_time).
bool is_sd_checkpoint(const std::string& checkpoint);

}  // namespace sdt
