#include "src/train/trained_model.h"

#include <spdlog/spdlog.h>

#include "src/core/error.h"
#include "src/networks/lora.h"

namespace sdt {
namespace {

std::optional<at::ScalarType> save_dtype(const TrainArgs& args) {
  const std::string p = args.save_precision.value_or("float");
  if (p == "float") return at::kFloat;
  if (p == "fp16") return at::kHalf;
  if (p == "bf16") return at::kBFloat16;
  fail("--save_precision", "'{}' is not one of float, fp16, bf16", p);
}

// train_network.py: a LoRA network on the frozen denoiser and text encoder; its groups are kohya's
// prepare_optimizer_params (text encoder, U-Net or its blocks, LoRA+).
class NetworkTraining final : public TrainedModel {
 public:
  NetworkTraining(const TrainArgs& args, Family& family, const Precision& precision, at::Generator generator)
      : save_dtype_(save_dtype(args)), no_metadata_(args.no_metadata), scale_weight_norms_(args.scale_weight_norms) {
    const ModelBundle& models = family.models();
    models.denoiser->to(precision.frozen);
    for (const auto& encoder : models.text_encoders) encoder->to(precision.frozen);
    trains_text_encoder_ = !args.network_train_unet_only;
    const LoRANetworkConfig config = parse_lora_network_args(args.network_dim, args.network_alpha, args.network_dropout,
                                                             args.network_args, family.network_block_layout());
    network_ = LoRANetwork(config, family.network_targets(config.adapts_conv_blocks()), trains_text_encoder_,
                           !args.network_train_text_encoder_only, generator);
    if (args.network_weights) {
      const LoadResult loaded = network_->load_weights(*args.network_weights);
      const size_t keys = network_->named_parameters().size() + network_->named_buffers().size();
      if (loaded.missing.size() == keys) {
        fail("--network_weights", "{} holds none of this network's {} weights ({} other keys): not a LoRA for this model",
             *args.network_weights, keys, loaded.unexpected.size());
      }
      spdlog::info("loaded {}: {} keys missing, {} unexpected", *args.network_weights, loaded.missing.size(), loaded.unexpected.size());
    }
    network_->to(precision.trained);
    network_->train();
    const std::optional<double> te_lr = args.text_encoder_lr.empty() ? std::nullopt : std::optional<double>(args.text_encoder_lr[0]);
    for (const auto& g : network_->prepare_optimizer_params(te_lr, args.unet_lr, args.learning_rate)) groups_.push_back({g.params, g.lr});
    for (const auto& item : network_->named_parameters()) named_.emplace_back(item.key(), item.value());
  }

  const char* state_name() const override { return "network"; }
  bool trains_denoiser_weights() const override { return false; }
  std::vector<at::Tensor> kept_whole() const override { return network_->parameters(); }
  void to(c10::Device device) override { network_->to(device); }
  void set_training(bool training) override { training ? network_->train() : network_->eval(); }

  void after_update(int64_t) override {
    if (scale_weight_norms_) network_->apply_max_norm_regularization(*scale_weight_norms_);
  }

  void save(const std::string& path, const LoRATrainingMetadata& metadata) const override {
    safetensors::Metadata m = no_metadata_ ? minimum_network_metadata(metadata.to_metadata()) : metadata.to_metadata();
    m.insert(metadata.model_spec.begin(), metadata.model_spec.end());
    network_->save_weights(path, save_dtype_, m);
  }

 private:
  LoRANetwork network_{nullptr};
  std::optional<at::ScalarType> save_dtype_;
  bool no_metadata_;
  std::optional<double> scale_weight_norms_;
};

// train_db.py: the denoiser at --learning_rate, the text encoder (unless --stop_text_encoder_training -1) at
// --learning_rate_te or the same rate, until step --stop_text_encoder_training.
class WholeModelTraining final : public TrainedModel {
 public:
  WholeModelTraining(const TrainArgs& args, Family& family, const Precision& precision)
      : family_(family), save_dtype_(save_dtype(args)), stop_text_encoder_at_(args.stop_text_encoder_training) {
    const ModelBundle& models = family.models();
    trains_text_encoder_ = !args.stop_text_encoder_training || *args.stop_text_encoder_training >= 0;
    models.denoiser->to(precision.trained);
    add_group("unet.", *models.denoiser, args.learning_rate);
    // diffusers' folder names: text_encoder, text_encoder_2, ...
    for (size_t i = 0; i < models.text_encoders.size(); ++i) {
      models.text_encoders[i]->to(trains_text_encoder_ ? precision.trained : precision.frozen);
      const std::string prefix = i == 0 ? "text_encoder." : fmt::format("text_encoder_{}.", i + 1);
      if (trains_text_encoder_) add_group(prefix, *models.text_encoders[i], args.learning_rate_te.value_or(args.learning_rate));
    }
    set_training(true);
  }

  const char* state_name() const override { return "full"; }
  bool trains_denoiser_weights() const override { return true; }
  std::vector<at::Tensor> kept_whole() const override { return {}; }
  void to(c10::Device) override {}  // the family's models are all it trains

  void set_training(bool training) override {
    family_.models().denoiser->train(training);
    if (!trains_text_encoder_) return;
    for (const auto& encoder : family_.models().text_encoders) encoder->train(training);
  }

  void after_update(int64_t global_step) override {
    if (!stop_text_encoder_at_ || global_step != *stop_text_encoder_at_ || !trains_text_encoder_) return;
    spdlog::info("step {}: the text encoder stops training (--stop_text_encoder_training)", global_step);
    for (const auto& encoder : family_.models().text_encoders) {
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
  void add_group(const std::string& prefix, torch::nn::Module& module, double lr) {
    ParamGroup group{{}, lr};
    for (const auto& item : module.named_parameters()) {
      at::Tensor p = item.value();
      p.requires_grad_(true);
      group.params.push_back(p);
      named_.emplace_back(prefix + item.key(), p);
    }
    groups_.push_back(std::move(group));
  }

  Family& family_;
  std::optional<at::ScalarType> save_dtype_;
  std::optional<int64_t> stop_text_encoder_at_;
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
