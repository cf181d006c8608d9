// SDXL strategies and the family that loads its models.
#include "src/families/sdxl/sdxl_family.h"

#include <algorithm>
#include <charconv>
#include <filesystem>
#include <map>

#include <ATen/CPUGeneratorImpl.h>
#include <spdlog/spdlog.h>

#include "src/core/error.h"
#include "src/core/text.h"
#include "src/families/sd/sampling.h"
#include "src/models/ldm_layout.h"
#include "src/objectives/ddpm.h"

namespace sdt {
namespace fs = std::filesystem;

// ---------------------------------------------------------------- network targets (kohya's networks/lora.py)

namespace {

// The SGM path of a U-Net module (kohya's SDXL U-Net has the SGM layout): the diffusers path through the single-file
// key map.
std::string sgm_module_path(const std::string& diffusers_path, const UNetConfig& config) {
  const std::string key = ldm::unet_key(diffusers_path + ".weight", config);
  return key.substr(0, key.size() - std::string(".weight").size());
}

// kohya creates its modules in the named_modules() order of its SGM U-Net: blocks in SGM numbering, and inside a
// BasicTransformerBlock attn1, ff, attn2 (diffusers registers attn1, attn2, ff). Named segments ranked here; numbers
// compare as numbers; any other difference keeps diffusers' order, which kohya's modules share there.
bool before_in_sgm_order(const std::string& a, const std::string& b) {
  static const std::map<std::string, int> rank{{"input_blocks", 0}, {"middle_block", 1}, {"output_blocks", 2},
                                               {"proj_in", 0},      {"transformer_blocks", 1}, {"proj_out", 2},
                                               {"attn1", 0},        {"ff", 1},                 {"attn2", 2}};
  const std::vector<std::string> pa = split(a, '.'), pb = split(b, '.');
  for (size_t i = 0; i < std::min(pa.size(), pb.size()); ++i) {
    if (pa[i] == pb[i]) continue;
    const bool numbers = std::all_of(pa[i].begin(), pa[i].end(), ::isdigit) && std::all_of(pb[i].begin(), pb[i].end(), ::isdigit);
    if (numbers) return std::stoll(pa[i]) < std::stoll(pb[i]);
    const auto ra = rank.find(pa[i]), rb = rank.find(pb[i]);
    if (ra != rank.end() && rb != rank.end()) return ra->second < rb->second;
    return false;
  }
  return false;
}

// kohya's get_block_index for SDXL (and sdxl_train.py's get_block_params_to_optimize): 0 the time and label
// embeddings, 1 + n input_blocks.n, 10 + n middle_block.n, 13 + n output_blocks.n, 22 the output.
int sdxl_block_index(const std::string& sgm_path) {
  const std::vector<std::string> p = split(sgm_path, '.');
  if (p[0] == "time_embed" || p[0] == "label_emb") return 0;
  if (p[0] == "input_blocks") return 1 + std::stoi(p[1]);
  if (p[0] == "middle_block") return 10 + std::stoi(p[1]);
  if (p[0] == "output_blocks") return 13 + std::stoi(p[1]);
  if (p[0] == "out") return 22;
  return -1;
}

// sdxl_train.py's --block_lr: the U-Net's parameters by block, each block at its rate; a block at 0 is frozen.
std::vector<FullTrainingGroup> unet_block_groups(const std::string& block_lr, const UNet2DConditionModel& unet) {
  std::vector<double> rates;
  for (const std::string& value : split(block_lr, ',')) {
    const std::string text = trim(value);
    double rate = 0;
    const auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), rate);
    if (error != std::errc() || end != text.data() + text.size()) fail("--block_lr", "'{}' is not a number", text);
    rates.push_back(rate);
  }
  if (rates.size() != 23) fail("--block_lr", "{} values given, expected 23 (SDXL's U-Net blocks)", rates.size());
  std::vector<std::vector<std::string>> names(23);
  for (const auto& item : unet->named_parameters()) {
    names.at(static_cast<size_t>(sdxl_block_index(ldm::unet_key(item.key(), unet->config)))).push_back(item.key());
  }
  std::vector<FullTrainingGroup> groups;
  for (size_t i = 0; i < 23; ++i) {
    if (rates[i] != 0) groups.push_back({.prefix = "unet.", .model = unet.ptr(), .parameters = names[i], .lr = rates[i]});
  }
  return groups;
}

}  // namespace

std::vector<NetworkTarget> sdxl_network_targets(ClipTextModel text_encoder1, ClipTextModel text_encoder2,
                                                UNet2DConditionModel unet, bool conv_blocks) {
  std::vector<NetworkTarget> targets;
  const std::vector<ModuleTest> clip_parents{&is_a<ClipAttentionImpl>, &is_a<ClipMlpImpl>};
  if (text_encoder1) targets = lora_targets(text_encoder1.ptr(), "lora_te1", clip_parents, false);
  if (text_encoder2) {
    for (NetworkTarget& t : lora_targets(text_encoder2.ptr(), "lora_te2", clip_parents, false)) {
      t.text_encoder = 1;
      targets.push_back(std::move(t));
    }
  }
  if (!unet) return targets;

  std::vector<ModuleTest> parents{&is_a<Transformer2DImpl>};
  if (conv_blocks) {
    parents.push_back(&is_a<ResnetBlock2DImpl>);
    parents.push_back(&is_a<Downsample2DImpl>);
    parents.push_back(&is_a<Upsample2DImpl>);
  }
  // lora_targets names each target once, in order: the paths it was given line up with its targets. Files named by
  // the diffusers paths (other trainers') load as kohya loads them.
  std::vector<std::string> sgm_paths, diffusers_names;
  const auto rename = [&](const std::string& path) {
    std::string name = "lora_unet_" + path;
    std::replace(name.begin(), name.end(), '.', '_');
    diffusers_names.push_back(name);
    return sgm_paths.emplace_back(sgm_module_path(path, unet->config));
  };
  std::vector<NetworkTarget> unet_targets = lora_targets(unet.ptr(), "lora_unet", parents, true, rename);
  for (size_t i = 0; i < unet_targets.size(); ++i) unet_targets[i].other_name = diffusers_names[i];
  std::vector<size_t> order(unet_targets.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return before_in_sgm_order(sgm_paths[a], sgm_paths[b]); });
  for (size_t i : order) {
    unet_targets[i].block = sdxl_block_index(sgm_paths[i]);
    targets.push_back(std::move(unet_targets[i]));
  }
  return targets;
}

// ---------------------------------------------------------------- tokenize

SdxlTokenizeStrategy::SdxlTokenizeStrategy(const ClipTokenizer& tokenizer, std::optional<int> max_token_length)
    : first_(tokenizer, max_token_length), second_(tokenizer.with_pad_id(0), max_token_length) {}

Tokens SdxlTokenizeStrategy::tokenize(const std::vector<std::string>& captions, bool weighted) const {
  Tokens first = first_.tokenize(captions, weighted), second = second_.tokenize(captions, weighted);
  first.ids.push_back(second.ids.at(0));
  if (weighted) first.weights.push_back(second.weights.at(0));
  return first;
}

// ---------------------------------------------------------------- text encoding

SdxlTextEncodingStrategy::SdxlTextEncodingStrategy(ClipTextModel text_encoder1, ClipTextModel text_encoder2, int64_t eos_id)
    : text_encoder1_(std::move(text_encoder1)), text_encoder2_(std::move(text_encoder2)), eos_id_(eos_id) {}

Conditioning SdxlTextEncodingStrategy::encode(const Tokens& tokens) const {
  if (tokens.ids.size() != 2) fail("SDXL text encoding", "expected the ids of two tokenizers, got {}", tokens.ids.size());
  ClipTextModel te1 = text_encoder1_, te2 = text_encoder2_;
  const int64_t batch = tokens.ids[0].size(0), windows = tokens.ids[0].size(1);
  const at::Tensor ids1 = tokens.ids[0].flatten(0, 1).to(module_device(*te1));  // (B*n, 77)
  const at::Tensor ids2 = tokens.ids[1].flatten(0, 1).to(module_device(*te2));
  const ClipTextOutput out1 = te1->forward(ids1);
  const ClipTextOutput out2 = te2->forward(ids2);
  // hidden_states holds the embeddings and each layer's output: the penultimate layer's is kohya's [11] of CLIP-L and
  // [-2] of bigG.
  at::Tensor hidden1 = stitch_prompt_chunks(out1.hidden_states[out1.hidden_states.size() - 2], batch);  // (B, 2 + 75n, D1)
  at::Tensor hidden2 = stitch_prompt_chunks(out2.hidden_states[out2.hidden_states.size() - 2], batch);  // (B, 2 + 75n, D2)
  // kohya's pool workaround: the first EOS (CLIP's argmax pooling finds the largest id instead), of the first window.
  const at::Tensor first_eos = (ids2 == eos_id_).to(at::kInt).argmax(1);                           // (B*n)
  const at::Tensor rows = at::arange(ids2.size(0), first_eos.options().dtype(at::kLong));
  const at::Tensor pooled = te2->text_projection(out2.last_hidden_state.index({rows, first_eos}));   // (B*n, P)
  const at::Tensor pool2 = pooled.reshape({batch, windows, -1}).select(1, 0);                        // (B, P)
  if (!tokens.weights.empty()) {
    hidden1 = weight_prompt_chunks(hidden1, tokens.weights[0]);
    hidden2 = weight_prompt_chunks(hidden2, tokens.weights[1]);
  }
  return {{"hidden_state1", hidden1}, {"hidden_state2", hidden2}, {"pool2", pool2}};
}

// ---------------------------------------------------------------- the family

SdxlFamily::SdxlFamily(SdxlModels models, const ClipTokenizer& tokenizer, const FamilyOptions& options)
    : models_(std::move(models)),
      bundle_{models_.unet.ptr(), models_.vae.ptr(), {models_.text_encoder1.ptr(), models_.text_encoder2.ptr()}},
      v_parameterization_(options.v_parameterization),
      projection_as_kohya_(options.text_projection_as_kohya),
      max_token_length_(options.max_token_length),
      tokenize_(tokenizer, options.max_token_length),
      encode_(models_.text_encoder1, models_.text_encoder2, tokenizer.eos_id()),
      latents_(models_.vae, kSdxlVaeScale, "_sdxl"),
      outputs_(tokenize_, encode_, "_te_outputs", {"hidden_state1", "hidden_state2", "pool2"}) {}

namespace {

// kohya's vector conditioning: the pooled text embedding, then the size embeddings of (B, 6) size ids.
at::Tensor vector_conditioning(const UNet2DConditionModel& unet, const at::Tensor& pool2, const at::Tensor& size_ids) {
  const at::Tensor sizes = size_embedding(size_ids, unet->config.addition_time_embed_dim);
  return at::cat({pool2, sizes.to(pool2.device(), pool2.scalar_type())}, 1);  // (B, P + 6 * 256)
}

}  // namespace

// kohya's SDXL sample images (SdxlStableDiffusionLongPromptWeightingPipeline): each prompt through the training
// strategies (weighted captions read; the negative prompt, "" when none, encoded the same way), the image's own size
// as original and target size with no crop, then SD's schedulers and guidance; the latents divided by 0.13025.
at::Tensor SdxlFamily::sample(const SampleOptions& options) const {
  torch::NoGradGuard no_grad;
  UNet2DConditionModel unet = models_.unet;
  AutoencoderKL vae = models_.vae;
  const auto [width, height] = sample_width_height(options);
  const at::Tensor size_ids = at::tensor({height, width, int64_t{0}, int64_t{0}, height, width}, at::kFloat).reshape({1, 6});
  const auto conditioning_of = [&](const std::string& prompt) -> UNetConditioning {
    const Conditioning c = encode_.encode(tokenize_.tokenize({prompt}, /*weighted=*/true));
    return {at::cat({conditioning_tensor(c, "hidden_state1"), conditioning_tensor(c, "hidden_state2")}, 2),
            vector_conditioning(unet, conditioning_tensor(c, "pool2"), size_ids)};
  };
  const bool guided = sd_sample_scale(options) > 1.0;
  const UNetConditioning cond = conditioning_of(options.prompt);
  const UNetConditioning uncond = guided ? conditioning_of(options.negative_prompt) : UNetConditioning{};

  const std::unique_ptr<Scheduler> scheduler = make_scheduler(sampler_from_name(options.sampler), sd_sample_steps(options),
                                                              v_parameterization_ ? Prediction::v : Prediction::epsilon);
  at::Generator generator = at::make_generator<at::CPUGeneratorImpl>(sample_seed(options, width, height));
  const int64_t factor = vae->downscale_factor();
  const at::Tensor noise = randn_from_host({1, vae->config.latent_channels, height / factor, width / factor}, generator,
                                           cond.context.options());
  const at::Tensor latents = denoise(unet, *scheduler, noise, cond, uncond, sd_sample_scale(options), generator);
  return image_to_rgb8(vae->decode(latents / kSdxlVaeScale));
}

void SdxlFamily::save_checkpoint(const std::string& path, std::optional<at::ScalarType> dtype,
                                 const safetensors::Metadata& metadata) const {
  save_sgm_checkpoint(path, models_, dtype, metadata, projection_as_kohya_);
}

std::unique_ptr<TrainingObjective> SdxlFamily::make_objective(const TrainArgs& args) const {
  return std::make_unique<DdpmObjective>(ddpm_options_from_args(args));
}

// kohya's SdxlNetworkTrainer.call_unet: the two hidden states side by side as the context, the pooled vector and the
// size embeddings as the vector conditioning.
at::Tensor SdxlFamily::predict(const NoisedBatch& batch, const Conditioning& conditioning) const {
  UNet2DConditionModel unet = models_.unet;
  const at::Tensor context = at::cat({conditioning_tensor(conditioning, "hidden_state1"),
                                      conditioning_tensor(conditioning, "hidden_state2")}, 2);  // (B, S, D1 + D2)
  const at::Tensor vector = vector_conditioning(unet, conditioning_tensor(conditioning, "pool2"),
                                                conditioning_tensor(conditioning, "size_ids"));
  return unet->forward(batch.model_input, batch.timesteps, context, vector);
}

Conditioning SdxlFamily::image_conditioning(const std::vector<ImageGeometry>& images) const {
  std::vector<float> values;
  for (const ImageGeometry& g : images) {
    for (int64_t v : {g.original_height, g.original_width, g.crop_top, g.crop_left, g.target_height, g.target_width}) {
      values.push_back(static_cast<float>(v));
    }
  }
  return {{"size_ids", at::tensor(values, at::kFloat).reshape({static_cast<int64_t>(images.size()), 6})}};
}

std::vector<FullTrainingGroup> SdxlFamily::full_training_groups(const TrainArgs& args) const {
  if (args.stop_text_encoder_training) {
    fail("--stop_text_encoder_training", "is train_db.py's; SDXL trains as sdxl_train.py: the text encoders train with "
                                         "--train_text_encoder, at --learning_rate_te1 and --learning_rate_te2");
  }
  if (args.learning_rate_te) fail("--learning_rate_te", "is train_db.py's; SDXL's are --learning_rate_te1 and --learning_rate_te2");
  std::vector<FullTrainingGroup> groups;
  if (args.learning_rate != 0) {
    groups = args.block_lr ? unet_block_groups(*args.block_lr, models_.unet)
                           : std::vector<FullTrainingGroup>{{.prefix = "unet.", .model = models_.unet.ptr(), .lr = args.learning_rate}};
  }
  if (args.train_text_encoder) {
    const std::pair<ClipTextModel, std::optional<double>> encoders[] = {{models_.text_encoder1, args.learning_rate_te1},
                                                                         {models_.text_encoder2, args.learning_rate_te2}};
    for (size_t i = 0; i < 2; ++i) {
      const double lr = encoders[i].second.value_or(args.learning_rate);
      if (lr == 0) continue;
      groups.push_back({.prefix = fmt::format("text_encoder{}.", i + 1), .model = encoders[i].first.ptr(), .lr = lr,
                        .text_encoder = true});
    }
  }
  return groups;
}

LoRANetworkConfig SdxlFamily::network_config(const TrainArgs& args) const {
  return parse_lora_network_args(args.network_dim, args.network_alpha, args.network_dropout, args.network_args, NetworkBlockLayout::sdxl());
}

std::vector<NetworkTarget> SdxlFamily::network_targets(bool conv_blocks) const {
  return sdxl_network_targets(models_.text_encoder1, models_.text_encoder2, models_.unet, conv_blocks);
}

ParallelPlan SdxlFamily::parallel_plan() const {
  return {.blocks = models_.unet->blocks(),
          .no_block_swap_reason = "SDXL's U-Net has no stack of transformer blocks to swap (kohya offers block swap for "
                                  "FLUX, SD3 and the other transformer families only)"};
}

void SdxlFamily::set_block_runner(BlockRunner* runner) { models_.unet->block_runner = runner; }

void SdxlFamily::set_gradient_checkpointing(bool on) { models_.unet->gradient_checkpointing = on; }

ModelSpec SdxlFamily::model_spec() const {
  ModelSpec spec;
  spec.architecture = "stable-diffusion-xl-v1-base";
  spec.lora_implementation = "https://github.com/Stability-AI/generative-models";
  spec.prediction_type = v_parameterization_ ? "v" : "epsilon";
  spec.native_resolution = 1024;
  return spec;
}

safetensors::Metadata SdxlFamily::training_metadata() const {
  return {{"ss_v2", "False"}, {"ss_base_model_version", "sdxl_base_v1-0"}};
}

std::string SdxlFamily::text_encoder_settings() const {
  return fmt::format("sdxl max_token_length={} text_projection={}",
                     max_token_length_ ? std::to_string(*max_token_length_) : "75", projection_as_kohya_ ? "kohya" : "openclip");
}

std::unique_ptr<Family> load_sdxl_family(const FamilyOptions& options) {
  const std::string& path = options.pretrained_model_name_or_path;
  if (path.empty()) fail("pretrained_model_name_or_path", "required: an SGM (SDXL) single file or a diffusers folder");
  if (options.v2) fail("--v2", "SDXL is not SD 2.x: drop --v2 (kohya refuses it for SDXL too)");
  if (options.clip_skip) spdlog::warn("--clip_skip does nothing for SDXL, as in kohya's SDXL scripts");

  const at::ScalarType dtype = weights_dtype(options);
  SdxlModels models = fs::is_directory(path) ? load_sdxl_diffusers_folder(path, dtype)
                                             : load_sgm_checkpoint(path, SdxlConfig::base(), dtype, options.text_projection_as_kohya);
  if (options.vae) models.vae = load_vae(*options.vae, models.vae->config, dtype);
  const ClipTokenizer tokenizer = load_clip_tokenizer(options);
  for (const ClipTextModel& te : {models.text_encoder1, models.text_encoder2}) {
    if (std::max(tokenizer.bos_id(), tokenizer.eos_id()) >= te->config.vocab_size) {
      fail(options.tokenizer.empty() ? path : options.tokenizer,
           "the tokenizer's ids reach {} but a text encoder has {} tokens: a vocabulary for another model?",
           std::max(tokenizer.bos_id(), tokenizer.eos_id()), te->config.vocab_size);
    }
  }
  return std::make_unique<SdxlFamily>(std::move(models), tokenizer, options);
}

}  // namespace sdt
