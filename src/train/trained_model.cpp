#include "src/train/trained_model.h"

#include <fmt/ranges.h>
#include <spdlog/spdlog.h>

#include "src/core/error.h"
#include "src/models/fp8.h"
#include "src/networks/lora.h"
#include "src/networks/merge.h"
#include "src/parallel/sharding.h"
#include "src/train/fused_steps.h"

namespace sdt {
namespace {

std::optional<at::ScalarType> save_dtype(const TrainArgs& args) {
  const std::string p = args.save_precision.value_or("float");
  if (p == "float") return at::kFloat;
  if (p == "fp16") return at::kHalf;
  if (p == "bf16") return at::kBFloat16;
  fail("--save_precision", "'{}' is not one of float, fp16, bf16", p);
}

// --base_weights (with --base_weights_multiplier, 1 where not given): LoRAs merged into the base models before the
// network is made, computed in fp32 and stored in the models' dtype, as kohya's merge_to.
void merge_base_weights(const TrainArgs& args, Family& family) {
  if (args.base_weights.empty()) return;
  std::vector<double> multipliers;
  for (size_t i = 0; i < args.base_weights.size(); ++i) {
    multipliers.push_back(i < args.base_weights_multiplier.size() ? args.base_weights_multiplier[i] : 1.0);
  }
  const std::vector<std::string> unmatched = merge_loras_into_targets(family.network_targets(true), args.base_weights, multipliers, at::kFloat);
  spdlog::info("merged {} into the base model ({} weights for modules it lacks skipped)", fmt::join(args.base_weights, ", "), unmatched.size());
}

// The network's configuration: the family's module reading the network arguments, or with --dim_from_weights kohya's
// create_network_from_weights: the modules, dims and alphas of --network_weights, and none of the other network
// arguments (dropouts, block lists, LoRA+, patterns, split_qkv), which do not reach that network in kohya either.
LoRANetworkConfig network_config(const TrainArgs& args, const Family& family) {
  LoRANetworkConfig config = family.network_config(args);
  if (!args.dim_from_weights) return config;
  if (!args.network_weights) fail("--dim_from_weights", "needs --network_weights, the file whose modules, dims and alphas make the network");
  LoRANetworkConfig from_file;
  from_file.network_module = config.network_module;
  from_file.blocks = config.blocks;
  from_file.lr_per_text_encoder = config.lr_per_text_encoder;
  from_file.modules_dim_alpha = lora_dims_from_file(safetensors::File(*args.network_weights));
  return from_file;
}

// train_network.py: a LoRA network on the frozen denoiser and text encoder; its groups are kohya's
// prepare_optimizer_params (text encoder, U-Net or its blocks, LoRA+).
class NetworkTraining final : public TrainedModel {
 public:
  NetworkTraining(const TrainArgs& args, Family& family, const Precision& precision, at::Generator generator)
      : save_dtype_(save_dtype(args)), no_metadata_(args.no_metadata), scale_weight_norms_(args.scale_weight_norms) {
    const ModelBundle& models = family.models();
    merge_base_weights(args, family);
    if (precision.fp8_denoiser) {
      store_denoiser_in_fp8(*models.denoiser);
    } else {
      models.denoiser->to(precision.frozen);
    }
    for (const auto& encoder : models.text_encoders) {
      if (precision.fp8_text_encoders) {
        store_text_encoder_in_fp8(*encoder, precision.frozen);
      } else {
        encoder->to(precision.frozen);
      }
    }
    const LoRANetworkConfig config = network_config(args, family);
    if (args.network_module != config.network_module) {
      fail("--network_module", "'{}': sdt trains {} with kohya's '{}'", args.network_module.value_or(""), family.name(), config.network_module);
    }
    if (config.ggpo_sigma_beta) {
      const Sharding sharding = parse_sharding(args.sharding);
      if (sharding != Sharding::none) {
        fail("network_args ggpo_sigma", "LoRA-GGPO measures each module's whole averaged gradient, which --sharding {} "
             "averages only in shards over the ranks; use --sharding none (with --blocks_to_swap if memory is short)",
             sharding_name(sharding));
      }
      if (FusedSteps::requested(args)) {
        fail("network_args ggpo_sigma", "LoRA-GGPO measures the gradients before the optimizer steps, which {} does "
             "inside backward", FusedSteps::flag(args));
      }
    }
    if (config.split_qkv && scale_weight_norms_) {
      fail("--scale_weight_norms", "not with split_qkv: kohya's lora_flux measures the norms on a combined copy and never "
           "scales the weights, so there is no reference to follow");
    }
    network_ = LoRANetwork(config, family.network_targets(config.adapts_conv_blocks()), !args.network_train_unet_only,
                           !args.network_train_text_encoder_only, generator);
    trains_text_encoder_ = !network_->text_encoder_loras.empty();  // Chroma has no CLIP-L to adapt
    if (config.lr_per_text_encoder && !args.text_encoder_lr.empty()) {  // kohya's ss_text_encoder_lr: the whole list
      std::vector<std::string> lrs;
      for (double lr : args.text_encoder_lr) lrs.push_back(python_str(lr));
      text_encoder_lrs_ = fmt::format("[{}]", fmt::join(lrs, ", "));
    }
    if (args.network_weights) {
      const LoadResult loaded = network_->load_weights(*args.network_weights);
      if (loaded.loaded == 0) {
        fail("--network_weights", "{} holds none of this network's {} weights ({} other keys): not a LoRA for this model",
             *args.network_weights, loaded.missing.size(), loaded.unexpected.size());
      }
      spdlog::info("loaded {}: {} keys missing, {} unexpected", *args.network_weights, loaded.missing.size(), loaded.unexpected.size());
    }
    network_->to(precision.trained);
    network_->train();
    for (const auto& g : network_->prepare_optimizer_params(args.text_encoder_lr, args.unet_lr, args.learning_rate)) {
      groups_.push_back({g.params, g.lr});
    }
    for (const auto& item : network_->named_parameters()) named_.emplace_back(item.key(), item.value());
  }

  const char* state_name() const override { return "network"; }
  std::set<int> trained_text_encoders() const override {
    std::set<int> encoders;
    for (const auto& lora : network_->text_encoder_loras) encoders.insert(lora->text_encoder);
    return encoders;
  }
  bool trains_denoiser_weights() const override { return false; }
  std::vector<at::Tensor> kept_whole() const override { return network_->parameters(); }
  void to(c10::Device device) override { network_->to(device); }
  void set_training(bool training) override { training ? network_->train() : network_->eval(); }

  std::map<std::string, double> before_optimizer_step() override { return network_->update_ggpo_norms(); }
  void after_update(int64_t) override {
    if (scale_weight_norms_) network_->apply_max_norm_regularization(*scale_weight_norms_);
  }

  void save(const std::string& path, const LoRATrainingMetadata& metadata) const override {
    LoRATrainingMetadata own = metadata;  // what only the network knows: its module, lora_flux's lr list
    own.network_module = network_->config.network_module;
    if (text_encoder_lrs_) own.text_encoder_lr = *text_encoder_lrs_;
    safetensors::Metadata m = no_metadata_ ? minimum_network_metadata(own.to_metadata()) : own.to_metadata();
    m.insert(own.model_spec.begin(), own.model_spec.end());
    network_->save_weights(path, save_dtype_, m);
  }

 private:
  LoRANetwork network_{nullptr};
  std::optional<std::string> text_encoder_lrs_;
  std::optional<at::ScalarType> save_dtype_;
  bool no_metadata_;
  std::optional<double> scale_weight_norms_;
};

// Full fine-tuning: the groups of the family's script (train_db.py for SD, sdxl_train.py for SDXL); text encoders in
// them stop training at --stop_text_encoder_training.
class WholeModelTraining final : public TrainedModel {
 public:
  WholeModelTraining(const TrainArgs& args, Family& family, const Precision& precision)
      : family_(family), save_dtype_(save_dtype(args)), stop_text_encoder_at_(args.stop_text_encoder_training) {
    if (precision.fp8_denoiser) {
      fail(args.fp8_base ? "--fp8_base" : "--fp8_base_unet", "stores the frozen base model of a network in fp8; full "
           "fine-tuning trains it (kohya's full fine-tuning scripts accept the flag and ignore it)");
    }
    if (!args.base_weights.empty()) fail("--base_weights", "is a network training argument (train_network.py); merge LoRAs into the checkpoint with `sdt merge-lora`");
    if (args.dim_from_weights) fail("--dim_from_weights", "is a network training argument (train_network.py)");
    const ModelBundle& models = family.models();
    models.denoiser->to(precision.frozen);
    for (const auto& encoder : models.text_encoders) encoder->to(precision.frozen);
    for (const FullTrainingGroup& group : family.full_training_groups(args)) {
      group.model->to(precision.trained);
      add_group(group);
      if (group.text_encoder) {
        trains_text_encoder_ = true;
        trained_text_encoders_.push_back(group.model);
      }
    }
    if (groups_.empty()) fail("full fine-tuning", "nothing to train: every learning rate is 0");
    set_training(true);
  }

  const char* state_name() const override { return "full"; }
  std::set<int> trained_text_encoders() const override {
    std::set<int> encoders;
    if (!trains_text_encoder_) return encoders;
    const auto& all = family_.models().text_encoders;
    for (const auto& trained : trained_text_encoders_) {
      encoders.insert(static_cast<int>(std::find(all.begin(), all.end(), trained) - all.begin()));
    }
    return encoders;
  }
  bool trains_denoiser_weights() const override { return true; }
  std::vector<at::Tensor> kept_whole() const override { return {}; }
  void to(c10::Device) override {}  // the family's models are all it trains

  void set_training(bool training) override {
    family_.models().denoiser->train(training);
    if (!trains_text_encoder_) return;
    for (const auto& encoder : trained_text_encoders_) encoder->train(training);
  }

  std::map<std::string, double> before_optimizer_step() override { return {}; }
  void after_update(int64_t global_step) override {
    if (!stop_text_encoder_at_ || global_step != *stop_text_encoder_at_ || !trains_text_encoder_) return;
    spdlog::info("step {}: the text encoder stops training (--stop_text_encoder_training)", global_step);
    for (const auto& encoder : trained_text_encoders_) {
      encoder->eval();
      for (auto& p : encoder->parameters()) p.requires_grad_(false);
    }
    trains_text_encoder_ = false;
  }

  void save(const std::string& path, const LoRATrainingMetadata& metadata) const override {
    safetensors::Metadata m = metadata.model_spec;
    m["ss_steps"] = metadata.steps;
    m["ss_epoch"] = metadata.epoch;
    family_.save_checkpoint(path, save_dtype_, m);
  }

 private:
  void add_group(const FullTrainingGroup& group) {
    ParamGroup params{{}, group.lr};
    const auto named = group.model->named_parameters();
    const auto take = [&](const std::string& name, at::Tensor p) {
      p.requires_grad_(true);
      params.params.push_back(p);
      named_.emplace_back(group.prefix + name, p);
    };
    if (group.parameters.empty()) {
      for (const auto& item : named) take(item.key(), item.value());
    } else {
      for (const std::string& name : group.parameters) take(name, named[name]);
    }
    groups_.push_back(std::move(params));
  }

  Family& family_;
  std::optional<at::ScalarType> save_dtype_;
  std::optional<int64_t> stop_text_encoder_at_;
  std::vector<std::shared_ptr<torch::nn::Module>> trained_text_encoders_;
};

}  // namespace

std::vector<at::Tensor> TrainedModel::params() const {
  std::vector<at::Tensor> all;
  for (const ParamGroup& g : groups_) all.insert(all.end(), g.params.begin(), g.params.end());
  return all;
}

std::unique_ptr<TrainedModel> make_trained_model(TrainMode mode, const TrainArgs& args, Family& family,
                                                 const Precision& precision, at::Generator generator) {
  if (mode == TrainMode::network) return std::make_unique<NetworkTraining>(args, family, precision, std::move(generator));
  return std::make_unique<WholeModelTraining>(args, family, precision);
}

}  // namespace sdt
