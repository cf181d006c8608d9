// A model family: its models, the four strategies through which the trainer, the caches and the sampler use them
// (kohya-ss/sd-scripts' strategy_base.py), and its training hooks (what kohya's per-family NetworkTrainer subclasses
// override), found by name in a registry. Nothing above this layer branches on a family's name: it asks the family.
//
//   TokenizeStrategy                   captions -> token ids (and per-token weights for "(word:1.2)" captions)
//   TextEncodingStrategy               token ids -> the denoiser's text conditioning
//   LatentsCachingStrategy             images -> the denoiser's latents, and what a cache entry holds
//   TextEncoderOutputsCachingStrategy  captions -> the text-encoder outputs a cache stores, and back
//   training hooks                     the objective, the denoiser call, the network targets, the parallel plan,
//                                      the training metadata, the text-encoder cache's settings
#pragma once

#include <functional>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include <torch/torch.h>

#include "src/core/tensor_io.h"
#include "src/core/train_args.h"
#include "src/families/options.h"
#include "src/models/layers.h"
#include "src/networks/lora.h"
#include "src/networks/network_target.h"
#include "src/objectives/objective.h"

namespace sdt {

// A batch of captions as token ids, one tensor per tokenizer the family has (SD: one, (B, n, 77) int64 with n
// 77-token windows), and, for weighted captions, per-token weights of the same shapes (float32).
struct Tokens {
  std::vector<at::Tensor> ids;
  std::vector<at::Tensor> weights;  // empty: unweighted
};

class TokenizeStrategy {
 public:
  virtual ~TokenizeStrategy() = default;
  // kohya's tokenize; with `weighted` (--weighted_captions) its tokenize_with_weights, which reads the attention
  // syntax "(word:1.2)", "(word)", "[word]" and returns the weights.
  virtual Tokens tokenize(const std::vector<std::string>& captions, bool weighted) const = 0;
};

// The denoiser's conditioning by name, batch first, as the text-encoder caches store it (SD: "hidden_state"; a FLUX-style
// family adds a pooled vector), and what Family::image_conditioning adds (SDXL: "size_ids").
using Conditioning = NamedTensors;

// Where one image of a batch came from, as kohya's dataset reports it (original_sizes_hw, crop_top_lefts,
// target_sizes_hw, whole pixels): what SDXL's size conditioning embeds.
struct ImageGeometry {
  int64_t original_height = 0, original_width = 0;  // the image before resizing
  int64_t crop_top = 0, crop_left = 0;              // the crop of the resized image (left mirrored for a flipped one)
  int64_t target_height = 0, target_width = 0;      // the bucket
};
// The tensor called `name`; sdt::Error naming what there is when it is missing.
const at::Tensor& conditioning_tensor(const Conditioning& conditioning, std::string_view name);

class TextEncodingStrategy {
 public:
  virtual ~TextEncodingStrategy() = default;
  // The denoiser's text conditioning (SD: "hidden_state", the hidden states (B, 2 + 75n, D)). Weights, when the tokens
  // carry them, multiply the hidden states token by token.
  virtual Conditioning encode(const Tokens& tokens) const = 0;
  // kohya's partial text-encoder cache: whether the text encoders in `encoders` (NetworkTarget::text_encoder indices)
  // give their part of the conditioning alone while the others' comes from a cache (FLUX: CLIP-L's "l_pooled" beside
  // cached T5 outputs). None by default: the cache is refused while a text encoder trains.
  virtual bool encodes_alone(const std::set<int>& encoders) const;
  // That part, from the same tokens as encode (for the names it returns, it replaces the cached tensors).
  virtual Conditioning encode_alone(const Tokens& tokens, const std::set<int>& encoders) const;
};

// How latents come out of the VAE's posterior: its mean (deterministic), or a sample drawn from it (kohya).
enum class LatentSampling { mean, sample };

// Latents of a batch of images, ready for the denoiser (scaled as it takes them).
struct EncodedLatents {
  at::Tensor latents;  // (B, C, h, w)
  at::Tensor flipped;  // the same images flipped left to right; undefined without flip_aug
};

// The arrays a cache entry holds for one image of a bucket, and their shape.
struct LatentsCacheLayout {
  std::string latents_key;       // kohya's npz key: "latents" (multi-resolution families add "_{h}x{w}")
  std::string flipped_key;       // "latents_flipped"; empty without flip_aug
  std::vector<int64_t> shape;    // (C, h, w) of each
};

class LatentsCachingStrategy {
 public:
  virtual ~LatentsCachingStrategy() = default;
  // What distinguishes this family's cache files beside an image from other families' (kohya: "_sd" in "_sd.npz").
  virtual std::string cache_suffix() const = 0;
  // kohya's is_disk_cached_latents_expected, as data: the keys an entry for an image in a bucket of
  // bucket_width x bucket_height pixels must hold, and the latents' shape.
  virtual LatentsCacheLayout cache_layout(int64_t bucket_width, int64_t bucket_height, bool flip_aug) const = 0;
  // images (B, 3, H, W) in [-1, 1] -> latents; with flip_aug also those of the images flipped left to right. A
  // `sample` draws its noise from `generator` (the default generator when none).
  virtual EncodedLatents encode(const at::Tensor& images, bool flip_aug, LatentSampling sampling,
                                std::optional<at::Generator> generator = std::nullopt) const = 0;
};

class TextEncoderOutputsCachingStrategy {
 public:
  virtual ~TextEncoderOutputsCachingStrategy() = default;
  // What distinguishes this family's text-encoder cache files beside an image ("_sd_te").
  virtual std::string cache_suffix() const = 0;
  // What to store for a batch of captions, by name, batch first (SD: "hidden_state" (B, 2 + 75n, D)), computed by the
  // family's tokenize and text-encoding strategies.
  virtual NamedTensors outputs_to_cache(const std::vector<std::string>& captions, bool weighted) const = 0;
  // A stored batch back into TextEncodingStrategy::encode's conditioning (sdt::Error when a name is missing).
  virtual Conditioning outputs_from_cache(const NamedTensors& stored) const = 0;
};

// The models of a family by role: the trainer injects networks into them, switches them between training and
// evaluation and collects their parameters without knowing what they are.
struct ModelBundle {
  std::shared_ptr<torch::nn::Module> denoiser;
  std::shared_ptr<torch::nn::Module> vae;
  std::vector<std::shared_ptr<torch::nn::Module>> text_encoders;
};

// How a family's denoiser runs when its weights are not all resident, and what it can swap.
struct ParallelPlan {
  // The blocks a BlockRunner runs, in forward order (--sharding full gathers each as it runs, block swap moves them):
  // all weights but the stem and head.
  std::vector<std::shared_ptr<torch::nn::Module>> blocks;
  // Stacks of identical blocks among `blocks`, [first, first + count), and how many of each --blocks_to_swap k swaps:
  // the family's rule, kohya's for its scripts (FLUX splits k over its double and single blocks).
  std::function<std::vector<SwapStack>(int64_t blocks_to_swap)> swap;  // empty: --blocks_to_swap is refused
  std::string no_block_swap_reason;                                     // why, when `swap` is empty
  // Set when the family built its blocks without weights (FamilyOptions::defer_block_weights): block b's parameter
  // `name` (as the block names it) read whole from the checkpoint, a view of the mapped file where it can be.
  std::function<at::Tensor(int64_t block, const std::string& name)> deferred_weights;

  // The stacks --blocks_to_swap k moves blocks of (a stack the rule swaps none of is left out); an sdt::Error with
  // no_block_swap_reason when the family swaps nothing.
  std::vector<SwapStack> swapped(int64_t blocks_to_swap) const;
};

// One optimizer group of full fine-tuning: parameters of one of the family's models at one learning rate.
struct FullTrainingGroup {
  std::string prefix;                         // of the parameters' names in a resume state: "unet.", "text_encoder."
  std::shared_ptr<torch::nn::Module> model;
  std::vector<std::string> parameters;        // names in `model`; empty: all of its parameters
  double lr = 0;
  bool text_encoder = false;                  // stops training at --stop_text_encoder_training
};

// What a family writes into SAI model-spec metadata (kohya's library/sai_model_spec.py), which A1111, ComfyUI and model
// sites read: its architecture id ("/lora" is added for a LoRA), the implementation a LoRA and a checkpoint follow,
// what the denoiser predicts (none for the flow-matching families) and the resolution it was made for.
struct ModelSpec {
  std::string architecture;                                                         // "stable-diffusion-v1"
  std::string lora_implementation = "diffusers";
  std::string checkpoint_implementation = "https://github.com/Stability-AI/generative-models";
  std::optional<std::string> prediction_type;                                       // "epsilon" | "v"
  int native_resolution = 512;
};

class Family {
 public:
  virtual ~Family() = default;
  // The registry's name of the family ("sd"), which caches record.
  virtual std::string name() const = 0;
  virtual const ModelBundle& models() const = 0;
  virtual const TokenizeStrategy& tokenize_strategy() const = 0;
  virtual const TextEncodingStrategy& text_encoding_strategy() const = 0;
  virtual const LatentsCachingStrategy& latents_caching_strategy() const = 0;
  virtual const TextEncoderOutputsCachingStrategy& text_encoder_outputs_caching_strategy() const = 0;
  // Text to image, to check a checkpoint and for sample images while training: (H, W, 3) uint8 RGB.
  virtual at::Tensor sample(const SampleOptions& options) const = 0;
  // The whole model as the single file users load (full fine-tuning's output), in `dtype` or each weight's own.
  virtual void save_checkpoint(const std::string& path, std::optional<at::ScalarType> dtype,
                               const safetensors::Metadata& metadata) const = 0;
  // The text encoders kept in files of their own beside the checkpoint, by kohya's flag for each, at their
  // NetworkTarget::text_encoder index (FLUX: "clip_l", "t5xxl"); empty where the checkpoint holds them.
  virtual std::vector<std::string> separate_text_encoders() const { return {}; }
  // Writes the one called `name` as that flag reads it (an sdt::Error for a name not among them).
  virtual void save_text_encoder(const std::string& name, const std::string& path, std::optional<at::ScalarType> dtype) const;

  // ---- training hooks

  // The objective kohya's scripts for this family train with, from their arguments (SD: DDPM with the noise, timestep
  // and loss flags of train_network.py, --v_parameterization, --zero_terminal_snr). Argument errors are sdt::Errors.
  virtual std::unique_ptr<TrainingObjective> make_objective(const TrainArgs& args) const = 0;
  // The denoiser's prediction for a noised batch, given TextEncodingStrategy::encode's outputs for its captions.
  virtual at::Tensor predict(const NoisedBatch& batch, const Conditioning& conditioning) const = 0;
  // The conditioning the denoiser takes from where each image of a batch came from, besides its caption, batch first
  // (SDXL: "size_ids"); none by default.
  virtual Conditioning image_conditioning(const std::vector<ImageGeometry>& images) const;
  // What full fine-tuning trains, as the family's kohya script for it decides (SD: train_db.py; SDXL: sdxl_train.py):
  // a model, block or encoder in no group stays frozen. Arguments that script lacks, or bad values, are sdt::Errors.
  virtual std::vector<FullTrainingGroup> full_training_groups(const TrainArgs& args) const = 0;
  // The layers a network (LoRA) adapts, in kohya's creation order; the convolution blocks' too with `conv_blocks`.
  virtual std::vector<NetworkTarget> network_targets(bool conv_blocks) const = 0;
  // The network --network_module names for this family, configured from --network_dim, --network_alpha,
  // --network_dropout and --network_args as kohya's module for the family reads them (SD, SDXL: networks.lora with
  // the family's block layout; FLUX: networks.lora_flux). Bad or unknown arguments are sdt::Errors.
  virtual LoRANetworkConfig network_config(const TrainArgs& args) const = 0;
  virtual ParallelPlan parallel_plan() const = 0;
  // Runs the denoiser's blocks through `runner` (not owned; null: plain), or recomputes them in backward.
  virtual void set_block_runner(BlockRunner* runner) = 0;
  virtual void set_gradient_checkpointing(bool on) = 0;
  // What kohya's scripts write about the base model into a trained file (ss_v2, ss_base_model_version, ...).
  virtual safetensors::Metadata training_metadata() const = 0;
  virtual ModelSpec model_spec() const = 0;
  // The settings besides the weights that decide the text encoders' outputs, recorded in and checked against a
  // text-encoder-output cache ("v2=False clip_skip=2 max_token_length=225").
  virtual std::string text_encoder_settings() const = 0;
};

// A family's row in the registry: how to load it, and whether a checkpoint (a single file or a folder) is one of its
// models.
struct FamilyRow {
  std::unique_ptr<Family> (*load)(const FamilyOptions&);
  bool (*recognises)(const std::string& checkpoint);
};

// Adds a family to the registry at run time: a test's family (the product's are listed in family.cpp). A name taken
// already is an sdt::Error.
void register_family(const std::string& name, FamilyRow row);

// The names of the families this build has, sorted.
std::vector<std::string> family_names();

// options.weights_dtype as LibTorch's dtype.
at::ScalarType weights_dtype(const FamilyOptions& options);

// The family `sdt train` / `train_db` / the cache commands train with: --family or the checkpoint's, loaded from the
// model arguments.
std::unique_ptr<Family> load_family_for_training(const TrainArgs& args);

// The family registered as `name`, its models loaded as `options` say. An unknown name is an sdt::Error that lists
// the known ones.
std::unique_ptr<Family> load_family(const std::string& name, const FamilyOptions& options);

// (H, W, 3) uint8 RGB -> a PNG file, written to a temporary name and renamed.
void write_png(const std::string& path, const at::Tensor& image);

}  // namespace sdt
