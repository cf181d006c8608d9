// FLUX.1 / Chroma strategies and the family that loads their models.
#include "src/families/flux/flux_family.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <random>

#include <ATen/CPUGeneratorImpl.h>
#include <spdlog/spdlog.h>

#include "src/core/error.h"
#include "src/objectives/flow_matching.h"

namespace sdt {
namespace fs = std::filesystem;

// ---------------------------------------------------------------- tokenize

FluxTokenizeStrategy::FluxTokenizeStrategy(const ClipTokenizer& clip, T5Tokenizer t5, int64_t t5_max_length)
    : clip_(clip, std::nullopt), t5_(std::move(t5)), t5_max_length_(t5_max_length) {}

Tokens FluxTokenizeStrategy::tokenize(const std::vector<std::string>& captions, bool weighted) const {
  if (weighted) fail("--weighted_captions", "FLUX has no weighted captions (kohya's FluxTokenizeStrategy has none)");
  Tokens tokens = clip_.tokenize(captions, false);  // (B, 1, 77)
  const auto batch = static_cast<int64_t>(captions.size());
  at::Tensor ids = at::empty({batch, t5_max_length_}, at::kLong), mask = at::empty({batch, t5_max_length_}, at::kLong);
  for (int64_t i = 0; i < batch; ++i) {
    const T5Tokenizer::Tokens t = t5_.tokenize(captions[static_cast<size_t>(i)], t5_max_length_);
    ids[i].copy_(at::tensor(t.ids, at::kLong));
    mask[i].copy_(at::tensor(t.mask, at::kLong));
  }
  tokens.ids.push_back(ids);
  tokens.ids.push_back(mask);
  return tokens;
}

// ---------------------------------------------------------------- text encoding

FluxTextEncodingStrategy::FluxTextEncodingStrategy(ClipTextModel clip_l, T5EncoderModel t5, int64_t pooled_dim, bool apply_t5_attn_mask)
    : clip_l_(std::move(clip_l)), t5_(std::move(t5)), pooled_dim_(pooled_dim), apply_t5_attn_mask_(apply_t5_attn_mask) {}

Conditioning FluxTextEncodingStrategy::encode(const Tokens& tokens) const {
  if (tokens.ids.size() != 3) fail("FLUX text encoding", "expected CLIP-L's ids, T5's ids and T5's mask, got {} tensors", tokens.ids.size());
  T5EncoderModel t5 = t5_;
  const c10::Device device = module_device(*t5);
  const at::Tensor t5_ids = tokens.ids[1].to(device), mask = tokens.ids[2].to(device);
  const at::Tensor t5_out = t5->forward(t5_ids, apply_t5_attn_mask_ ? mask : at::Tensor());
  at::Tensor pooled;
  if (clip_l_) {
    ClipTextModel clip = clip_l_;
    pooled = clip->forward(tokens.ids[0].flatten(0, 1).to(module_device(*clip))).pooled;  // (B, 768)
  } else {
    pooled = at::zeros({t5_ids.size(0), pooled_dim_}, t5_out.options());  // kohya's dummy CLIP-L for Chroma
  }
  const at::Tensor txt_ids = at::zeros({t5_out.size(0), t5_out.size(1), 3}, t5_out.options());
  return {{"l_pooled", pooled}, {"t5_out", t5_out}, {"txt_ids", txt_ids}, {"t5_attn_mask", mask}};
}

bool FluxTextEncodingStrategy::encodes_alone(const std::set<int>& encoders) const {
  return clip_l_ && encoders == std::set<int>{0};
}

Conditioning FluxTextEncodingStrategy::encode_alone(const Tokens& tokens, const std::set<int>& encoders) const {
  if (!encodes_alone(encoders)) return TextEncodingStrategy::encode_alone(tokens, encoders);  // its named error
  ClipTextModel clip = clip_l_;
  return {{"l_pooled", clip->forward(tokens.ids.at(0).flatten(0, 1).to(module_device(*clip))).pooled}};
}

// ---------------------------------------------------------------- the family

namespace {

// kohya's --t5xxl_max_token_length default: 256 for schnell, 512 for dev (and Chroma).
int64_t t5_max_length(const FluxModels& models, const FamilyOptions& options) {
  if (options.t5xxl_max_token_length) return *options.t5xxl_max_token_length;
  return models.transformer->config.guidance_embed || models.transformer->config.chroma ? 512 : 256;
}

}  // namespace

FluxFamily::FluxFamily(FluxModels models, const ClipTokenizer& clip_tokenizer, T5Tokenizer t5_tokenizer, const FamilyOptions& options)
    : models_(std::move(models)),
      bundle_{models_.transformer.ptr(), models_.ae.ptr(), {}},
      t5_max_length_(t5_max_length(models_, options)),
      apply_t5_attn_mask_(options.apply_t5_attn_mask),
      guidance_scale_(options.guidance_scale),
      tokenize_(clip_tokenizer, std::move(t5_tokenizer), t5_max_length_),
      encode_(models_.clip_l, models_.t5xxl, models_.transformer->config.vec_in_dim, options.apply_t5_attn_mask),
      latents_(models_.ae, models_.ae->config.scaling_factor, "_flux", models_.ae->config.shift_factor, /*resolution_in_keys=*/true),
      outputs_(tokenize_, encode_, "_flux_te", {"l_pooled", "t5_out", "txt_ids", "t5_attn_mask"}) {
  if (models_.clip_l) bundle_.text_encoders.push_back(models_.clip_l.ptr());
  bundle_.text_encoders.push_back(models_.t5xxl.ptr());
}

std::string FluxFamily::variant() const {
  const FluxConfig& c = models_.transformer->config;
  return c.chroma ? "chroma" : c.guidance_embed ? "dev" : "schnell";
}

namespace {

// The transformer's prediction for packed latents (B, C, h, w) at t in [0, 1].
at::Tensor flux_forward(FluxTransformer transformer, const at::Tensor& latents, const at::Tensor& t, const Conditioning& conditioning,
                        double guidance, bool apply_t5_attn_mask) {
  const int64_t batch = latents.size(0), rows = latents.size(2) / 2, cols = latents.size(3) / 2;
  const at::Tensor img = pack_latents(latents);
  const at::Tensor img_ids = flux_image_ids(batch, rows, cols).to(img.device());
  const at::Tensor guidance_vec = at::full({batch}, guidance, img.options());
  const at::Tensor mask = apply_t5_attn_mask ? conditioning_tensor(conditioning, "t5_attn_mask") : at::Tensor();
  const at::Tensor out = transformer->forward(img, img_ids, conditioning_tensor(conditioning, "t5_out"),
                                              conditioning_tensor(conditioning, "txt_ids"), t, conditioning_tensor(conditioning, "l_pooled"),
                                              transformer->config.guidance_embed || transformer->config.chroma ? guidance_vec : at::Tensor(),
                                              mask);
  return unpack_latents(out, rows, cols);
}

// kohya's get_schedule: num_steps + 1 times from 1 to 0 (fp32), shifted by the image's token count (mu linear from
// 0.5 at 256 tokens to 1.15 at 4096), computed in fp32 tensors as there.
std::vector<double> flux_schedule(int steps, int64_t tokens) {
  const double m = (1.15 - 0.5) / (4096.0 - 256.0), b = 0.5 - m * 256.0, mu = m * static_cast<double>(tokens) + b;
  const at::Tensor t = at::linspace(1, 0, steps + 1, at::kFloat);
  const at::Tensor shifted = std::exp(mu) / (std::exp(mu) + at::pow(1 / t - 1, 1.0));
  std::vector<double> times;
  for (int64_t i = 0; i <= steps; ++i) times.push_back(shifted[i].item<float>());
  return times;
}

}  // namespace

at::Tensor FluxFamily::sample(const SampleOptions& options) const {
  torch::NoGradGuard no_grad;
  FluxTransformer transformer = models_.transformer;
  AutoencoderKL ae = models_.ae;
  // kohya: sides rounded down to a multiple of 16 (8 for the autoencoder, 2 for the packing), at least 64.
  const int64_t unit = 2 * ae->downscale_factor();
  const int64_t height = std::max<int64_t>(64, options.height - options.height % unit);
  const int64_t width = std::max<int64_t>(64, options.width - options.width % unit);
  const int steps = options.steps.value_or(20);
  const double cfg = options.scale.value_or(1.0), guidance = options.guidance_scale.value_or(3.5);
  const uint64_t seed = options.seed ? *options.seed : std::random_device{}();
  spdlog::info("sampling {}x{}, {} Euler steps, embedded guidance {}, classifier-free guidance {}, seed {}", width, height,
               steps, guidance, cfg, seed);
  const Conditioning cond = encode_.encode(tokenize_.tokenize({options.prompt}, false));
  const Conditioning uncond = cfg != 1.0 ? encode_.encode(tokenize_.tokenize({options.negative_prompt}, false)) : Conditioning{};

  const int64_t rows = height / unit, cols = width / unit;
  at::Generator generator = at::make_generator<at::CPUGeneratorImpl>(seed);
  const at::Tensor noise = randn_from_host({1, rows * cols, transformer->config.in_channels}, generator,
                                           conditioning_tensor(cond, "t5_out").options());
  at::Tensor x = unpack_latents(noise, rows, cols);
  const std::vector<double> times = flux_schedule(steps, rows * cols);
  for (int i = 0; i < steps; ++i) {
    const at::Tensor t = at::full({1}, times[i], x.options());
    at::Tensor pred = flux_forward(transformer, x, t, cond, guidance, apply_t5_attn_mask_);
    if (cfg != 1.0) {
      const at::Tensor negative = flux_forward(transformer, x, t, uncond, guidance, apply_t5_attn_mask_);
      pred = negative + (pred - negative) * cfg;
    }
    x = x + (times[i + 1] - times[i]) * pred;
  }
  const at::Tensor image = ae->decode(x / ae->config.scaling_factor + ae->config.shift_factor).clamp(-1, 1);
  // kohya: 127.5 (x + 1), truncated to uint8.
  return (127.5 * (image[0].permute({1, 2, 0}).to(at::kFloat) + 1.0)).to(at::kByte).cpu().contiguous();
}

void FluxFamily::save_checkpoint(const std::string& path, std::optional<at::ScalarType> dtype,
                                 const safetensors::Metadata& metadata) const {
  save_flux_transformer(path, models_.transformer, dtype, metadata);
}

void FluxFamily::save_text_encoder(const std::string& name, const std::string& path, std::optional<at::ScalarType> dtype) const {
  if (name == "t5xxl") return save_t5_encoder(path, models_.t5xxl, dtype);
  if (name != "clip_l") return Family::save_text_encoder(name, path, dtype);  // its named error
  if (!models_.clip_l) fail("--clip_l_save_to", "Chroma has no CLIP-L");
  save_flux_clip_l(path, models_.clip_l, dtype);
}

std::unique_ptr<TrainingObjective> FluxFamily::make_objective(const TrainArgs& args) const {
  return std::make_unique<FlowMatchingObjective>(flow_matching_options_from_args(args));
}

at::Tensor FluxFamily::predict(const NoisedBatch& batch, const Conditioning& conditioning) const {
  return flux_forward(models_.transformer, batch.model_input, batch.timesteps / 1000.0, conditioning, guidance_scale_, apply_t5_attn_mask_);
}

std::vector<FullTrainingGroup> FluxFamily::full_training_groups(const TrainArgs& args) const {
  if (args.train_text_encoder) fail("--train_text_encoder", "flux_train.py trains the transformer only; its text encoders stay frozen");
  if (args.learning_rate == 0) return {};
  return {{.prefix = "unet.", .model = models_.transformer.ptr(), .lr = args.learning_rate}};
}

std::vector<NetworkTarget> FluxFamily::network_targets(bool) const {
  return flux_network_targets(models_.clip_l, models_.t5xxl, models_.transformer);
}

LoRANetworkConfig FluxFamily::network_config(const TrainArgs& args) const {
  return flux_network_config(args, models_.transformer->config);
}

// The double blocks then the single blocks, two stacks that swap as kohya's Flux.enable_block_swap splits them; each
// keeps two blocks on the device, as kohya asserts. Blocks built without weights are read from the transformer's file.
ParallelPlan FluxFamily::parallel_plan() const {
  const size_t doubles = models_.transformer->double_blocks->size(), singles = models_.transformer->single_blocks->size();
  ParallelPlan plan{.blocks = models_.transformer->blocks(), .swap = [doubles, singles](int64_t k) {
            const int64_t double_swapped = k / 2, single_swapped = (k - k / 2) * 2;
            if (double_swapped > static_cast<int64_t>(doubles) - 2 || single_swapped > static_cast<int64_t>(singles) - 2) {
              fail("--blocks_to_swap", "{} swaps {} double and {} single blocks; this model has {} and {}, and keeps two of "
                   "each on the device (at most {})", k, double_swapped, single_swapped, doubles, singles,
                   std::max<int64_t>(0, std::min<int64_t>(2 * (static_cast<int64_t>(doubles) - 2) + 1,
                                                          (static_cast<int64_t>(singles) - 2) / 2 * 2)));
            }
            return std::vector<SwapStack>{{0, doubles, double_swapped}, {doubles, singles, single_swapped}};
          }};
  if (models_.deferred_blocks) {
    // In the dtype the rest was read in, so each weight is rounded as it would have been on its way to the block.
    plan.deferred_weights = [file = models_.deferred_blocks, dtype = models_.dtype, doubles](int64_t b, const std::string& name) {
      const size_t i = static_cast<size_t>(b);
      const std::string block = i < doubles ? fmt::format("double_blocks.{}.", i) : fmt::format("single_blocks.{}.", i - doubles);
      return file->read(block + name, dtype);
    };
  }
  return plan;
}

void FluxFamily::set_block_runner(BlockRunner* runner) { models_.transformer->block_runner = runner; }

void FluxFamily::set_gradient_checkpointing(bool on) { models_.transformer->gradient_checkpointing = on; }

safetensors::Metadata FluxFamily::training_metadata() const {
  return {{"ss_base_model_version", models_.transformer->config.chroma ? "chroma" : "flux1"}};
}

ModelSpec FluxFamily::model_spec() const {
  ModelSpec spec;
  const std::string v = variant();
  spec.architecture = v == "chroma" ? "chroma" : "flux-1-" + v;
  spec.lora_implementation = v == "chroma" ? "https://huggingface.co/lodestones/Chroma" : "https://github.com/black-forest-labs/flux";
  spec.checkpoint_implementation = spec.lora_implementation;
  spec.native_resolution = 1024;
  return spec;
}

std::string FluxFamily::text_encoder_settings() const {
  return fmt::format("flux {} t5xxl_max_token_length={} apply_t5_attn_mask={}", variant(), t5_max_length_, apply_t5_attn_mask_);
}

std::unique_ptr<Family> load_flux_family(const FamilyOptions& options) {
  const std::string& path = options.pretrained_model_name_or_path;
  if (options.model_type != "flux" && options.model_type != "chroma") fail("--model_type", "'{}' is not flux or chroma", options.model_type);
  const bool chroma = options.model_type == "chroma";
  if (!options.t5xxl) fail("--t5xxl", "required: the T5-XXL text encoder's file (kohya's flux_train_network.py needs it too)");
  if (!options.ae) fail("--ae", "required: FLUX's autoencoder file (ae.safetensors)");
  if (!chroma && !options.clip_l) fail("--clip_l", "required: the CLIP-L text encoder's file (not for --model_type chroma)");
  if (chroma && !options.apply_t5_attn_mask) fail("--apply_t5_attn_mask", "required for Chroma, as in kohya");
  if (options.v2 || options.v_parameterization) fail(options.v2 ? "--v2" : "--v_parameterization", "is SD 2.x's, not FLUX's");

  FluxModels models;
  models.dtype = weights_dtype(options);
  const auto transformer_file = std::make_shared<const FluxTransformerFile>(path);
  models.transformer = load_flux_transformer(*transformer_file, models.dtype,
                                             options.defer_block_weights ? BlockWeights::deferred : BlockWeights::allocated);
  if (options.defer_block_weights) models.deferred_blocks = transformer_file;
  const at::ScalarType dtype = models.dtype;
  if (models.transformer->config.chroma != chroma) {
    fail("--model_type", "'{}', but {} holds a {} transformer", options.model_type, path, models.transformer->config.chroma ? "Chroma" : "FLUX.1");
  }
  if (!chroma) models.clip_l = load_flux_clip_l(*options.clip_l, dtype);
  models.t5xxl = load_t5_encoder(*options.t5xxl, dtype);
  models.ae = load_flux_autoencoder(*options.ae, dtype);
  const FluxConfig& c = models.transformer->config;
  if (models.t5xxl->config.d_model != c.context_in_dim) {
    fail("--t5xxl", "the encoder is {} wide, the transformer takes {}", models.t5xxl->config.d_model, c.context_in_dim);
  }
  if (models.clip_l && models.clip_l->config.hidden_size != c.vec_in_dim) {
    fail("--clip_l", "the encoder is {} wide, the transformer's vector input {}", models.clip_l->config.hidden_size, c.vec_in_dim);
  }
  if (models.ae->config.latent_channels * 4 != c.in_channels) {
    fail("--ae", "{} latent channels packed 2x2 make {}, the transformer takes {}", models.ae->config.latent_channels,
         models.ae->config.latent_channels * 4, c.in_channels);
  }
  FamilyOptions clip_options = options;
  clip_options.pretrained_model_name_or_path = options.clip_l.value_or(path);
  const ClipTokenizer clip_tokenizer = load_clip_tokenizer(clip_options);
  spdlog::info("FLUX {}: {} double and {} single blocks, {} wide; T5 {} tokens", chroma ? "Chroma" : c.guidance_embed ? "dev" : "schnell",
               c.depth, c.depth_single_blocks, c.hidden_size, options.t5xxl_max_token_length.value_or(c.guidance_embed || chroma ? 512 : 256));
  return std::make_unique<FluxFamily>(std::move(models), clip_tokenizer, T5Tokenizer(T5Tokenizer::bundled_model()), options);
}

}  // namespace sdt
