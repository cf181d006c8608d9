// FLUX.1 (dev, schnell) and Chroma as a family (kohya-ss/sd-scripts' strategy_flux.py and flux_train_network.py):
// CLIP-L's pooled output and T5-XXL's hidden states (with its attention mask), the 16-channel autoencoder's latents
// shifted and scaled, and the transformer on 2x2-packed latents, trained by flow matching with dev's embedded guidance.
// Its double and single blocks are two stacks the block engine can shard and swap (--blocks_to_swap k: k / 2 double
// blocks and 2 (k - k / 2) single blocks, kohya's split).
#pragma once

#include <memory>
#include <optional>
#include <string>

#include "src/families/family.h"
#include "src/families/flux/flux_network.h"
#include "src/families/sd/sd_family.h"
#include "src/models/flux_checkpoint.h"
#include "src/tokenizers/clip_tokenizer.h"
#include "src/tokenizers/t5_tokenizer.h"

namespace sdt {

// kohya's FluxTokenizeStrategy: CLIP-L's ids (B, 1, 77) (one window, EOS padding), T5's ids (B, L) and T5's attention
// mask (B, L) (int64 1/0), L = t5xxl_max_token_length. Weighted captions are refused, as kohya's FLUX strategy has none.
class FluxTokenizeStrategy : public TokenizeStrategy {
 public:
  FluxTokenizeStrategy(const ClipTokenizer& clip, T5Tokenizer t5, int64_t t5_max_length);
  Tokens tokenize(const std::vector<std::string>& captions, bool weighted) const override;

 private:
  SdTokenizeStrategy clip_;
  T5Tokenizer t5_;
  int64_t t5_max_length_;
};

// kohya's FluxTextEncodingStrategy: "l_pooled" (B, 768), CLIP-L's pooled output (zeros for Chroma, which has no
// CLIP-L); "t5_out" (B, L, 4096), T5's last hidden states, the padding masked in T5 with --apply_t5_attn_mask;
// "txt_ids" (B, L, 3) zeros; "t5_attn_mask" (B, L).
class FluxTextEncodingStrategy : public TextEncodingStrategy {
 public:
  FluxTextEncodingStrategy(ClipTextModel clip_l, T5EncoderModel t5, int64_t pooled_dim, bool apply_t5_attn_mask);
  Conditioning encode(const Tokens& tokens) const override;
  // CLIP-L (0) alone gives "l_pooled" while T5's outputs come from a cache (kohya: a trained CLIP-L with cached
  // text-encoder outputs); T5 (1) does not (kohya refuses the cache when T5 trains).
  bool encodes_alone(const std::set<int>& encoders) const override;
  Conditioning encode_alone(const Tokens& tokens, const std::set<int>& encoders) const override;

 private:
  ClipTextModel clip_l_;
  T5EncoderModel t5_;
  int64_t pooled_dim_;
  bool apply_t5_attn_mask_;
};

class FluxFamily : public Family {
 public:
  FluxFamily(FluxModels models, const ClipTokenizer& clip_tokenizer, T5Tokenizer t5_tokenizer, const FamilyOptions& options);
  FluxFamily(const FluxFamily&) = delete;  // outputs_ refers to tokenize_ and encode_
  FluxFamily& operator=(const FluxFamily&) = delete;
  const ModelBundle& models() const override { return bundle_; }
  const TokenizeStrategy& tokenize_strategy() const override { return tokenize_; }
  const TextEncodingStrategy& text_encoding_strategy() const override { return encode_; }
  const LatentsCachingStrategy& latents_caching_strategy() const override { return latents_; }
  const TextEncoderOutputsCachingStrategy& text_encoder_outputs_caching_strategy() const override { return outputs_; }
  // kohya's FLUX sample images (flux_train_utils.sample_image_inference): packed noise, the schedule shifted by the
  // image's token count, Euler steps with the embedded guidance, classifier-free guidance when the scale is not 1.
  at::Tensor sample(const SampleOptions& options) const override;
  // flux_train.py's output: the transformer in BFL's single file.
  void save_checkpoint(const std::string& path, std::optional<at::ScalarType> dtype,
                       const safetensors::Metadata& metadata) const override;
  // CLIP-L and T5, each a file of its own (--clip_l, --t5xxl).
  std::vector<std::string> separate_text_encoders() const override { return {"clip_l", "t5xxl"}; }
  void save_text_encoder(const std::string& name, const std::string& path, std::optional<at::ScalarType> dtype) const override;

  std::string name() const override { return "flux"; }
  std::unique_ptr<TrainingObjective> make_objective(const TrainArgs& args) const override;  // FlowMatchingObjective
  // kohya's get_noise_pred_and_target: the noised latents packed, the image ids, timesteps / 1000, the guidance vector,
  // T5's mask with --apply_t5_attn_mask; the prediction unpacked.
  at::Tensor predict(const NoisedBatch& batch, const Conditioning& conditioning) const override;
  // flux_train.py trains the transformer at --learning_rate (the text encoders stay frozen, as there).
  std::vector<FullTrainingGroup> full_training_groups(const TrainArgs& args) const override;
  // lora_flux's possible modules (flux_network_targets), and its arguments choosing among them (flux_network_config).
  std::vector<NetworkTarget> network_targets(bool conv_blocks) const override;
  LoRANetworkConfig network_config(const TrainArgs& args) const override;
  ParallelPlan parallel_plan() const override;
  void set_block_runner(BlockRunner* runner) override;
  void set_gradient_checkpointing(bool on) override;
  safetensors::Metadata training_metadata() const override;  // ss_base_model_version flux1 / chroma
  ModelSpec model_spec() const override;                      // flux-1-dev, flux-1-schnell, chroma
  std::string text_encoder_settings() const override;

 private:
  // dev, schnell or chroma: the kind of transformer, for names and defaults.
  std::string variant() const;

  FluxModels models_;
  ModelBundle bundle_;
  int64_t t5_max_length_;
  bool apply_t5_attn_mask_;
  double guidance_scale_;
  FluxTokenizeStrategy tokenize_;
  FluxTextEncodingStrategy encode_;
  SdLatentsCachingStrategy latents_;
  SdTextEncoderOutputsCachingStrategy outputs_;
};

// The registry's loader for "flux": the transformer (--pretrained_model_name_or_path), --clip_l (not for Chroma),
// --t5xxl and --ae, each required as kohya requires them; --model_type chroma must match the transformer. The CLIP
// vocabulary from --tokenizer or the one the project ships; T5's the project ships.
std::unique_ptr<Family> load_flux_family(const FamilyOptions& options);

}  // namespace sdt
