#include "src/train/trainer.h"

#include <chrono>
#include <ctime>
#include <filesystem>
#include <random>

#include <spdlog/spdlog.h>
#include <torch/torch.h>

#include "src/core/dataset_config.h"
#include "src/core/error.h"
#include "src/data/loader.h"
#include "src/families/family.h"
#include "src/models/clip_text.h"
#include "src/models/unet.h"
#include "src/networks/lora.h"
#include "src/networks/lora_metadata.h"
#include "src/train/diffusion.h"
#include "src/train/lr_schedule.h"
#include "src/train/make_optimizer.h"
#include "src/train/metrics.h"
#include "src/train/sample_prompts.h"

namespace sdt {
namespace {

namespace fs = std::filesystem;

std::optional<at::ScalarType> save_dtype(const TrainArgs& args) {
  const std::string p = args.save_precision.value_or("float");
  if (p == "float") return at::kFloat;
  if (p == "fp16") return at::kHalf;
  if (p == "bf16") return at::kBFloat16;
  fail("--save_precision", "'{}' is not one of float, fp16, bf16", p);
}

std::string timestamp(const char* format) {
  const std::time_t now = std::time(nullptr);
  char buf[32];
  std::strftime(buf, sizeof(buf), format, std::localtime(&now));
  return buf;
}

void check_supported(const TrainArgs& args) {
  const std::string module = args.network_module.value_or("");
  if (module != "networks.lora") {
    fail("--network_module", "sdt trains 'networks.lora' (kohya's LoRA and conv LoRA){}",
         module.empty() ? "; it is required" : ", not '" + module + "'");
  }
  if (!args.pretrained_model_name_or_path) fail("--pretrained_model_name_or_path", "required: a checkpoint file or a diffusers folder");
  if (!args.output_dir) fail("--output_dir", "required: where the LoRA files go");
  if (args.mixed_precision != "no" || args.full_fp16 || args.full_bf16) {
    fail("--mixed_precision", "only fp32 training is built so far (issue #5); use --mixed_precision no");
  }
  if (args.cache_latents || args.cache_latents_to_disk) {
    fail("--cache_latents", "latent and text-encoder caches arrive with issue #6; train without them for now");
  }
  if (args.gradient_accumulation_steps < 1) fail("--gradient_accumulation_steps", "must be at least 1");
}

}  // namespace

TrainSummary train_network(const TrainArgs& args, const World& world) {
  check_supported(args);
  if (world.size != 1) fail("sdt train", "data-parallel training arrives with issue #7; run one process for now");
  const uint64_t seed = args.seed ? static_cast<uint64_t>(*args.seed) : std::random_device{}();
  spdlog::info("seed {}", seed);
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  std::mt19937_64 python_random(seed);  // kohya's pyramid-noise scales come from Python's random, a separate stream
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  const UniformDraw pyramid_uniform = [&] { return unit(python_random); };

  // ---------------------------------------------------------------- models
  FamilyOptions family_options;
  family_options.pretrained_model_name_or_path = *args.pretrained_model_name_or_path;
  family_options.vae = args.vae;
  family_options.tokenizer = args.tokenizer.value_or("");
  family_options.v2 = args.v2;
  family_options.v_parameterization = args.v_parameterization;
  if (args.max_token_length) family_options.max_token_length = static_cast<int>(*args.max_token_length);
  if (args.clip_skip) family_options.clip_skip = static_cast<int>(*args.clip_skip);
  std::unique_ptr<Family> family = load_family("sd", family_options);
  const ModelBundle& bundle = family->models();
  UNet2DConditionModel unet(std::dynamic_pointer_cast<UNet2DConditionModelImpl>(bundle.denoiser));
  ClipTextModel text_encoder(std::dynamic_pointer_cast<ClipTextModelImpl>(bundle.text_encoders.at(0)));
  for (const auto& m : {bundle.denoiser, bundle.vae, bundle.text_encoders.at(0)}) {
    m->eval();
    for (auto& p : m->parameters()) p.requires_grad_(false);
  }
  unet->gradient_checkpointing = args.gradient_checkpointing;

  // ---------------------------------------------------------------- network and optimizer
  const bool train_unet = !args.network_train_text_encoder_only;
  const bool train_text_encoder = !args.network_train_unet_only;
  LoRANetworkConfig config = parse_lora_network_args(args.network_dim, args.network_alpha, args.network_dropout, args.network_args);
  LoRANetwork network(config, text_encoder, unet, train_text_encoder, train_unet, gen);
  if (args.network_weights) {
    LoadResult loaded = network->load_weights(*args.network_weights);
    spdlog::info("loaded {}: {} keys missing, {} unexpected", *args.network_weights, loaded.missing.size(), loaded.unexpected.size());
  }
  network->train();
  std::optional<double> te_lr = args.text_encoder_lr.empty() ? std::nullopt : std::optional<double>(args.text_encoder_lr[0]);
  std::vector<LoraParamGroup> lora_groups = network->prepare_optimizer_params(te_lr, args.unet_lr, args.learning_rate);
  std::vector<ParamGroup> groups;
  std::vector<at::Tensor> trainable;
  for (const auto& g : lora_groups) {
    groups.push_back({g.params, g.lr});
    trainable.insert(trainable.end(), g.params.begin(), g.params.end());
  }
  MadeOptimizer made = make_optimizer(args, groups);

  // ---------------------------------------------------------------- data
  DatasetBlueprint blueprint = resolve_dataset_config(args);
  const std::vector<DatasetIndex> indexes = index_datasets(blueprint, {.skip_bad_images = args.skip_bad_images});
  std::vector<LoaderDataset> loader_datasets;
  int64_t num_train_images = 0, num_reg_images = 0;
  for (size_t i = 0; i < indexes.size(); ++i) {
    loader_datasets.push_back({&blueprint.datasets[i], &indexes[i]});
    num_train_images += indexes[i].num_train_images;
    num_reg_images += indexes[i].num_reg_images;
  }
  BatchPlanner planner(indexes, blueprint, world.size, seed);
  const int64_t accumulation = args.gradient_accumulation_steps;
  const int64_t updates_per_epoch = (planner.steps_per_epoch() + accumulation - 1) / accumulation;
  const int64_t max_train_steps = args.max_train_epochs ? *args.max_train_epochs * updates_per_epoch : args.max_train_steps;
  const int64_t num_epochs = (max_train_steps + updates_per_epoch - 1) / updates_per_epoch;
  spdlog::info("{} training images with repeats, {} regularization; {} batches per epoch, {} optimizer steps per epoch, "
               "{} steps over {} epochs",
               num_train_images, num_reg_images, planner.steps_per_epoch(), updates_per_epoch, max_train_steps, num_epochs);
  TrainArgs schedule_args = args;
  schedule_args.max_train_steps = max_train_steps;
  LrScheduler scheduler(*made.optimizer, make_lr_schedule(schedule_args, world.size, made.uses_adafactor_schedule));
  scheduler.set_step(0);

  LoaderOptions loader_options;
  loader_options.seed = seed;
  loader_options.rank = world.rank;
  loader_options.world_size = world.size;
  loader_options.workers = static_cast<int>(args.max_data_loader_n_workers);
  loader_options.queue_depth = 2 * std::max<int>(1, static_cast<int>(args.max_data_loader_n_workers));
  loader_options.max_train_steps = max_train_steps;
  DataLoader loader(loader_datasets, planner, loader_options);

  const DdpmOptions ddpm = ddpm_options_from_args(args);
  const DdpmSchedule schedule = make_ddpm_schedule(ddpm.zero_terminal_snr);

  // ---------------------------------------------------------------- outputs
  fs::create_directories(*args.output_dir);
  const std::string output_name = args.output_name.value_or("last");
  const std::string log_dir = args.logging_dir.value_or((fs::path(*args.output_dir) / "logs").string());
  TensorBoardWriter tensorboard(log_dir);
  JsonlWriter jsonl((fs::path(log_dir) / "metrics.jsonl").string());
  const std::vector<SamplePrompt> prompts = args.sample_prompts ? load_sample_prompts(*args.sample_prompts) : std::vector<SamplePrompt>{};
  const std::string started_at = std::to_string(std::time(nullptr));

  LoRATrainingMetadata meta;
  meta.training_started_at = started_at;
  meta.output_name = output_name;
  meta.learning_rate = python_str(args.learning_rate);
  meta.text_encoder_lr = python_str(te_lr);
  meta.unet_lr = python_str(args.unet_lr);
  meta.num_train_images = python_str(num_train_images);
  meta.num_reg_images = python_str(num_reg_images);
  meta.num_batches_per_epoch = python_str(planner.steps_per_epoch());
  meta.num_epochs = python_str(num_epochs);
  meta.gradient_checkpointing = python_str(args.gradient_checkpointing);
  meta.gradient_accumulation_steps = python_str(accumulation);
  meta.max_train_steps = python_str(max_train_steps);
  meta.lr_scheduler = args.lr_scheduler;
  meta.network_dim = python_str(config.dim);
  meta.network_alpha = python_str(config.alpha);
  meta.v2 = python_str(args.v2);
  meta.base_model_version = args.v2 ? (args.v_parameterization ? "sd_v2_768_v" : "sd_v2_512") : "sd_v1";
  meta.seed = python_str(static_cast<int64_t>(seed));
  meta.optimizer = made.ss_optimizer();
  meta.max_grad_norm = python_str(args.max_grad_norm);
  meta.min_snr_gamma = python_str(args.min_snr_gamma);
  meta.loss_type = args.loss_type;

  auto save = [&](const std::string& name, int64_t step, int64_t epoch) {
    const std::string path = (fs::path(*args.output_dir) / (name + ".safetensors")).string();
    LoRATrainingMetadata m = meta;
    m.num_epochs = python_str(epoch);
    safetensors::Metadata metadata = m.to_metadata();
    metadata["ss_steps"] = std::to_string(step);
    metadata["ss_epoch"] = std::to_string(epoch);
    network->save_weights(path, save_dtype(args), args.no_metadata ? minimum_network_metadata(metadata) : metadata);
    spdlog::info("saved {}", path);
    return path;
  };
  auto sample_images = [&](int64_t step, std::optional<int64_t> epoch) {
    if (prompts.empty()) return;
    torch::NoGradGuard no_grad;
    network->eval();
    network->update_weights();
    const fs::path dir = fs::path(*args.output_dir) / "sample";
    fs::create_directories(dir);
    for (const auto& p : prompts) {
      SampleOptions o;
      o.prompt = p.prompt;
      o.negative_prompt = p.negative_prompt;
      o.sampler = p.sampler.value_or(args.sample_sampler);
      if (p.steps) o.steps = static_cast<int>(*p.steps);
      if (p.scale) o.scale = *p.scale;
      if (p.seed) o.seed = static_cast<uint64_t>(*p.seed);
      if (p.width) o.width = static_cast<int>(*p.width);
      if (p.height) o.height = static_cast<int>(*p.height);
      write_png((dir / sample_image_name(args.output_name, epoch, step, p, timestamp("%Y%m%d%H%M%S"))).string(), family->sample(o));
    }
    network->train();
  };

  // ---------------------------------------------------------------- the loop
  TrainSummary summary;
  std::vector<std::pair<int64_t, double>> curve;
  ProgressBar progress(max_train_steps);
  double recent_sum = 0;
  std::vector<double> recent;  // kohya's moving average: the last epoch's step losses
  int64_t global_step = 0;
  const bool weighted = args.weighted_captions;
  for (int64_t epoch = 1; epoch <= num_epochs && global_step < max_train_steps; ++epoch) {
    loader.start_epoch(epoch, 0, global_step);
    int64_t micro = 0;
    double accumulated = 0;
    while (global_step < max_train_steps) {
      std::optional<TrainBatch> batch = loader.next();
      if (!batch) break;
      const EncodedLatents encoded = family->latents_caching_strategy().encode(batch->images, false, LatentSampling::sample, gen);
      at::Tensor conditioning;
      {
        std::optional<torch::NoGradGuard> no_grad;
        if (!train_text_encoder) no_grad.emplace();
        const Tokens tokens = family->tokenize_strategy().tokenize(batch->captions, weighted);
        conditioning = family->text_encoding_strategy().encode(tokens).at(0);
      }
      network->update_weights(gen);
      const NoisedLatents noised = noise_latents(schedule, encoded.latents, ddpm.noise, gen, pyramid_uniform);
      const at::Tensor target = training_target(schedule, encoded.latents, noised, ddpm.loss.v_parameterization);
      const at::Tensor pred = unet->forward(noised.noisy_latents, noised.timesteps, conditioning);
      std::optional<at::Tensor> mask;
      if (batch->alpha_masks.defined() && args.masked_loss) mask = batch->alpha_masks;
      const at::Tensor loss = ddpm_batch_loss(schedule, ddpm.loss, pred, target, noised.timesteps, batch->loss_weights, mask);
      (loss / static_cast<double>(accumulation)).backward();
      accumulated += loss.item<double>();
      if (++micro % accumulation != 0) continue;

      if (args.max_grad_norm > 0) torch::nn::utils::clip_grad_norm_(trainable, args.max_grad_norm);
      made.optimizer->step();
      made.optimizer->zero_grad();
      ++global_step;
      scheduler.set_step(global_step);
      if (args.scale_weight_norms) network->apply_max_norm_regularization(*args.scale_weight_norms);

      const double step_loss = accumulated / static_cast<double>(accumulation);
      accumulated = 0;
      summary.losses.push_back(step_loss);
      curve.emplace_back(global_step, step_loss);
      recent.push_back(step_loss);
      recent_sum += step_loss;
      if (static_cast<int64_t>(recent.size()) > updates_per_epoch) {
        recent_sum -= recent.front();
        recent.erase(recent.begin());
      }
      const double average = recent_sum / static_cast<double>(recent.size());
      const double lr = made.optimizer->param_groups().at(0).options().get_lr();
      if (world.rank == 0) {
        progress.update(global_step, average, lr);
        jsonl.write(global_step, epoch, {{"loss", step_loss}, {"avr_loss", average}, {"lr", lr}});
        tensorboard.add_scalar("loss/current", static_cast<float>(step_loss), global_step);
        tensorboard.add_scalar("loss/average", static_cast<float>(average), global_step);
        tensorboard.add_scalar("lr/group0", static_cast<float>(lr), global_step);
        if (args.save_every_n_steps && global_step % *args.save_every_n_steps == 0 && global_step < max_train_steps) {
          summary.weights_path = save(fmt::format("{}-step{:08d}", output_name, global_step), global_step, epoch);
        }
        if (args.sample_every_n_steps && global_step % *args.sample_every_n_steps == 0) sample_images(global_step, std::nullopt);
      }
    }
    if (world.rank == 0 && epoch < num_epochs) {
      if (args.save_every_n_epochs && epoch % *args.save_every_n_epochs == 0) {
        summary.weights_path = save(fmt::format("{}-{:06d}", output_name, epoch), global_step, epoch);
      }
      if (args.sample_every_n_epochs && epoch % *args.sample_every_n_epochs == 0) sample_images(global_step, epoch);
    }
  }
  summary.steps = global_step;
  if (world.rank == 0) {
    progress.finish();
    tensorboard.flush();
    summary.weights_path = save(output_name, global_step, num_epochs);
    write_loss_curve_png((fs::path(*args.output_dir) / (output_name + "_loss.png")).string(), curve, output_name + ": loss per step");
    if (args.sample_every_n_epochs || args.sample_every_n_steps) sample_images(global_step, num_epochs);
  }
  return summary;
}

}  // namespace sdt
