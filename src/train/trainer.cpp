#include "src/train/trainer.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/autocast_mode.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <functional>
#include <mutex>
#include <random>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>
#include <torch/torch.h>

#include "src/core/dataset_config.h"
#include "src/core/error.h"
#include "src/core/tensor_io.h"
#include "src/data/loader.h"
#include "src/data/rng.h"
#include "cluster/communicator.h"
#include "src/cache/build_cache.h"
#include "src/cache/latent_cache.h"
#include "src/cache/text_encoder_cache.h"
#include "cluster/gradient_reducer.h"
#include "src/dist/memory_plan.h"
#include "src/families/family.h"
#include "src/networks/lora.h"
#include "src/networks/lora_metadata.h"
#include "src/objectives/objective.h"
#include "src/train/data_parallel.h"
#include "src/train/lr_schedule.h"
#include "src/train/make_optimizer.h"
#include "src/train/metrics.h"
#include "src/train/precision.h"
#include "src/train/sample_prompts.h"
#include "src/train/train_state.h"
#include "src/train/trained_model.h"

namespace sdt {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

// Everything random about a training sample (its VAE sample, noise, timestep, pyramid scales) comes from streams
// keyed by (seed, optimizer update, the sample's place among the update's samples), never from a stream that runs
// through the batch. So how an update's samples are split among ranks and accumulation micro-steps changes
// nothing, and a resumed run needs no generator state. (kohya draws from one stream per process; its "one random
// strength per batch" options draw one per sample here.)
at::Generator keyed_generator(uint64_t seed, int64_t update, int64_t place, RngPurpose purpose) {
  Rng rng(seed, static_cast<uint64_t>(update), static_cast<uint64_t>(place), purpose);
  return at::make_generator<at::CPUGeneratorImpl>(rng.next());
}

void seed_default_generator(uint64_t seed, int64_t update, int64_t place, RngPurpose purpose) {
  Rng rng(seed, static_cast<uint64_t>(update), static_cast<uint64_t>(place), purpose);
  at::Generator generator = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(generator.mutex());
  generator.set_current_seed(rng.next());
}

// A batch's latents: the VAE posterior's mean, or each sample drawn from the posterior with its own keyed stream;
// `first_place` is the place of the batch's first sample in its update.
at::Tensor encode_latents(const Family& family, const at::Tensor& images, LatentSampling sampling, uint64_t seed, int64_t update,
                          int64_t first_place, RngPurpose purpose) {
  torch::NoGradGuard no_grad;
  if (sampling == LatentSampling::mean || images.size(0) == 0) return family.latents_caching_strategy().encode(images, false, sampling).latents.to(at::kFloat);
  std::vector<at::Tensor> latents;
  for (int64_t i = 0; i < images.size(0); ++i) {
    at::Generator gen = keyed_generator(seed, update, first_place + i, purpose);
    latents.push_back(family.latents_caching_strategy().encode(images.narrow(0, i, 1), false, sampling, gen).latents);
  }
  return at::cat(latents).to(at::kFloat);
}

// The random sources of a batch's samples for the objective: torch's stream and a Python-random stream (kohya draws
// pyramid-noise scales from it), both keyed by the sample's place in its update.
SampleRandoms keyed_randoms(uint64_t seed, int64_t update, int64_t first_place, RngPurpose purpose) {
  return [=](int64_t sample) {
    const int64_t place = first_place + sample;
    auto python_random = std::make_shared<std::mt19937_64>(
        Rng(seed, static_cast<uint64_t>(update), static_cast<uint64_t>(place), RngPurpose::PyramidScales).next());
    return SampleRandom{keyed_generator(seed, update, place, purpose),
                        [python_random] { return std::uniform_real_distribution<double>(0.0, 1.0)(*python_random); }};
  };
}

// The text conditioning of a batch; a rank whose share of a short global batch is empty gets (0, ...) rows, from one
// placeholder caption, so it still runs the denoiser (whose collectives every rank must join) on an empty batch.
std::vector<at::Tensor> encode_captions(const Family& family, const std::vector<std::string>& captions, bool weighted) {
  if (!captions.empty()) return family.text_encoding_strategy().encode(family.tokenize_strategy().tokenize(captions, weighted));
  std::vector<at::Tensor> placeholder = family.text_encoding_strategy().encode(family.tokenize_strategy().tokenize({""}, false));
  for (at::Tensor& c : placeholder) c = c.narrow(0, 0, 0);
  return placeholder;
}

std::string timestamp(const char* format) {
  const std::time_t now = std::time(nullptr);
  char buf[32];
  std::strftime(buf, sizeof(buf), format, std::localtime(&now));
  return buf;
}

void check_supported(const TrainArgs& args, TrainMode mode) {
  if (mode == TrainMode::network) {
    const std::string module = args.network_module.value_or("");
    if (module != "networks.lora") {
      fail("--network_module", "sdt trains 'networks.lora' (kohya's LoRA and conv LoRA){}",
           module.empty() ? "; it is required (or use `sdt train_db` to train the whole model)" : ", not '" + module + "'");
    }
  }
  if (!args.pretrained_model_name_or_path) fail("--pretrained_model_name_or_path", "required: a checkpoint file or a diffusers folder");
  if (!args.output_dir) fail("--output_dir", "required: where the weight files go");
  if (args.save_model_as != "safetensors") {
    fail("--save_model_as", "sdt writes safetensors only (pickled '{}' files run code when loaded); use safetensors",
         args.save_model_as);
  }
  if (args.full_fp16 && args.mixed_precision != "fp16") fail("--full_fp16", "requires --mixed_precision fp16, as in kohya");
  if (args.full_bf16 && args.mixed_precision != "bf16") fail("--full_bf16", "requires --mixed_precision bf16, as in kohya");
  if (args.vae_latents != "sample" && args.vae_latents != "mean") fail("--vae_latents", "'{}' is not one of sample, mean", args.vae_latents);
  if (args.no_token_padding) fail("--no_token_padding", "not supported: sdt pads captions as kohya does by default");
  if (args.gradient_accumulation_steps < 1) fail("--gradient_accumulation_steps", "must be at least 1");
  parse_sharding_mode(args.sharding);
}

// SIGUSR1 / SIGTERM (Slurm's warning before preemption or the time limit, `scancel --signal`): the run saves its
// state at the next update, on every rank at the same update, and stops.
std::atomic<bool> stop_requested{false};
extern "C" void request_stop(int) { stop_requested = true; }

// ---------------------------------------------------------------- the step time split

// Every rank's split, gathered, printed by rank 0 one line per rank (a collective: all ranks call it).
void log_times(const StepTimes& t, Communicator& communicator, const char* what) {
  const at::Tensor mine = torch::tensor({t.data, t.forward, t.backward, t.communication, t.optimizer, static_cast<double>(t.steps)},
                                        at::TensorOptions(at::kDouble));
  const at::Tensor all = communicator.all_gather(mine.to(communicator.device())).cpu();
  if (communicator.rank() != 0 || t.steps == 0) return;
  for (int r = 0; r < communicator.size(); ++r) {
    const at::Tensor row = all[r];
    const double n = std::max(1.0, row[5].item<double>());
    auto ms = [&](int i) { return 1e3 * row[i].item<double>() / n; };
    spdlog::info("rank {} ms per step over {} ({} steps): data {:.1f}, forward {:.1f}, backward {:.1f}, communication {:.1f}, "
                 "optimizer {:.1f}, total {:.1f}",
                 r, what, static_cast<int64_t>(n), ms(0), ms(1), ms(2), ms(3), ms(4), ms(0) + ms(1) + ms(2) + ms(3) + ms(4));
  }
}

}  // namespace

TrainSummary train(const TrainArgs& args, const World& world, TrainMode mode) {
  check_supported(args, mode);
  // Every CPU tensor's bytes are counted from here, so the run's peak can be set against its memory plan.
  CpuTensorMeter::install();
  CpuTensorMeter::reset_peak();
  const int64_t bytes_before_run = CpuTensorMeter::live_bytes();
  std::unique_ptr<Communicator> communicator = make_communicator(world, at::Device(at::kCPU));
  std::optional<std::string> resume_dir = args.resume;
  if (resume_dir == "latest") {
    const std::optional<fs::path> newest = newest_state(*args.output_dir);
    resume_dir = newest ? std::optional<std::string>(newest->string()) : std::nullopt;
    spdlog::info("--resume latest: {}", newest ? newest->string() : "no state in " + *args.output_dir + " yet, starting from the beginning");
  }
  std::optional<nlohmann::json> resume_json;
  if (resume_dir) resume_json = read_state_json(*resume_dir);
  std::signal(SIGUSR1, request_stop);
  std::signal(SIGTERM, request_stop);
  // A resumed run keeps its seed: the data order, augmentations and noise all derive from it.
  uint64_t seed = args.seed ? static_cast<uint64_t>(*args.seed) : std::random_device{}();
  if (resume_json) {
    const uint64_t saved = resume_json->at("sdt").at("seed").get<uint64_t>();
    if (args.seed && saved != seed) spdlog::warn("--seed {} differs from the resumed run's seed {}; using {}", seed, saved, saved);
    seed = saved;
  }
  spdlog::info("seed {}", seed);
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);  // initialisation only: LoRA weights
  const Precision precision = precision_from_args(args);

  // ---------------------------------------------------------------- models
  std::unique_ptr<Family> family = load_family_for_training(args);
  const ModelBundle& bundle = family->models();
  for (const auto& m : {bundle.denoiser, bundle.vae, bundle.text_encoders.at(0)}) {
    m->eval();
    for (auto& p : m->parameters()) p.requires_grad_(false);
  }
  family->set_gradient_checkpointing(args.gradient_checkpointing);
  const std::unique_ptr<TrainingObjective> objective = family->make_objective(args);
  const ParallelPlan parallel_plan = family->parallel_plan();
  if (args.blocks_to_swap && *args.blocks_to_swap != 0) fail("--blocks_to_swap", "{}", parallel_plan.no_block_swap_reason);

  // ---------------------------------------------------------------- what is trained, and the optimizer
  const std::unique_ptr<TrainedModel> trained = make_trained_model(mode, args, *family, precision, gen);
  bundle.vae->to(precision.vae);
  // Data parallel: rank 0's trained weights go to every rank, then each backward's gradients are averaged over the
  // ranks while backward runs (one process: no communication at all); --sharding cuts the optimizer state and the
  // gradients into one shard per rank, and the optimizer steps this rank's shards.
  const ShardingMode sharding = parse_sharding_mode(args.sharding);
  // --sharding full: each block of the family's parallel plan keeps 1/N of its weights on a rank, trained or frozen;
  // the denoiser gathers a block as it runs it. The LoRA weights stay whole; they act on the gathered weights' forward.
  std::unique_ptr<ShardedUnits> units;
  if (sharding == ShardingMode::full) {
    // Trained fp32 blocks under mixed precision are gathered in the autocast dtype (FSDP's param_dtype).
    std::optional<at::ScalarType> gather_dtype;
    if (trained->trains_denoiser_weights() && precision.autocast && precision.trained == at::kFloat) gather_dtype = precision.autocast;
    units = std::make_unique<ShardedUnits>(parallel_plan.blocks, trained->kept_whole(), *communicator, gather_dtype);
    family->set_block_runner(units.get());
  }
  DataParallel parallel(trained->groups(), *communicator, sharding, args.ddp_bucket_mb * 1024 * 1024, std::move(units));
  MadeOptimizer made = make_optimizer(args, parallel.optimizer_groups());
  DataParallel::check_optimizer(sharding, made.optimizer->kind());
  LossScaler scaler;
  DataParallel::MemoryPlan memory_plan;
  {
    int64_t frozen_bytes = 0;
    std::set<const void*> trained_storage;
    const std::vector<at::Tensor> trained_params = trained->params();
    for (const auto& p : trained_params) trained_storage.insert(p.unsafeGetTensorImpl());
    for (const auto& m : {bundle.denoiser, bundle.vae, bundle.text_encoders.at(0)}) {
      for (const auto& p : m->parameters()) {
        if (!trained_storage.contains(p.unsafeGetTensorImpl())) frozen_bytes += p.numel() * static_cast<int64_t>(p.element_size());
      }
    }
    const int64_t element = trained_params.empty() ? 4 : static_cast<int64_t>(trained_params.front().element_size());
    memory_plan = parallel.plan_memory(frozen_bytes, optimizer_bytes_per_element(made.optimizer->kind(), element));
    if (world.rank == 0) spdlog::info("{}", DataParallel::describe(memory_plan, sharding, world.size));
  }

  // ---------------------------------------------------------------- data
  DatasetBlueprint blueprint = resolve_dataset_config(args);
  const uint64_t validation_seed = args.validation_seed ? static_cast<uint64_t>(*args.validation_seed) : seed;
  const std::vector<DatasetIndex> indexes = index_datasets(
      blueprint, {.skip_bad_images = args.skip_bad_images, .part = DatasetPart::training, .validation_seed = validation_seed});
  std::vector<LoaderDataset> loader_datasets;
  int64_t num_train_images = 0, num_reg_images = 0;
  for (size_t i = 0; i < indexes.size(); ++i) {
    loader_datasets.push_back({&blueprint.datasets[i], &indexes[i]});
    num_train_images += indexes[i].num_train_images;
    num_reg_images += indexes[i].num_reg_images;
  }
  const int64_t accumulation = args.gradient_accumulation_steps;
  BatchPlanner planner(indexes, blueprint, world.size, seed, accumulation);
  const int64_t batches_per_epoch = planner.steps_per_epoch();
  const int64_t updates_per_epoch = planner.updates_per_epoch();
  int64_t samples_per_update = 0;
  for (const auto& d : blueprint.datasets) samples_per_update = std::max(samples_per_update, d.batch_size * world.size * accumulation);
  if (world.rank == 0) {
    std::string shares;
    for (int r = 0; r < world.size; ++r) {
      shares += fmt::format("{}{}", r ? ", " : "", (samples_per_update / accumulation) * (r + 1) / world.size -
                                                     (samples_per_update / accumulation) * r / world.size);
    }
    spdlog::info("{} ranks on {} nodes; global batch {} = batch {} x {} ranks, x {} accumulation steps = {} samples per "
                 "update; rank shares of each global batch: {}",
                 world.size, world.node_count, samples_per_update / accumulation, samples_per_update / accumulation / world.size,
                 world.size, accumulation, samples_per_update, shares);
  }
  const int64_t max_train_steps = args.max_train_epochs ? *args.max_train_epochs * updates_per_epoch : args.max_train_steps;
  const int64_t num_epochs = (max_train_steps + updates_per_epoch - 1) / updates_per_epoch;
  spdlog::info("{} training images with repeats, {} regularization; {} batches per epoch, {} optimizer steps per epoch, "
               "{} steps over {} epochs",
               num_train_images, num_reg_images, batches_per_epoch, updates_per_epoch, max_train_steps, num_epochs);
  TrainArgs schedule_args = args;
  schedule_args.max_train_steps = max_train_steps;
  LrScheduler scheduler(*made.optimizer, make_lr_schedule(schedule_args, world.size, made.uses_adafactor_schedule));

  RunPosition position;
  if (resume_dir) {
    position = load_train_state(*resume_dir, *trained, *made.optimizer, parallel, samples_per_update, scaler);
    spdlog::info("resumed from {} at step {} (epoch {}, batch {})", *resume_dir, position.global_step, position.epoch,
                 position.epoch_step);
  }
  // kohya's schedule spans max_train_steps x processes and Accelerate advances it once per process at each
  // update, so on N ranks it sits at step N x global_step (an integer warm-up is thus N times shorter, as in kohya).
  scheduler.set_step(position.global_step * world.size);

  // --cache_latents_to_disk: the HDF5 latent cache in the cache folder (made by `sdt cache-latents`, or here, every
  // rank encoding its share, then waiting until all shares are in); --cache_latents: the same, in a folder of the
  // run that is deleted at the end. Training then reads each rank's items from it and loads no pixels.
  const LatentSampling vae_latents = args.vae_latents == "mean" ? LatentSampling::mean : LatentSampling::sample;
  std::unique_ptr<LatentCacheReader> latent_cache;
  std::optional<LatentKeyIndex> latent_keys;
  std::optional<fs::path> run_cache_dir;
  if (args.cache_latents || args.cache_latents_to_disk) {
    CacheOptions cache_options;
    if (args.cache_latents_to_disk) {
      cache_options.cache_dir = default_cache_dir(args);
    } else {
      run_cache_dir = fs::path(*args.output_dir) / ".sdt_latent_cache";
      cache_options.cache_dir = run_cache_dir->string();
    }
    if (cache_options.cache_dir.empty()) fail("--cache_latents_to_disk", "no cache folder: give --train_data_dir or --dataset_config");
    cache_options.on_progress = cache_progress_line("caching latents", world);
    const CacheBuildSummary built = build_latent_cache(*family, args, cache_options, blueprint, indexes, world);
    wait_for_latent_cache(*family, args, cache_options, blueprint, indexes, 7 * 24 * 3600.0);
    latent_cache = std::make_unique<LatentCacheReader>(cache_options.cache_dir, latent_cache_identity(*family, cache_options));
    latent_keys.emplace(blueprint, indexes);
    spdlog::info("latents from the cache {} ({} entries; {} were valid, {} encoded by this rank)", cache_options.cache_dir,
                 latent_cache->size(), built.valid_before, built.encoded);
  }

  // --cache_text_encoder_outputs(_to_disk): the text conditioning of each processed caption, from the cache.
  std::unique_ptr<TextEncoderCacheReader> text_cache;
  std::optional<fs::path> run_text_cache_dir;
  if (args.cache_text_encoder_outputs || args.cache_text_encoder_outputs_to_disk) {
    if (trained->trains_text_encoder()) {
      fail("--cache_text_encoder_outputs", "the text encoder is trained, so its outputs change every step: add "
                                           "--network_train_unet_only, or do not cache them");
    }
    CacheOptions cache_options;
    if (args.cache_text_encoder_outputs_to_disk) {
      cache_options.cache_dir = default_cache_dir(args);
    } else {
      run_text_cache_dir = fs::path(*args.output_dir) / ".sdt_text_encoder_cache";
      cache_options.cache_dir = run_text_cache_dir->string();
    }
    if (cache_options.cache_dir.empty()) fail("--cache_text_encoder_outputs_to_disk", "no cache folder: give --train_data_dir or --dataset_config");
    cache_options.on_progress = cache_progress_line("caching text-encoder outputs", world);
    build_text_encoder_cache(*family, args, cache_options, blueprint, indexes, world);
    wait_for_text_encoder_cache(*family, args, cache_options, blueprint, indexes, 7 * 24 * 3600.0);
    text_cache = std::make_unique<TextEncoderCacheReader>(cache_options.cache_dir,
                                                          text_encoder_cache_identity(*family, args, cache_options));
    spdlog::info("text-encoder outputs from the cache {} ({} captions)", cache_options.cache_dir, text_cache->size());
  }

  LoaderOptions loader_options;
  loader_options.seed = seed;
  loader_options.rank = world.rank;
  loader_options.world_size = world.size;
  loader_options.workers = static_cast<int>(args.max_data_loader_n_workers);
  loader_options.queue_depth = 2 * std::max<int>(1, static_cast<int>(args.max_data_loader_n_workers));
  loader_options.max_train_steps = max_train_steps;
  LoaderOptions train_loader_options = loader_options;
  train_loader_options.load_pixels = !latent_cache;
  DataLoader loader(loader_datasets, planner, train_loader_options);

  // The held-out images (--validation_split or the datasets' validation_split), in a fixed order.
  DatasetBlueprint validation_blueprint;
  std::vector<DatasetIndex> validation_indexes;
  {
    std::vector<DatasetIndex> parts = index_datasets(
        blueprint, {.skip_bad_images = args.skip_bad_images, .part = DatasetPart::validation, .validation_seed = validation_seed});
    for (size_t i = 0; i < parts.size(); ++i) {
      if (parts[i].images.empty()) continue;
      validation_blueprint.datasets.push_back(blueprint.datasets[i]);
      validation_indexes.push_back(std::move(parts[i]));
    }
  }
  std::vector<LoaderDataset> validation_datasets;
  int64_t num_validation_images = 0;
  for (size_t i = 0; i < validation_indexes.size(); ++i) {
    validation_datasets.push_back({&validation_blueprint.datasets[i], &validation_indexes[i]});
    num_validation_images += validation_indexes[i].num_train_images;
  }
  std::optional<BatchPlanner> validation_planner;
  std::unique_ptr<DataLoader> validation_loader;
  if (!validation_datasets.empty()) {
    validation_planner.emplace(validation_indexes, validation_blueprint, world.size, validation_seed);
    validation_loader = std::make_unique<DataLoader>(validation_datasets, *validation_planner, loader_options);
    spdlog::info("{} validation images, {} validation batches", num_validation_images, validation_planner->steps_per_epoch());
  }

  // ---------------------------------------------------------------- outputs
  fs::create_directories(*args.output_dir);
  const std::string output_name = args.output_name.value_or("last");
  const std::string log_dir = args.logging_dir.value_or((fs::path(*args.output_dir) / "logs").string());
  // Logs and weight files come from rank 0 alone.
  std::unique_ptr<TensorBoardWriter> tensorboard;
  std::unique_ptr<JsonlWriter> jsonl;
  if (world.rank == 0) {
    tensorboard = std::make_unique<TensorBoardWriter>(log_dir);
    jsonl = std::make_unique<JsonlWriter>((fs::path(log_dir) / "metrics.jsonl").string());
  }
  const std::vector<SamplePrompt> prompts = args.sample_prompts ? load_sample_prompts(*args.sample_prompts) : std::vector<SamplePrompt>{};

  LoRATrainingMetadata meta;
  meta.training_started_at = python_str(std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count());
  meta.output_name = output_name;
  meta.learning_rate = python_str(args.learning_rate);
  meta.text_encoder_lr = python_str(args.text_encoder_lr.empty() ? std::nullopt : std::optional<double>(args.text_encoder_lr[0]));
  meta.unet_lr = python_str(args.unet_lr);
  meta.num_train_images = python_str(num_train_images);
  meta.num_reg_images = python_str(num_reg_images);
  meta.num_validation_images = python_str(num_validation_images);
  meta.validation_seed = python_str(args.validation_seed);
  meta.validation_split = python_str(args.validation_split);
  meta.max_validation_steps = python_str(args.max_validation_steps);
  meta.validate_every_n_steps = python_str(args.validate_every_n_steps);
  meta.validate_every_n_epochs = python_str(args.validate_every_n_epochs);
  meta.num_batches_per_epoch = python_str(batches_per_epoch);
  meta.num_epochs = python_str(num_epochs);
  meta.gradient_checkpointing = python_str(args.gradient_checkpointing);
  meta.gradient_accumulation_steps = python_str(accumulation);
  meta.max_train_steps = python_str(max_train_steps);
  meta.lr_scheduler = args.lr_scheduler;
  meta.network_dim = python_str(args.network_dim.value_or(4));  // kohya's create_network defaults
  meta.network_alpha = python_str(args.network_alpha);
  meta.mixed_precision = args.mixed_precision;
  meta.full_fp16 = python_str(args.full_fp16);
  meta.network_dropout = python_str(args.network_dropout);
  meta.base_model = family->training_metadata();
  meta.seed = python_str(static_cast<int64_t>(seed));
  meta.optimizer = made.ss_optimizer();
  meta.max_grad_norm = python_str(args.max_grad_norm);
  meta.min_snr_gamma = python_str(args.min_snr_gamma);
  meta.loss_type = args.loss_type;

  const fs::path output_dir(*args.output_dir);
  auto weights_file = [&](const std::string& name) { return (output_dir / (name + ".safetensors")).string(); };
  auto save_weights = [&](const std::string& name, int64_t step, int64_t epoch) {
    const std::string path = weights_file(name);
    LoRATrainingMetadata m = meta;
    m.num_epochs = python_str(epoch);
    m.steps = std::to_string(step);
    m.epoch = std::to_string(epoch);
    m.training_finished_at = python_str(std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count());
    trained->save(path, m);
    spdlog::info("saved {}", path);
    return path;
  };
  TrainSummary summary;
  summary.first_step = position.global_step;
  // What rank 0 alone does with the models (write the trained weights, sample): under --sharding full it runs
  // between a gather of every block's weights to rank 0 and their release, in which all ranks take part.
  auto on_rank0_with_whole_models = [&](bool reads_sharded_weights, const std::function<void()>& work) {
    if (reads_sharded_weights) parallel.gather_whole_to_root();
    if (world.rank == 0) work();
    if (reads_sharded_weights) parallel.release_whole();
  };
  const bool weights_sharded = trained->trains_denoiser_weights();  // a LoRA file holds no block weights
  auto save_state = [&](const std::string& name) {
    const fs::path dir = output_dir / (name + "-state");
    if (weights_sharded) parallel.gather_whole_to_root();
    save_train_state(dir, *trained, *made.optimizer, parallel, position, seed, samples_per_update, world, scaler);
    if (weights_sharded) parallel.release_whole();
    if (world.rank == 0) spdlog::info("saved state {}", dir.string());
    communicator->barrier();  // no rank goes on (or exits) before the state is complete
    summary.state_path = dir.string();
  };
  auto remove_saved = [&](const std::string& name, bool is_state) {
    const fs::path path = is_state ? output_dir / (name + "-state") : fs::path(weights_file(name));
    if (fs::remove_all(path) > 0) spdlog::info("removed {}", path.string());
  };
  // The sampler runs the network in evaluation mode (no dropouts).
  auto sample_images = [&](int64_t step, std::optional<int64_t> epoch) {
    if (prompts.empty()) return;
    torch::NoGradGuard no_grad;
    trained->set_training(false);
    const fs::path dir = output_dir / "sample";
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
      AutocastScope autocast(precision.autocast);
      write_png((dir / sample_image_name(args.output_name, epoch, step, p, timestamp("%Y%m%d%H%M%S"))).string(), family->sample(o));
    }
    trained->set_training(true);
  };

  // kohya's validation: the models in evaluation mode; each held-out batch at the timesteps
  // linspace(min_t, max_t, 6)[1:-1] (200, 400, 600, 800), with latents and noise from streams keyed by
  // --validation_seed (else --seed), the batch and the sample, so values compare across validations, runs and rank
  // counts. The value is the mean over all held-out samples of all ranks.
  auto validate = [&]() -> double {
    torch::NoGradGuard no_grad;
    trained->set_training(false);
    validation_loader->start_epoch(1, 0, position.global_step);
    double sum = 0;
    int64_t count = 0, batches = 0;  // samples x timesteps; validation batches
    while (!args.max_validation_steps || batches < *args.max_validation_steps) {
      std::optional<TrainBatch> batch = validation_loader->next();
      if (!batch) break;
      ++batches;
      AutocastScope autocast(precision.autocast);
      const int points = objective->validation_points();
      const int64_t key = batch->update * (points + 1);  // the latents' streams, then one per validation point
      const at::Tensor latents = encode_latents(*family, batch->images.to(precision.vae), vae_latents, validation_seed, key,
                                                batch->update_offset, RngPurpose::ValidationLatents);
      const std::vector<at::Tensor> conditioning = encode_captions(*family, batch->captions, args.weighted_captions);
      for (int k = 0; k < points; ++k) {
        const NoisedBatch noised = objective->noise_at_validation_point(
            latents, k, keyed_randoms(validation_seed, key + k + 1, batch->update_offset, RngPurpose::ValidationNoise));
        const at::Tensor pred = family->predict(noised, conditioning).to(at::kFloat);
        std::optional<at::Tensor> mask;
        if (batch->alpha_masks.defined() && args.masked_loss) mask = batch->alpha_masks;
        if (latents.size(0) == 0) continue;  // an empty share of a short batch: it ran for the collectives only
        const double n = static_cast<double>(latents.size(0));
        sum += n * objective->loss(pred, noised, batch->loss_weights, mask).item<double>();
        count += latents.size(0);
      }
    }
    trained->set_training(true);
    const at::Tensor totals = torch::tensor({sum, static_cast<double>(count)}, at::TensorOptions(at::kDouble)).to(communicator->device());
    communicator->all_reduce(totals, ReduceOp::sum);
    return totals[1].item<double>() > 0 ? totals[0].item<double>() / totals[1].item<double>() : 0.0;
  };
  auto log_validation = [&](const char* which, double value, double train_average, int64_t step, int64_t epoch) {
    summary.validation_losses.emplace_back(step, value);
    spdlog::info("step {}: validation loss {:.6f} ({} average; training moving average {:.6f})", step, value, which, train_average);
    if (world.rank != 0) return;
    const std::string prefix = std::string("loss/validation/") + which;
    jsonl->write(step, epoch, {{prefix + "_average", value}, {prefix + "_divergence", value - train_average}});
    tensorboard->add_scalar(prefix + "_average", static_cast<float>(value), which == std::string("epoch") ? epoch : step);
    tensorboard->add_scalar(prefix + "_divergence", static_cast<float>(value - train_average), which == std::string("epoch") ? epoch : step);
  };

  // ---------------------------------------------------------------- the loop
  std::vector<std::pair<int64_t, double>> curve;
  ProgressBar progress(max_train_steps, position.global_step);
  double recent_sum = 0;
  for (double l : position.recent_losses) recent_sum += l;
  StepTimes window;  // since the last time-split log line
  const bool weighted = args.weighted_captions;
  const bool state_on_save = args.save_state;
  int64_t& global_step = position.global_step;
  for (int64_t epoch = position.epoch; epoch <= num_epochs && global_step < max_train_steps; ++epoch) {
    const int64_t first_batch = epoch == position.epoch ? position.epoch_step : 0;
    loader.start_epoch(epoch, first_batch, global_step);
    double accumulated = 0;
    StepTimes step_times;
    while (global_step < max_train_steps) {
      Clock::time_point phase = Clock::now();
      std::optional<TrainBatch> batch = loader.next();
      if (!batch) break;
      step_times.data += seconds_since(phase);
      phase = Clock::now();

      // The update's key for the random streams: the number of updates before it, the same on every rank and
      // every micro-step of the update.
      const int64_t update_key = global_step;
      const bool last_micro = batch->micro + 1 == batch->micros;
      const auto local_samples = static_cast<int64_t>(batch->captions.size());
      const bool empty_share = local_samples == 0;  // this rank's share of a short global batch
      at::Tensor loss;
      {
        AutocastScope autocast(precision.autocast);
        at::Tensor latents;
        if (latent_cache && !empty_share) {
          std::vector<LatentKey> keys;
          for (size_t i = 0; i < batch->image_paths.size(); ++i) {
            keys.push_back(latent_keys->key(batch->dataset, batch->image_paths[i], batch->flipped[i]));
          }
          LatentBatch cached = latent_cache->read_batch(keys);
          latents = cached.latents.to(at::kFloat);
          if (cached.alpha_masks.defined()) batch->alpha_masks = cached.alpha_masks;
        } else {
          const at::Tensor images =
              batch->images.defined() ? batch->images : at::empty({0, 3, batch->bucket.height, batch->bucket.width});
          latents = encode_latents(*family, images.to(precision.vae), vae_latents, seed, update_key, batch->update_offset,
                                   RngPurpose::Latents);
        }
        // The network's dropouts draw from the default generator, as kohya's do; it is keyed like every other stream
        // (here by this rank's first sample of the micro-step), so a resumed run draws the same masks.
        seed_default_generator(seed, update_key, batch->update_offset, RngPurpose::NetworkDropout);
        std::vector<at::Tensor> conditioning;
        {
          std::optional<torch::NoGradGuard> no_grad;
          if (!trained->trains_text_encoder()) no_grad.emplace();
          if (text_cache && !empty_share) {
            conditioning = family->text_encoder_outputs_caching_strategy().outputs_from_cache(text_cache->read_batch(batch->captions));
            for (at::Tensor& c : conditioning) c = c.to(at::kFloat);
          } else {
            conditioning = encode_captions(*family, batch->captions, weighted);
          }
        }
        const NoisedBatch noised =
            objective->noise(latents, keyed_randoms(seed, update_key, batch->update_offset, RngPurpose::Noise));
        const at::Tensor pred = family->predict(noised, conditioning).to(at::kFloat);
        std::optional<at::Tensor> mask;
        if (batch->alpha_masks.defined() && args.masked_loss) mask = batch->alpha_masks;
        // An empty share contributes nothing, but its backward still runs (sharded models gather in it).
        loss = empty_share ? pred.sum() * 0.0 : objective->loss(pred, noised, batch->loss_weights, mask);
      }
      step_times.forward += seconds_since(phase);
      phase = Clock::now();
      // Each rank's mean weighs by its share of the global batch (1 when the shares are equal), so N ranks compute the
      // gradient of the global batch's mean, as one process does; micro-steps weigh equally, as in kohya.
      const double share = static_cast<double>(local_samples * world.size) / static_cast<double>(batch->global_batch_size);
      at::Tensor scaled = loss * (share / static_cast<double>(batch->micros));
      if (precision.loss_scaling) scaled = scaled * scaler.scale;
      parallel.set_sync(last_micro);  // accumulation micro-steps only accumulate; the last one averages over ranks
      scaled.backward();
      step_times.backward += seconds_since(phase);
      accumulated += loss.item<double>() * static_cast<double>(local_samples) / static_cast<double>(batch->global_batch_size);
      phase = Clock::now();
      parallel.finish();
      if (!last_micro) {
        step_times.communication += seconds_since(phase);
        continue;
      }
      const bool last_of_epoch = batch->step + 1 == batches_per_epoch;

      // The logged loss is the update's: the mean over its micro-steps of each global batch's mean (each rank adds its
      // share). The same collective tells every rank whether any rank was asked to stop, so they all stop after it.
      const at::Tensor update_loss = torch::tensor({accumulated / static_cast<double>(batch->micros), stop_requested ? 1.0 : 0.0},
                                                   at::TensorOptions(at::kDouble))
                                         .to(communicator->device());
      communicator->all_reduce(update_loss, ReduceOp::sum);
      const double step_loss = update_loss[0].item<double>();
      const bool stop_now = update_loss[1].item<double>() > 0;
      step_times.communication += seconds_since(phase);

      phase = Clock::now();
      const bool finite = !precision.loss_scaling || parallel.unscale(scaler.scale);
      if (finite) {
        if (args.max_grad_norm > 0) parallel.clip_grad_norm(args.max_grad_norm);
        made.optimizer->step();
        parallel.after_step();
      } else {
        spdlog::warn("step {}: gradients overflowed at loss scale {}; skipping the update", global_step + 1, scaler.scale);
      }
      if (precision.loss_scaling) scaler.update(finite);
      made.optimizer->zero_grad();
      ++global_step;
      scheduler.set_step(global_step * world.size);
      trained->after_update(global_step);
      step_times.optimizer += seconds_since(phase);
      step_times.steps = 1;
      if (args.check_replicas_every_n_steps > 0 && global_step % args.check_replicas_every_n_steps == 0) {
        replica_checksum(trained->params(), *communicator);  // fails on every rank alike, naming the diverged ranks
      }

      accumulated = 0;
      summary.losses.push_back(step_loss);
      curve.emplace_back(global_step, step_loss);
      position.recent_losses.push_back(step_loss);
      recent_sum += step_loss;
      if (static_cast<int64_t>(position.recent_losses.size()) > updates_per_epoch) {
        recent_sum -= position.recent_losses.front();
        position.recent_losses.erase(position.recent_losses.begin());
      }
      for (StepTimes* t : {&summary.times, &window}) {
        t->data += step_times.data;
        t->forward += step_times.forward;
        t->backward += step_times.backward;
        t->communication += step_times.communication;
        t->optimizer += step_times.optimizer;
        t->steps += 1;
      }
      step_times = StepTimes{};
      if (args.log_time_every_n_steps > 0 && global_step % args.log_time_every_n_steps == 0) {
        log_times(window, *communicator, "the last steps");
        window = StepTimes{};
      }

      position.epoch = epoch;
      position.epoch_step = batch->step + 1;
      if (last_of_epoch) {
        position.epoch = epoch + 1;
        position.epoch_step = 0;
      }
      const double average = recent_sum / static_cast<double>(position.recent_losses.size());
      const double lr = made.optimizer->param_groups().at(0).options().get_lr();
      if (world.rank == 0) {
        progress.update(global_step, average, lr);
        std::map<std::string, double> metrics = {{"loss", step_loss}, {"avr_loss", average}, {"lr", lr}};
        if (precision.loss_scaling) metrics["loss_scale"] = scaler.scale;
        jsonl->write(global_step, epoch, metrics);
        tensorboard->add_scalar("loss/current", static_cast<float>(step_loss), global_step);
        tensorboard->add_scalar("loss/average", static_cast<float>(average), global_step);
        tensorboard->add_scalar("lr/group0", static_cast<float>(lr), global_step);
      }
      if (args.save_every_n_steps && global_step % *args.save_every_n_steps == 0 && global_step < max_train_steps) {
        const int64_t every = *args.save_every_n_steps;
        const std::string name = fmt::format("{}-step{:08d}", output_name, global_step);
        on_rank0_with_whole_models(weights_sharded, [&] {
          summary.weights_path = save_weights(name, global_step, epoch);
          if (auto r = step_to_remove(global_step, every, args.save_last_n_steps, false)) {
            remove_saved(fmt::format("{}-step{:08d}", output_name, *r), false);
          }
        });
        if (state_on_save) {
          save_state(name);
          const std::optional<int64_t> keep = args.save_last_n_steps_state ? args.save_last_n_steps_state : args.save_last_n_steps;
          if (auto r = step_to_remove(global_step, every, keep, true)) remove_saved(fmt::format("{}-step{:08d}", output_name, *r), true);
        }
      }
      if (!prompts.empty() && args.sample_every_n_steps && global_step % *args.sample_every_n_steps == 0) {
        on_rank0_with_whole_models(true, [&] { sample_images(global_step, std::nullopt); });
      }
      if (validation_loader && args.validate_every_n_steps && global_step % *args.validate_every_n_steps == 0) {
        log_validation("step", validate(), average, global_step, epoch);
      }
      if (stop_now && global_step < max_train_steps) {
        spdlog::warn("step {}: asked to stop (SIGUSR1/SIGTERM); saving the state and stopping", global_step);
        save_state(fmt::format("{}-step{:08d}", output_name, global_step));
        summary.interrupted = true;
        break;
      }
    }
    if (summary.interrupted) break;
    if (validation_loader && (!args.validate_every_n_epochs || epoch % *args.validate_every_n_epochs == 0)) {
      const double average = position.recent_losses.empty() ? 0.0 : recent_sum / static_cast<double>(position.recent_losses.size());
      log_validation("epoch", validate(), average, global_step, epoch);
    }
    if (epoch < num_epochs && args.save_every_n_epochs && epoch % *args.save_every_n_epochs == 0) {
      const int64_t every = *args.save_every_n_epochs;
      on_rank0_with_whole_models(weights_sharded, [&] {
        summary.weights_path = save_weights(fmt::format("{}-{:06d}", output_name, epoch), global_step, epoch);
        if (args.save_last_n_epochs && epoch - every * *args.save_last_n_epochs > 0) {
          remove_saved(fmt::format("{}-{:06d}", output_name, epoch - every * *args.save_last_n_epochs), false);
        }
      });
      if (state_on_save) {
        save_state(fmt::format("{}-{:06d}", output_name, epoch));
        const std::optional<int64_t> keep = args.save_last_n_epochs_state ? args.save_last_n_epochs_state : args.save_last_n_epochs;
        if (keep && epoch - every * *keep > 0) remove_saved(fmt::format("{}-{:06d}", output_name, epoch - every * *keep), true);
      }
    }
    if (!prompts.empty() && epoch < num_epochs && args.sample_every_n_epochs && epoch % *args.sample_every_n_epochs == 0) {
      on_rank0_with_whole_models(true, [&] { sample_images(global_step, epoch); });
    }
  }
  summary.steps = global_step;
  log_times(summary.times, *communicator, "the run");
  summary.planned_bytes = memory_plan.total();
  summary.peak_bytes = CpuTensorMeter::peak_bytes() - bytes_before_run;
  spdlog::info("rank {}: peak CPU tensor memory {:.1f} MiB; the plan's {:.1f} MiB and {:.1f} MiB of activations, data and "
               "transients",
               world.rank, static_cast<double>(summary.peak_bytes) / 1048576.0, static_cast<double>(summary.planned_bytes) / 1048576.0,
               static_cast<double>(summary.peak_bytes - summary.planned_bytes) / 1048576.0);
  if (summary.interrupted) return summary;
  if (run_cache_dir || run_text_cache_dir) {
    latent_cache.reset();
    text_cache.reset();
    communicator->barrier();  // every rank has stopped reading
    if (world.rank == 0) {
      if (run_cache_dir) fs::remove_all(*run_cache_dir);
      if (run_text_cache_dir) fs::remove_all(*run_text_cache_dir);
    }
  }
  if (args.save_state || args.save_state_on_train_end) save_state(output_name);
  const bool sample_at_end = !prompts.empty() && (args.sample_every_n_epochs || args.sample_every_n_steps);
  on_rank0_with_whole_models(weights_sharded || sample_at_end, [&] {
    progress.finish();
    tensorboard->flush();
    summary.weights_path = save_weights(output_name, global_step, num_epochs);
    write_loss_curve_png((output_dir / (output_name + "_loss.png")).string(), curve, output_name + ": loss per step");
    if (sample_at_end) sample_images(global_step, num_epochs);
  });
  return summary;
}

}  // namespace sdt
