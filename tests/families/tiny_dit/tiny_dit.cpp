#include "tests/families/tiny_dit/tiny_dit.h"

#include <filesystem>
#include <mutex>

#include <nlohmann/json.hpp>

#include "src/core/error.h"
#include "src/core/tensor_io.h"
#include "src/families/sd/sd_family.h"
#include "src/models/sd_checkpoint.h"
#include "src/models/unet.h"
#include "tests/train/toy_dataset.h"
#include "src/objectives/flow_matching.h"

namespace sdt::tiny_dit {
namespace {

namespace fs = std::filesystem;

at::Tensor layer_norm(const at::Tensor& x) { return at::layer_norm(x, {x.size(-1)}, {}, {}, 1e-6); }
at::Tensor modulate(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale) { return layer_norm(x) * (scale + 1) + shift; }

}  // namespace

// ---------------------------------------------------------------- the model

DoubleBlockImpl::DoubleBlockImpl(const TinyDitConfig& c) : dim(c.dim), heads(c.heads) {
  for (auto [prefix, mod, qkv, proj, mlp_in, mlp_out] :
       {std::tuple{"img", &img_mod, &img_qkv, &img_proj, &img_mlp_in, &img_mlp_out},
        std::tuple{"txt", &txt_mod, &txt_qkv, &txt_proj, &txt_mlp_in, &txt_mlp_out}}) {
    const std::string p = prefix;
    *mod = register_module(p + "_mod", Linear(c.dim, 6 * c.dim));
    *qkv = register_module(p + "_qkv", Linear(c.dim, 3 * c.dim));
    *proj = register_module(p + "_proj", Linear(c.dim, c.dim));
    *mlp_in = register_module(p + "_mlp_in", Linear(c.dim, c.mlp_ratio * c.dim));
    *mlp_out = register_module(p + "_mlp_out", Linear(c.mlp_ratio * c.dim, c.dim));
  }
}

std::pair<at::Tensor, at::Tensor> DoubleBlockImpl::forward(const at::Tensor& img, const at::Tensor& txt, const at::Tensor& vec) {
  const std::vector<at::Tensor> im = img_mod(at::silu(vec)).unsqueeze(1).chunk(6, -1);
  const std::vector<at::Tensor> tm = txt_mod(at::silu(vec)).unsqueeze(1).chunk(6, -1);
  const std::vector<at::Tensor> iq = img_qkv(modulate(img, im[0], im[1])).chunk(3, -1);
  const std::vector<at::Tensor> tq = txt_qkv(modulate(txt, tm[0], tm[1])).chunk(3, -1);
  // Joint attention over [text, image].
  const at::Tensor attn = multi_head_attention(at::cat({tq[0], iq[0]}, 1), at::cat({tq[1], iq[1]}, 1), at::cat({tq[2], iq[2]}, 1), heads);
  const int64_t s = txt.size(1);
  at::Tensor i = img + im[2] * img_proj(attn.narrow(1, s, img.size(1)));
  at::Tensor t = txt + tm[2] * txt_proj(attn.narrow(1, 0, s));
  i = i + im[5] * img_mlp_out(at::gelu(img_mlp_in(modulate(i, im[3], im[4])), "tanh"));
  t = t + tm[5] * txt_mlp_out(at::gelu(txt_mlp_in(modulate(t, tm[3], tm[4])), "tanh"));
  return {i, t};
}

SingleBlockImpl::SingleBlockImpl(const TinyDitConfig& c) : dim(c.dim), heads(c.heads), mlp(c.mlp_ratio * c.dim) {
  modulation = register_module("modulation", Linear(c.dim, 3 * c.dim));
  linear1 = register_module("linear1", Linear(c.dim, 3 * c.dim + mlp));
  linear2 = register_module("linear2", Linear(c.dim + mlp, c.dim));
}

at::Tensor SingleBlockImpl::forward(const at::Tensor& x, const at::Tensor& vec) {
  const std::vector<at::Tensor> m = modulation(at::silu(vec)).unsqueeze(1).chunk(3, -1);
  const at::Tensor h = linear1(modulate(x, m[0], m[1]));
  const std::vector<at::Tensor> qkv = h.narrow(-1, 0, 3 * dim).chunk(3, -1);
  const at::Tensor attn = multi_head_attention(qkv[0], qkv[1], qkv[2], heads);
  return x + m[2] * linear2(at::cat({attn, at::gelu(h.narrow(-1, 3 * dim, mlp), "tanh")}, -1));
}

TinyDitImpl::TinyDitImpl(TinyDitConfig c) : config(c) {
  const int64_t patch_features = c.latent_channels * c.patch * c.patch;
  img_in = register_module("img_in", Linear(patch_features, c.dim));
  txt_in = register_module("txt_in", Linear(c.context_dim, c.dim));
  time_in = register_module("time_in", Linear(c.dim, c.dim));
  vector_in = register_module("vector_in", Linear(c.pooled_dim, c.dim));
  double_blocks = register_module("double_blocks", torch::nn::ModuleList());
  for (int64_t i = 0; i < c.double_blocks; ++i) double_blocks->push_back(DoubleBlock(c));
  single_blocks = register_module("single_blocks", torch::nn::ModuleList());
  for (int64_t i = 0; i < c.single_blocks; ++i) single_blocks->push_back(SingleBlock(c));
  final_mod = register_module("final_mod", Linear(c.dim, 2 * c.dim));
  final_out = register_module("final_out", Linear(c.dim, patch_features));
}

at::Tensor TinyDitImpl::forward(const at::Tensor& latents, const at::Tensor& timesteps, const at::Tensor& text, const at::Tensor& pooled) {
  const int64_t b = latents.size(0), c = latents.size(1), p = config.patch;
  const int64_t rows = latents.size(2) / p, cols = latents.size(3) / p;
  // 2x2 packing: (B, C, h, w) -> (B, h/2 * w/2, 4C).
  const at::Tensor tokens = latents.view({b, c, rows, p, cols, p}).permute({0, 2, 4, 1, 3, 5}).reshape({b, rows * cols, c * p * p});
  // Positions: sinusoidal embeddings of the token's row and column.
  const at::Tensor row = at::arange(rows, at::kFloat).repeat_interleave(cols), col = at::arange(cols, at::kFloat).repeat({rows});
  const at::Tensor position = at::cat({timestep_embedding(row, config.dim / 2), timestep_embedding(col, config.dim / 2)}, -1);
  at::Tensor img = img_in(tokens) + position.to(tokens.dtype()).unsqueeze(0);
  at::Tensor txt = txt_in(text);
  const at::Tensor vec = time_in(timestep_embedding(timesteps.to(img.device()), config.dim).to(img.dtype())) + vector_in(pooled);
  const int64_t s = txt.size(1);
  for (const auto& module : *double_blocks) {
    auto* double_block = module->as<DoubleBlockImpl>();
    const Block run = [double_block](const std::vector<at::Tensor>& in) {
      auto [i, t] = double_block->forward(in[0], in[1], in[2]);
      return std::vector<at::Tensor>{i, t};
    };
    const std::vector<at::Tensor> streams = run_block(block_runner, gradient_checkpointing, *module, run, {img, txt, vec});
    img = streams[0];
    txt = streams[1];
  }
  at::Tensor x = at::cat({txt, img}, 1);
  for (const auto& module : *single_blocks) {
    auto* single_block = module->as<SingleBlockImpl>();
    const Block run = [single_block](const std::vector<at::Tensor>& in) { return std::vector<at::Tensor>{single_block->forward(in[0], in[1])}; };
    x = run_block(block_runner, gradient_checkpointing, *module, run, {x, vec})[0];
  }
  img = x.narrow(1, s, x.size(1) - s);
  const std::vector<at::Tensor> f = final_mod(at::silu(vec)).unsqueeze(1).chunk(2, -1);
  const at::Tensor out = final_out(modulate(img, f[0], f[1]));  // (B, N, 4C)
  return out.view({b, rows, cols, c, p, p}).permute({0, 3, 1, 4, 2, 5}).reshape({b, c, rows * p, cols * p});
}

std::vector<std::shared_ptr<torch::nn::Module>> TinyDitImpl::blocks() const {
  std::vector<std::shared_ptr<torch::nn::Module>> all;
  for (const auto& m : *double_blocks) all.push_back(m);
  for (const auto& m : *single_blocks) all.push_back(m);
  return all;
}

// ---------------------------------------------------------------- the family

namespace {

// The SD text encoder's hidden states, and their mean over the tokens as the pooled vector.
class TinyDitTextEncoding final : public TextEncodingStrategy {
 public:
  explicit TinyDitTextEncoding(ClipTextModel text_encoder) : sd_(std::move(text_encoder), std::nullopt) {}
  Conditioning encode(const Tokens& tokens) const override {
    const at::Tensor hidden = conditioning_tensor(sd_.encode(tokens), "hidden_state");
    return {{"hidden_state", hidden}, {"pooled", hidden.mean(1)}};
  }

 private:
  SdTextEncodingStrategy sd_;
};

class TinyDitOutputsCaching final : public TextEncoderOutputsCachingStrategy {
 public:
  TinyDitOutputsCaching(const TokenizeStrategy& tokenize, const TextEncodingStrategy& encode) : tokenize_(tokenize), encode_(encode) {}
  std::string cache_suffix() const override { return "_tiny_dit_te"; }
  NamedTensors outputs_to_cache(const std::vector<std::string>& captions, bool weighted) const override {
    return encode_.encode(tokenize_.tokenize(captions, weighted));
  }
  Conditioning outputs_from_cache(const NamedTensors& stored) const override {
    return {{"hidden_state", conditioning_tensor(stored, "hidden_state")}, {"pooled", conditioning_tensor(stored, "pooled")}};
  }

 private:
  const TokenizeStrategy& tokenize_;
  const TextEncodingStrategy& encode_;
};

class TinyDitFamily final : public Family {
 public:
  TinyDitFamily(SdModels sd, TinyDit dit, ClipTokenizer tokenizer, std::string transformer_path)
      : sd_(std::move(sd)),
        dit_(std::move(dit)),
        transformer_path_(std::move(transformer_path)),
        bundle_{dit_.ptr(), sd_.vae.ptr(), {sd_.text_encoder.ptr()}},
        tokenize_(std::move(tokenizer), std::nullopt),
        encode_(sd_.text_encoder),
        latents_(sd_.vae, sd_.vae->config.scaling_factor, "_sd"),
        outputs_(tokenize_, encode_) {}
  TinyDitFamily(const TinyDitFamily&) = delete;
  TinyDitFamily& operator=(const TinyDitFamily&) = delete;

  std::string name() const override { return "tiny_dit"; }
  const ModelBundle& models() const override { return bundle_; }
  const TokenizeStrategy& tokenize_strategy() const override { return tokenize_; }
  const TextEncodingStrategy& text_encoding_strategy() const override { return encode_; }
  const LatentsCachingStrategy& latents_caching_strategy() const override { return latents_; }
  const TextEncoderOutputsCachingStrategy& text_encoder_outputs_caching_strategy() const override { return outputs_; }
  at::Tensor sample(const SampleOptions&) const override { fail("tiny_dit", "the test family has no sampler"); }

  void save_checkpoint(const std::string& path, std::optional<at::ScalarType> dtype, const safetensors::Metadata& metadata) const override {
    NamedTensors tensors;
    for (const auto& item : dit_->named_parameters()) tensors.emplace_back(item.key(), dtype ? item.value().detach().to(*dtype) : item.value().detach());
    safetensors::Metadata m = metadata;
    m["tiny_dit_config"] = safetensors::File(transformer_path_).metadata().at("tiny_dit_config");
    save_safetensors(path, tensors, m);
  }

  std::unique_ptr<TrainingObjective> make_objective(const TrainArgs& args) const override {
    return std::make_unique<FlowMatchingObjective>(flow_matching_options_from_args(args));
  }
  at::Tensor predict(const NoisedBatch& batch, const Conditioning& conditioning) const override {
    TinyDit dit = dit_;
    return dit->forward(batch.model_input, batch.timesteps, conditioning_tensor(conditioning, "hidden_state"),
                        conditioning_tensor(conditioning, "pooled"));
  }
  // kohya's lora_flux names: every Linear of the double and single blocks; the text encoder as SD's.
  std::vector<NetworkTarget> network_targets(bool) const override {
    std::vector<NetworkTarget> targets = sd_network_targets(sd_.text_encoder, nullptr, false);
    for (const auto& [list, blocks] : {std::pair{"double_blocks", dit_->double_blocks}, std::pair{"single_blocks", dit_->single_blocks}}) {
      for (const auto& item : blocks->named_modules()) {
        if (!dynamic_cast<const Adaptable*>(item.value().get())) continue;
        std::string name = "lora_unet_" + std::string(list) + "_" + item.key();
        std::replace(name.begin(), name.end(), '.', '_');
        targets.push_back({name, item.value(), true, -1});
      }
    }
    return targets;
  }
  // As SD's train_db.py: the transformer, and the text encoder unless --stop_text_encoder_training -1.
  std::vector<FullTrainingGroup> full_training_groups(const TrainArgs& args) const override {
    std::vector<FullTrainingGroup> groups{{.prefix = "unet.", .model = dit_.ptr(), .lr = args.learning_rate}};
    if (!args.stop_text_encoder_training || *args.stop_text_encoder_training >= 0) {
      groups.push_back({.prefix = "text_encoder.", .model = sd_.text_encoder.ptr(),
                        .lr = args.learning_rate_te.value_or(args.learning_rate), .text_encoder = true});
    }
    return groups;
  }
  // kohya's lora_flux has no block-wise dims: the lists keep SD's layout, which no target indexes.
  LoRANetworkConfig network_config(const TrainArgs& args) const override {
    return parse_lora_network_args(args.network_dim, args.network_alpha, args.network_dropout, args.network_args);
  }
  // The double blocks then the single blocks, two stacks that swap as kohya's FLUX does: --blocks_to_swap k swaps
  // k / 2 double blocks and twice the rest in single blocks (a double block is about two single blocks' weights).
  ParallelPlan parallel_plan() const override {
    const size_t doubles = dit_->double_blocks->size(), singles = dit_->single_blocks->size();
    return {.blocks = dit_->blocks(), .swap = [doubles, singles](int64_t k) {
              return std::vector<SwapStack>{{0, doubles, k / 2}, {doubles, singles, (k - k / 2) * 2}};
            }};
  }
  void set_block_runner(BlockRunner* runner) override { dit_->block_runner = runner; }
  void set_gradient_checkpointing(bool on) override { dit_->gradient_checkpointing = on; }
  safetensors::Metadata training_metadata() const override { return {{"ss_base_model_version", "tiny_dit"}}; }
  ModelSpec model_spec() const override { return {.architecture = "tiny-dit", .native_resolution = 64}; }
  std::string text_encoder_settings() const override { return "tiny_dit"; }

 private:
  SdModels sd_;
  TinyDit dit_;
  std::string transformer_path_;
  ModelBundle bundle_;
  SdTokenizeStrategy tokenize_;
  TinyDitTextEncoding encode_;
  SdLatentsCachingStrategy latents_;
  TinyDitOutputsCaching outputs_;
};

TinyDitConfig config_from_json(const std::string& text) {
  const nlohmann::json j = nlohmann::json::parse(text);
  TinyDitConfig c;
  c.latent_channels = j.at("latent_channels");
  c.patch = j.at("patch");
  c.dim = j.at("dim");
  c.heads = j.at("heads");
  c.mlp_ratio = j.at("mlp_ratio");
  c.double_blocks = j.at("double_blocks");
  c.single_blocks = j.at("single_blocks");
  c.context_dim = j.at("context_dim");
  c.pooled_dim = j.at("pooled_dim");
  return c;
}

std::string transformer_file(const std::string& folder) { return (fs::path(folder) / "transformer" / "model.safetensors").string(); }

bool is_tiny_dit_checkpoint(const std::string& checkpoint) {
  return fs::exists(transformer_file(checkpoint)) && safetensors::File(transformer_file(checkpoint)).metadata().contains("tiny_dit_config");
}

std::unique_ptr<Family> load_tiny_dit(const FamilyOptions& options) {
  const std::string path = transformer_file(options.pretrained_model_name_or_path);
  const safetensors::File file(path);
  TinyDit dit(config_from_json(file.metadata().at("tiny_dit_config")));
  {
    torch::NoGradGuard no_grad;
    for (auto& item : dit->named_parameters()) item.value().copy_(load_tensor(file, item.key()));
  }
  SdModels sd = load_diffusers_folder((fs::path(options.pretrained_model_name_or_path) / "sd").string());
  sd.unet = nullptr;  // the SD folder lends its VAE and text encoder only
  const std::string vocabulary = options.tokenizer;
  ClipTokenizer tokenizer = ClipTokenizer::from_vocab_json_and_merges(vocabulary + "/vocab.json", vocabulary + "/merges.txt",
                                                                      ClipTokenizer::kSd1PadToken);
  return std::make_unique<TinyDitFamily>(std::move(sd), std::move(dit), std::move(tokenizer), path);
}

}  // namespace

void register_family() {
  static std::once_flag once;
  std::call_once(once, [] { sdt::register_family("tiny_dit", {&load_tiny_dit, &is_tiny_dit_checkpoint}); });
}

TrainArgs training_args(const std::string& model, const std::string& train_data_dir, TrainMode mode) {
  TrainArgs args;
  args.pretrained_model_name_or_path = model;
  args.tokenizer = SDT_FIXTURES "/sd/sampling/tokenizer";
  args.train_data_dir = train_data_dir;
  args.resolution = "64";
  args.train_batch_size = 1;
  args.seed = 1;
  args.max_data_loader_n_workers = 1;
  args.timestep_sampling = "sigmoid";
  if (mode == TrainMode::network) {
    args.network_module = "networks.lora";
    args.network_dim = 4;
    args.network_alpha = 4;
    args.network_train_unet_only = true;
    args.learning_rate = 1e-2;
  } else {
    args.learning_rate = 2e-3;
  }
  return args;
}

void write_checkpoint(const std::string& folder, const TinyDitConfig& c, uint64_t seed, const std::string& sd_folder) {
  fs::create_directories(fs::path(folder) / "transformer");
  torch::manual_seed(seed);
  TinyDit dit(c);
  NamedTensors tensors;
  for (const auto& item : dit->named_parameters()) tensors.emplace_back(item.key(), item.value().detach());
  const nlohmann::json config = {{"latent_channels", c.latent_channels}, {"patch", c.patch}, {"dim", c.dim}, {"heads", c.heads},
                                 {"mlp_ratio", c.mlp_ratio}, {"double_blocks", c.double_blocks}, {"single_blocks", c.single_blocks},
                                 {"context_dim", c.context_dim}, {"pooled_dim", c.pooled_dim}};
  save_safetensors(transformer_file(folder), tensors, {{"tiny_dit_config", config.dump()}});
  const fs::path link = fs::path(folder) / "sd";
  if (!fs::exists(link)) fs::create_directory_symlink(fs::absolute(sd_folder), link);
}

TrainArgs toy_run(const std::string& folder, TrainMode mode, const TinyDitConfig& config) {
  register_family();
  const std::filesystem::path root(folder);
  std::filesystem::remove_all(root);
  write_checkpoint((root / "model").string(), config, 3, SDT_FIXTURES "/sd/sd1");
  TrainArgs args = training_args((root / "model").string(), testing_support::make_toy_dataset(root, 4, 64).string(), mode);
  args.output_dir = (root / "out").string();
  args.output_name = "toy";
  args.train_batch_size = 2;
  args.model_prediction_type = "raw";
  return args;
}

}  // namespace sdt::tiny_dit
