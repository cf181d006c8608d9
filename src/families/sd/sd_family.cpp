// SD 1.x / 2.x strategies and the family that loads their models.
#include "src/families/sd/sd_family.h"

#include <algorithm>
#include <filesystem>
#include <utility>

#include "src/core/error.h"
#include "src/families/sd/sampling.h"
#include "src/tokenizers/kohya_prompt.h"

namespace sdt {
namespace fs = std::filesystem;

namespace {

constexpr int64_t kWindow = 75;  // text ids per 77-id window

// The CLIP vocabulary: OpenAI's .txt.gz, a folder with vocab.json and merges.txt, or a diffusers model's tokenizer/.
ClipTokenizer load_clip_tokenizer(const FamilyOptions& options) {
  const std::string_view pad_token = options.v2 ? ClipTokenizer::kSd2PadToken : ClipTokenizer::kSd1PadToken;
  fs::path path = options.tokenizer;
  if (path.empty()) {
    path = fs::path(options.pretrained_model_name_or_path) / "tokenizer";
    if (!fs::is_directory(path)) {
      fail("tokenizer", "no CLIP vocabulary given and {} does not exist: pass bpe_simple_vocab_16e6.txt.gz or a "
                        "folder with vocab.json and merges.txt", path.string());
    }
  }
  if (fs::is_directory(path)) {
    return ClipTokenizer::from_vocab_json_and_merges((path / "vocab.json").string(), (path / "merges.txt").string(),
                                                     pad_token);
  }
  return ClipTokenizer::from_bpe_vocab_gz(path.string(), pad_token);
}

}  // namespace

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

std::vector<at::Tensor> SdTextEncodingStrategy::encode(const Tokens& tokens) const {
  if (tokens.ids.size() != 1) fail("SD text encoding", "expected the ids of one tokenizer, got {}", tokens.ids.size());
  ClipTextModel text_encoder = text_encoder_;
  const at::Tensor& ids = tokens.ids[0];                                      // (B, n, 77)
  at::Tensor hidden = encode_prompt_chunks(text_encoder, ids, clip_skip_);   // (B, 2 + 75n, D); n = 1: (B, 77, D)
  if (tokens.weights.empty()) return {hidden};

  // encode_tokens_with_weights: one window's weights apply to all 77 positions; with several windows each window's
  // 75 text weights apply to its stretch of the stitched states, whose first and last positions keep weight 1.
  const at::Tensor weights = tokens.weights[0].to(hidden.scalar_type());  // (B, n, 77)
  const int64_t batch = weights.size(0), windows = weights.size(1);
  at::Tensor per_position = weights.select(1, 0);                         // (B, 77)
  if (windows > 1) {
    const at::Tensor one = at::ones({batch, 1}, weights.options());
    per_position = at::cat({one, weights.slice(2, 1, -1).reshape({batch, windows * kWindow}), one}, 1);  // (B, 2 + 75n)
  }
  return {hidden * per_position.unsqueeze(-1)};
}

// ---------------------------------------------------------------- latents

SdLatentsCachingStrategy::SdLatentsCachingStrategy(AutoencoderKL vae) : vae_(std::move(vae)) {}

LatentsCacheLayout SdLatentsCachingStrategy::cache_layout(int64_t bucket_width, int64_t bucket_height,
                                                          bool flip_aug) const {
  const int64_t factor = vae_->downscale_factor();
  if (bucket_width <= 0 || bucket_height <= 0 || bucket_width % factor != 0 || bucket_height % factor != 0) {
    fail("latent cache", "bucket {}x{}: expected positive sides that are multiples of the VAE's {} pixels per latent",
         bucket_width, bucket_height, factor);
  }
  return {"latents", flip_aug ? "latents_flipped" : "",
          {vae_->config.latent_channels, bucket_height / factor, bucket_width / factor}};
}

EncodedLatents SdLatentsCachingStrategy::encode(const at::Tensor& images, bool flip_aug, LatentSampling sampling,
                                                std::optional<at::Generator> generator) const {
  torch::NoGradGuard no_grad;
  AutoencoderKL vae = vae_;
  const auto latents_of = [&](const at::Tensor& x) {  // (B, 3, H, W) -> (B, 4, H/8, W/8)
    const DiagonalGaussian posterior = vae->encode(x);
    const at::Tensor z = sampling == LatentSampling::mean ? posterior.mean : posterior.sample(generator);
    return z * vae->config.scaling_factor;
  };
  EncodedLatents out{latents_of(images), {}};
  if (flip_aug) out.flipped = latents_of(images.flip({3}));
  return out;
}

// ---------------------------------------------------------------- text-encoder outputs

SdTextEncoderOutputsCachingStrategy::SdTextEncoderOutputsCachingStrategy(const TokenizeStrategy& tokenize,
                                                                         const TextEncodingStrategy& encode)
    : tokenize_(tokenize), encode_(encode) {}

NamedTensors SdTextEncoderOutputsCachingStrategy::outputs_to_cache(const std::vector<std::string>& captions,
                                                                   bool weighted) const {
  torch::NoGradGuard no_grad;
  return {{"hidden_state", encode_.encode(tokenize_.tokenize(captions, weighted))[0]}};
}

std::vector<at::Tensor> SdTextEncoderOutputsCachingStrategy::outputs_from_cache(const NamedTensors& stored) const {
  const auto it = std::find_if(stored.begin(), stored.end(), [](const auto& named) { return named.first == "hidden_state"; });
  if (it == stored.end()) fail("text-encoder output cache", "no 'hidden_state': expected SD's hidden states (B, S, D)");
  return {it->second};
}

// ---------------------------------------------------------------- the family

SdFamily::SdFamily(SdModels models, ClipTokenizer tokenizer, const FamilyOptions& options)
    : models_(std::move(models)),
      v2_(options.v2),
      bundle_{models_.unet.ptr(), models_.vae.ptr(), {models_.text_encoder.ptr()}},
      v_parameterization_(options.v_parameterization),
      clip_skip_(options.clip_skip ? std::optional<int64_t>(*options.clip_skip) : std::nullopt),
      tokenize_(std::move(tokenizer), options.max_token_length),
      encode_(models_.text_encoder, clip_skip_),
      latents_(models_.vae),
      outputs_(tokenize_, encode_) {}

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

std::unique_ptr<Family> load_sd_family(const FamilyOptions& options) {
  const std::string& path = options.pretrained_model_name_or_path;
  if (path.empty()) fail("pretrained_model_name_or_path", "required: a single-file SD checkpoint or a diffusers folder");
  if (options.clip_skip && *options.clip_skip < 1) fail("clip_skip", "expected 1 or more, got {}", *options.clip_skip);

  SdModels models = fs::is_directory(path) ? load_diffusers_folder(path)
                                           : load_ldm_checkpoint(path, options.v2 ? SdConfig::sd2() : SdConfig::sd1());
  if (options.vae) models.vae = load_vae(*options.vae, models.vae->config);
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
