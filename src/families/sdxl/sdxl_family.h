// SDXL as a family (kohya-ss/sd-scripts' strategy_sdxl.py and sdxl_train_network.py): two CLIP tokenizers with
// kohya's 77-token windows, CLIP ViT-L/14's penultimate hidden states beside OpenCLIP ViT-bigG/14's and its pooled,
// projected output, the VAE's latents times 0.13025, and the SGM U-Net conditioned on the text states, the pooled
// vector and the size conditioning (original size, crop, target size).
#pragma once

#include <memory>
#include <optional>
#include <string>

#include "src/families/family.h"
#include "src/families/sd/sd_family.h"
#include "src/models/sdxl_checkpoint.h"
#include "src/tokenizers/clip_tokenizer.h"

namespace sdt {

// kohya's networks/lora.py on SDXL: the layers of sd_network_targets, named by the SGM layout kohya's SDXL U-Net has
// (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`) in its creation order, with SDXL's block indices
// (input_blocks.n: 1 + n, middle_block.n: 10 + n, output_blocks.n: 13 + n); the text encoders' as `lora_te1_` and
// `lora_te2_`. Any model may be null.
std::vector<NetworkTarget> sdxl_network_targets(ClipTextModel text_encoder1, ClipTextModel text_encoder2,
                                                UNet2DConditionModel unet, bool conv_blocks);

// kohya's SdxlTokenizeStrategy: the same CLIP vocabulary twice, padding with EOS for the first encoder and with id 0
// for the second (kohya's tokenizer2.pad_token_id = 0), each (B, n, 77) in SD's windows.
class SdxlTokenizeStrategy : public TokenizeStrategy {
 public:
  SdxlTokenizeStrategy(const ClipTokenizer& tokenizer, std::optional<int> max_token_length);
  Tokens tokenize(const std::vector<std::string>& captions, bool weighted) const override;
  const ClipTokenizer& tokenizer1() const { return first_.tokenizer(); }
  const ClipTokenizer& tokenizer2() const { return second_.tokenizer(); }

 private:
  SdTokenizeStrategy first_, second_;
};

// kohya's SdxlTextEncodingStrategy: "hidden_state1", the first encoder's hidden_states[11] (its penultimate layer,
// without the final layer norm), "hidden_state2", the second's penultimate layer, both stitched to (B, 2 + 75n, D) as
// SD's, and "pool2", the second's final-normed state at the first EOS of its first window through text_projection
// (B, P). Caption weights multiply both hidden states (not pool2), as kohya's cache does.
class SdxlTextEncodingStrategy : public TextEncodingStrategy {
 public:
  SdxlTextEncodingStrategy(ClipTextModel text_encoder1, ClipTextModel text_encoder2, int64_t eos_id);
  Conditioning encode(const Tokens& tokens) const override;

 private:
  ClipTextModel text_encoder1_, text_encoder2_;
  int64_t eos_id_;
};

class SdxlFamily : public Family {
 public:
  SdxlFamily(SdxlModels models, const ClipTokenizer& tokenizer, const FamilyOptions& options);
  SdxlFamily(const SdxlFamily&) = delete;  // outputs_ refers to tokenize_ and encode_
  SdxlFamily& operator=(const SdxlFamily&) = delete;
  const ModelBundle& models() const override { return bundle_; }
  const TokenizeStrategy& tokenize_strategy() const override { return tokenize_; }
  const TextEncodingStrategy& text_encoding_strategy() const override { return encode_; }
  const LatentsCachingStrategy& latents_caching_strategy() const override { return latents_; }
  const TextEncoderOutputsCachingStrategy& text_encoder_outputs_caching_strategy() const override { return outputs_; }
  at::Tensor sample(const SampleOptions& options) const override;
  // kohya's sdxl_model_util.save_stable_diffusion_checkpoint: the SGM single file.
  void save_checkpoint(const std::string& path, std::optional<at::ScalarType> dtype,
                       const safetensors::Metadata& metadata) const override;

  std::string name() const override { return "sdxl"; }
  std::unique_ptr<TrainingObjective> make_objective(const TrainArgs& args) const override;  // DdpmObjective
  at::Tensor predict(const NoisedBatch& batch, const Conditioning& conditioning) const override;
  // "size_ids" (B, 6) float32: original height and width, crop top and left, target height and width.
  Conditioning image_conditioning(const std::vector<ImageGeometry>& images) const override;
  // sdxl_train.py: the U-Net at --learning_rate (0: frozen) or, with --block_lr, each of its 23 blocks at its rate
  // (0: frozen); with --train_text_encoder each encoder at --learning_rate_te1 / --learning_rate_te2 (default
  // --learning_rate; 0: frozen).
  std::vector<FullTrainingGroup> full_training_groups(const TrainArgs& args) const override;
  std::vector<NetworkTarget> network_targets(bool conv_blocks) const override;
  LoRANetworkConfig network_config(const TrainArgs& args) const override;
  ParallelPlan parallel_plan() const override;  // the U-Net's ResNets and Transformer2Ds; no block swap
  void set_block_runner(BlockRunner* runner) override;
  void set_gradient_checkpointing(bool on) override;
  safetensors::Metadata training_metadata() const override;
  ModelSpec model_spec() const override;  // stable-diffusion-xl-v1-base
  std::string text_encoder_settings() const override;

 private:
  SdxlModels models_;
  ModelBundle bundle_;
  bool v_parameterization_;
  bool projection_as_kohya_;
  std::optional<int> max_token_length_;
  SdxlTokenizeStrategy tokenize_;
  SdxlTextEncodingStrategy encode_;
  SdLatentsCachingStrategy latents_;
  SdTextEncoderOutputsCachingStrategy outputs_;
};

// The registry's loader for "sdxl": the models from an SGM single file (SDXL base's architecture) or a diffusers
// folder, the --vae replacement, and the CLIP vocabulary (options.tokenizer, the folder's tokenizer/, or the one the
// project ships). --v2 is an error and --clip_skip is ignored with a warning, as kohya's verify_sdxl_training_args.
std::unique_ptr<Family> load_sdxl_family(const FamilyOptions& options);

}  // namespace sdt
