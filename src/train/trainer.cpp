#include "src/train/trainer.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/DeviceAccelerator.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <chrono>
#include <cmath>
#include <csignal>
#include <ctime>
#include <filesystem>
#include <functional>
#include <mutex>
#include <random>
#include <set>

#include <fmt/ranges.h>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>
#include <torch/torch.h>

#include "src/core/dataset_config.h"
#include "src/core/device.h"
#include "src/core/error.h"
#include "src/core/text.h"
#include "src/data/chart.h"
#include "src/data/loader.h"
#include "src/data/rng.h"
#include "cluster/communicator.h"
#include "src/cache/build_cache.h"
#include "src/cache/latent_cache.h"
#include "src/cache/text_encoder_cache.h"
#include "src/families/family.h"
#include "src/models/fp8.h"
#include "src/networks/lora_metadata.h"
#include "src/objectives/objective.h"
#include "src/parallel/block_engine.h"
#include "src/parallel/data_parallel.h"
#include "src/parallel/memory_plan.h"
#include "src/train/dataset_metadata.h"
#include "src/train/fused_steps.h"
#include "src/train/lr_schedule.h"
#include "src/train/make_optimizer.h"
#include "src/train/metrics.h"
#include "src/train/precision.h"
#include "src/train/sai_model_spec.h"
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

// The default generator of the device that computes (a LoRA's dropouts draw from it, as kohya's do), keyed like every
// other stream. A GPU's generator is a different algorithm from the CPU's: its masks differ from a CPU run's.
void seed_default_generator(c10::Device device, uint64_t seed, int64_t update, int64_t place, RngPurpose purpose) {
  Rng rng(seed, static_cast<uint64_t>(update), static_cast<uint64_t>(place), purpose);
  at::Generator generator = at::globalContext().defaultGenerator(device);
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
Conditioning encode_captions(const Family& family, const std::vector<std::string>& captions, bool weighted) {
  if (!captions.empty()) return family.text_encoding_strategy().encode(family.tokenize_strategy().tokenize(captions, weighted));
  Conditioning placeholder = family.text_encoding_strategy().encode(family.tokenize_strategy().tokenize({""}, false));
  for (auto& [name, c] : placeholder) c = c.narrow(0, 0, 0);
  return placeholder;
}

// The conditioning a family takes from where the batch's images came from (SDXL's size conditioning), as kohya's
// dataset reports it: whole pixels, the crop's left already mirrored for a flipped image.
Conditioning image_conditioning(const Family& family, const TrainBatch& batch, c10::Device device) {
  std::vector<ImageGeometry> images;
  for (size_t i = 0; i < batch.captions.size(); ++i) {
    const Resolution& original = batch.original_sizes.at(i);
    const CropLtrb& crop = batch.crop_ltrbs.at(i);
    images.push_back({original.height, original.width, static_cast<int64_t>(crop.top), static_cast<int64_t>(crop.left),
                      batch.bucket.height, batch.bucket.width});
  }
  Conditioning conditioning = family.image_conditioning(images);
  for (auto& [name, c] : conditioning) c = c.to(device);
  return conditioning;
}

std::string timestamp(const char* format) {
  const std::time_t now = std::time(nullptr);
  char buf[32];
  std::strftime(buf, sizeof(buf), format, std::localtime(&now));
  return buf;
}

void check_supported(const TrainArgs& args, TrainMode mode) {
  if (mode == TrainMode::network && !args.network_module) {
    fail("--network_module", "required: kohya's network module for the family (networks.lora; FLUX: networks.lora_flux), or "
         "train the whole model with `sdt train_db`, `sdt sdxl_train` or `sdt flux_train`");
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
  // kohya flags whose effect sdt does not have: refused by name rather than accepted and ignored.
  if (args.deepspeed) {
    fail("--deepspeed", "sdt shards without DeepSpeed: --sharding optimizer | gradients | full are ZeRO stages 1, 2 and 3");
  }
  if (args.dataset_class) fail("--dataset_class", "a Python dataset class cannot run in sdt; describe the data with --dataset_config");
  if (args.huggingface_repo_id || args.save_state_to_huggingface || args.resume_from_huggingface) {
    fail(args.huggingface_repo_id ? "--huggingface_repo_id" : args.save_state_to_huggingface ? "--save_state_to_huggingface"
                                                                                               : "--resume_from_huggingface",
         "uploading to and resuming from the Hugging Face Hub is not built in sdt; the files are written to --output_dir");
  }
  if (args.log_with && *args.log_with != "tensorboard") {
    fail("--log_with", "'{}': sdt writes TensorBoard event files and JSON lines (see --logging_dir); Weights & Biases is not built", *args.log_with);
  }
  if (args.initial_epoch || args.initial_step || args.skip_until_initial_step) {
    fail(args.initial_step ? "--initial_step" : args.initial_epoch ? "--initial_epoch" : "--skip_until_initial_step",
         "starting the schedule at a chosen step is not built in sdt; --resume continues a run where it stopped");
  }
  if (args.gradient_accumulation_steps < 1) fail("--gradient_accumulation_steps", "must be at least 1");
  if (args.train_batch_size < 1) fail("--train_batch_size", "must be at least 1, got {}", args.train_batch_size);
  if (!args.max_train_epochs && args.max_train_steps < 1) {  // --max_train_epochs, when given, sets the steps
    fail("--max_train_steps", "must be at least 1, got {}", args.max_train_steps);
  }
  if (args.max_train_epochs && *args.max_train_epochs < 1) fail("--max_train_epochs", "must be at least 1, got {}", *args.max_train_epochs);
  if (args.learning_rate < 0) fail("--learning_rate", "must be 0 or more, got {}", args.learning_rate);
  if (mode == TrainMode::network) {
    if (args.network_dim && *args.network_dim < 1) fail("--network_dim", "must be at least 1, got {}", *args.network_dim);
    if (args.network_train_unet_only && args.network_train_text_encoder_only) {
      fail("--network_train_unet_only", "and --network_train_text_encoder_only together leave nothing to train; choose one");
    }
  }
  parse_sharding(args.sharding);
  if (args.blocks_to_swap && *args.blocks_to_swap < 0) fail("--blocks_to_swap", "must be 0 or more, got {}", *args.blocks_to_swap);
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


// ---------------------------------------------------------------- the trainer

// One run of kohya's train_network.py / train_db.py loop, on this rank. The constructor sets everything up (models,
// what is trained, data parallelism, optimizer, data, caches, outputs, the resumed position); run() trains; step()
// is one micro-step of it.
class Trainer {
 public:
  Trainer(const TrainArgs& args, const World& world, TrainMode mode);
  TrainSummary run();

 private:
  // ---- the step
  void step(TrainBatch& batch, StepTimes& times);
  at::Tensor batch_latents(TrainBatch& batch, int64_t update_key) const;
  Conditioning batch_conditioning(const TrainBatch& batch) const;
  [[noreturn]] void stop_on_non_finite_loss(const TrainBatch& batch, double loss) const;
  [[noreturn]] void stop_on_out_of_memory(const c10::OutOfMemoryError& e) const;
  std::optional<at::Tensor> loss_mask(const TrainBatch& batch) const;
  double optimizer_update(StepTimes& times, bool& stop_now);
  double validation_loss();
  // ---- bookkeeping and outputs
  void record_update(double loss, const TrainBatch& batch, int64_t epoch, StepTimes& times);
  void outputs_after_update(int64_t epoch);
  void outputs_after_epoch(int64_t epoch);
  void finish();
  std::string save_weights(const std::string& name, int64_t epoch);
  void save_state(const std::string& name);
  void remove_saved(const std::string& name, bool is_state) const;
  void sample_images(std::optional<int64_t> epoch);
  void log_validation(const char* which, double value, int64_t epoch);
  void on_rank0_with_whole_models(bool reads_sharded_weights, const std::function<void()>& work);
  double average_loss() const;
  // ---- set-up
  void load_models(TrainMode mode);
  std::unique_ptr<BlockEngine> make_block_engine(Sharding sharding);
  void set_up_data();
  void set_up_caches();
  void set_up_outputs();

  const TrainArgs& args_;
  const World& world_;
  c10::Device device_{c10::kCPU};  // where this rank computes (--device)
  std::unique_ptr<Communicator> communicator_;
  std::optional<std::string> resume_dir_;
  uint64_t seed_ = 0;
  Precision precision_;
  std::unique_ptr<Family> family_;
  std::unique_ptr<TrainingObjective> objective_;
  std::unique_ptr<TrainedModel> trained_;
  std::unique_ptr<DataParallel> parallel_;
  MadeOptimizer made_;
  std::unique_ptr<FusedSteps> fused_;  // --fused_backward_pass / --fused_optimizer_groups: steps inside backward
  LossScaler scaler_;
  DataParallel::MemoryPlan memory_plan_;
  std::map<std::string, double> update_logs_;  // what the trained model reported of the last update (GGPO's norms)
  int64_t bytes_before_run_ = 0;

  DatasetBlueprint blueprint_;
  std::vector<DatasetIndex> indexes_;
  uint64_t validation_seed_ = 0;
  int64_t num_train_images_ = 0, num_reg_images_ = 0, num_validation_images_ = 0;
  std::unique_ptr<BatchPlanner> planner_;
  int64_t batches_per_epoch_ = 0, updates_per_epoch_ = 0, samples_per_update_ = 0;
  int64_t max_train_steps_ = 0, num_epochs_ = 0;
  std::optional<int64_t> save_every_n_epochs_;  // --save_every_n_epochs, or kohya's from --save_n_epoch_ratio
  std::set<int> encoded_each_step_;  // with cached text-encoder outputs: the trained encoders whose part is encoded
  std::unique_ptr<LrScheduler> scheduler_;
  LoaderOptions loader_options_;
  std::unique_ptr<DataLoader> loader_;
  DatasetBlueprint validation_blueprint_;
  std::vector<DatasetIndex> validation_indexes_;
  std::unique_ptr<BatchPlanner> validation_planner_;
  std::unique_ptr<DataLoader> validation_loader_;

  LatentSampling vae_latents_ = LatentSampling::sample;
  std::unique_ptr<LatentCacheReader> latent_cache_;
  std::optional<LatentKeyIndex> latent_keys_;
  std::unique_ptr<TextEncoderCacheReader> text_cache_;
  std::vector<fs::path> run_cache_dirs_;  // --cache_latents / --cache_text_encoder_outputs: removed at the end

  fs::path output_dir_;
  std::string output_name_;
  std::unique_ptr<TensorBoardWriter> tensorboard_;
  std::unique_ptr<JsonlWriter> jsonl_;
  std::vector<SamplePrompt> prompts_;
  LoRATrainingMetadata meta_;

  RunPosition position_;
  double accumulated_ = 0;  // this rank's share of the current update's loss (the mean of its micro-steps')
  double recent_sum_ = 0;   // of position_.recent_losses
  StepTimes window_;        // since the last time-split log line
  std::vector<std::pair<int64_t, double>> curve_;
  std::unique_ptr<ProgressBar> progress_;
  TrainSummary summary_;
  TrainMode mode_;
  const char* phase_ = "set-up";  // the part of the step running now, for an out-of-memory message
};

Trainer::Trainer(const TrainArgs& args, const World& world, TrainMode mode) : args_(args), world_(world), mode_(mode) {
  check_supported(args, mode);
  // Every CPU tensor's bytes are counted from here, so the run's peak can be set against its memory plan.
  CpuTensorMeter::install();
  CpuTensorMeter::reset_peak();
  bytes_before_run_ = CpuTensorMeter::live_bytes();
  device_ = select_device(args.device, world.local_rank);
  spdlog::info("rank {} computes on {}", world.rank, device_.str());
  if (device_.is_cuda()) at::accelerator::resetPeakStats(device_.index());
  // kohya's --ddp_timeout, in minutes: how long a collective may wait for a stalled rank before the job ends.
  communicator_ = make_communicator(world, device_,
                                    args.ddp_timeout ? std::chrono::minutes(*args.ddp_timeout) : kDefaultCollectiveTimeout);
  resume_dir_ = args.resume;
  if (resume_dir_ == "latest") {
    const std::optional<fs::path> newest = newest_state(*args.output_dir);
    resume_dir_ = newest ? std::optional<std::string>(newest->string()) : std::nullopt;
    spdlog::info("--resume latest: {}", newest ? newest->string() : "no state in " + *args.output_dir + " yet, starting from the beginning");
  }
  // A resumed run keeps its seed: the data order, augmentations and noise all derive from it.
  seed_ = args.seed ? static_cast<uint64_t>(*args.seed) : std::random_device{}();
  if (resume_dir_) {
    const uint64_t saved = read_state_json(*resume_dir_).at("sdt").at("seed").get<uint64_t>();
    if (args.seed && saved != seed_) spdlog::warn("--seed {} differs from the resumed run's seed {}; using {}", seed_, saved, saved);
    seed_ = saved;
  }
  std::signal(SIGUSR1, request_stop);
  std::signal(SIGTERM, request_stop);
  spdlog::info("seed {}", seed_);
  precision_ = precision_from_args(args);
  if (precision_.fp8_text_encoders && !device_.is_cuda()) {
    precision_.fp8_text_encoders = false;  // kohya casts no text encoder on the CPU either
    spdlog::info("--fp8_base: the text encoders stay in {} on the CPU, as in kohya", c10::toString(precision_.frozen));
  }
  load_models(mode);
  set_up_data();
  if (resume_dir_) {
    position_ = load_train_state(*resume_dir_, *trained_, *made_.optimizer, *parallel_, samples_per_update_, scaler_);
    spdlog::info("resumed from {} at step {} (epoch {}, batch {})", *resume_dir_, position_.global_step, position_.epoch,
                 position_.epoch_step);
  }
  // kohya's schedule spans max_train_steps x processes and Accelerate advances it once per process at each
  // update, so on N ranks it sits at step N x global_step (an integer warm-up is thus N times shorter, as in kohya).
  scheduler_->set_step(position_.global_step * world.size);
  set_up_caches();
  set_up_outputs();
}

namespace {

// The dtype the family's models are read in: the frozen weights' when every model is used in it (a network's base
// models with the VAE in it too, or full fine-tuning at --full_bf16 / --full_fp16), so no model is ever held in fp32
// on its way to that dtype; else fp32.
WeightsDtype read_dtype(const Precision& precision, TrainMode mode) {
  const bool all_frozen_dtype = precision.vae == precision.frozen && (mode == TrainMode::network || precision.trained == precision.frozen);
  if (!all_frozen_dtype || precision.frozen == at::kFloat) return WeightsDtype::float32;
  return precision.frozen == at::kBFloat16 ? WeightsDtype::bfloat16 : WeightsDtype::float16;
}

// Whether the denoiser's blocks run through a block engine: their weights sharded over the ranks or swapped.
bool runs_block_engine(const TrainArgs& args) {
  return parse_sharding(args.sharding) == Sharding::full || args.blocks_to_swap.value_or(0) > 0;
}

}  // namespace

// The models, what is trained, data parallelism in the chosen --sharding mode, the optimizer and the memory plan.
void Trainer::load_models(TrainMode mode) {
  FamilyOptions options = family_options_from_args(args_);
  options.weights_dtype = read_dtype(precision_, mode);
  // The engine reads each rank's part of the blocks' weights itself, unless --base_weights must first merge into them.
  options.defer_block_weights = runs_block_engine(args_) && args_.base_weights.empty();
  family_ = load_family(family_of_checkpoint(args_.family, options.pretrained_model_name_or_path), options);
  const ModelBundle& bundle = family_->models();
  if (precision_.fp8_denoiser && !device_.is_cuda()) {
    const std::string obstacle = fp8_cpu_obstacle(*bundle.denoiser);
    if (!obstacle.empty()) fail(args_.fp8_base ? "--fp8_base" : "--fp8_base_unet", "{} cannot run in fp8 on the CPU: {}", family_->name(), obstacle);
  }
  std::vector<std::shared_ptr<torch::nn::Module>> all_models{bundle.denoiser, bundle.vae};
  all_models.insert(all_models.end(), bundle.text_encoders.begin(), bundle.text_encoders.end());
  for (const auto& m : all_models) {
    m->eval();
    for (auto& p : m->parameters()) p.requires_grad_(false);
  }
  family_->set_gradient_checkpointing(args_.gradient_checkpointing);
  objective_ = family_->make_objective(args_);
  at::Generator init = at::make_generator<at::CPUGeneratorImpl>(seed_);  // a network's initial weights
  trained_ = make_trained_model(mode, args_, *family_, precision_, init);
  bundle.vae->to(precision_.vae);

  // The block engine takes its blocks' weights first, from the host: those it swaps stay there, the rest go to the
  // device (a rank's shard under full sharding). Then everything else moves, so the whole model is never on the device.
  const Sharding sharding = parse_sharding(args_.sharding);
  std::unique_ptr<BlockEngine> engine = make_block_engine(sharding);
  bundle.denoiser->to(device_);
  bundle.vae->to(device_);
  for (const auto& encoder : bundle.text_encoders) encoder->to(device_);
  trained_->to(device_);

  // Data parallel: rank 0's trained weights go to every rank, then each backward's gradients are averaged over the
  // ranks while backward runs (one process: no communication at all); --sharding cuts the optimizer state and the
  // gradients into one shard per rank, and the optimizer steps this rank's shards.
  parallel_ = std::make_unique<DataParallel>(trained_->groups(), *communicator_, sharding, args_.ddp_bucket_mb * 1024 * 1024,
                                             std::move(engine));
  made_ = make_optimizer(args_, parallel_->optimizer_groups());
  parallel_->check_optimizer(made_.optimizer->kind());
  if (FusedSteps::requested(args_)) {
    fused_ = std::make_unique<FusedSteps>(*made_.optimizer, parallel_->optimizer_groups(), args_, precision_.loss_scaling);
    parallel_->set_on_gradient([this](at::Tensor& tensor) { fused_->on_gradient(tensor); }, FusedSteps::flag(args_));
  }

  int64_t frozen_bytes = 0;
  std::set<const void*> trained_storage;
  const std::vector<at::Tensor> trained_params = trained_->params();
  for (const auto& p : trained_params) trained_storage.insert(p.unsafeGetTensorImpl());
  for (const auto& m : all_models) {
    for (const auto& p : m->parameters()) {
      if (!trained_storage.contains(p.unsafeGetTensorImpl())) frozen_bytes += p.numel() * static_cast<int64_t>(p.element_size());
    }
  }
  const int64_t element = trained_params.empty() ? 4 : static_cast<int64_t>(trained_params.front().element_size());
  memory_plan_ = parallel_->plan_memory(frozen_bytes, optimizer_bytes_per_element(made_.optimizer->kind(), element));
  // Fused steps free each group's gradients as it steps: in one process only the largest group's are held whole
  // (with several ranks the reducer's buckets hold them all, as DDP's do).
  if (fused_ && world_.size == 1) memory_plan_.gradients = fused_->largest_group_bytes();
  if (world_.rank == 0) spdlog::info("{}", DataParallel::describe(memory_plan_, sharding, world_.size));
}

// The family's blocks in a BlockEngine when their weights are not all resident: --sharding full keeps 1/N of each
// block's weights on a rank, trained or frozen, and --blocks_to_swap keeps some on the host, as the family's parallel
// plan allows. The denoiser then runs its blocks through the engine. The LoRA weights stay whole; they act on the
// forward of whatever weights a block holds. Null when neither is asked for.
std::unique_ptr<BlockEngine> Trainer::make_block_engine(Sharding sharding) {
  if (!runs_block_engine(args_)) return nullptr;
  const ParallelPlan plan = family_->parallel_plan();
  const int64_t blocks_to_swap = args_.blocks_to_swap.value_or(0);
  BlockEngineOptions options{.sharding = sharding == Sharding::full ? Sharding::full : Sharding::none,
                             .read_deferred = plan.deferred_weights};
  if (blocks_to_swap > 0) options.swap = plan.swapped(blocks_to_swap);
  // Trained fp32 blocks under mixed precision are gathered in the autocast dtype (FSDP's param_dtype).
  if (trained_->trains_denoiser_weights() && precision_.autocast && precision_.trained == at::kFloat) {
    options.compute_dtype = precision_.autocast;
  }
  auto engine = std::make_unique<BlockEngine>(plan.blocks, trained_->kept_whole(), *communicator_, options);
  family_->set_block_runner(engine.get());
  return engine;
}

// The datasets, the batch plan (global batches of batch x ranks, split into micro-steps), the lr schedule, the
// loader, and the held-out images of validation.
void Trainer::set_up_data() {
  blueprint_ = resolve_dataset_config(args_);
  validation_seed_ = args_.validation_seed ? static_cast<uint64_t>(*args_.validation_seed) : seed_;
  indexes_ = index_datasets(blueprint_, {.skip_bad_images = args_.skip_bad_images, .part = DatasetPart::training,
                                         .validation_seed = validation_seed_});
  std::vector<LoaderDataset> loader_datasets;
  for (size_t i = 0; i < indexes_.size(); ++i) {
    loader_datasets.push_back({&blueprint_.datasets[i], &indexes_[i]});
    num_train_images_ += indexes_[i].num_train_images;
    num_reg_images_ += indexes_[i].num_reg_images;
  }
  const int64_t accumulation = args_.gradient_accumulation_steps;
  planner_ = std::make_unique<BatchPlanner>(indexes_, blueprint_, world_.size, seed_, accumulation);
  batches_per_epoch_ = planner_->steps_per_epoch();
  updates_per_epoch_ = planner_->updates_per_epoch();
  for (const auto& d : blueprint_.datasets) samples_per_update_ = std::max(samples_per_update_, d.batch_size * world_.size * accumulation);
  if (world_.rank == 0) {
    const int64_t global_batch = samples_per_update_ / accumulation;
    std::string shares;
    for (int r = 0; r < world_.size; ++r) {
      shares += fmt::format("{}{}", r ? ", " : "", global_batch * (r + 1) / world_.size - global_batch * r / world_.size);
    }
    spdlog::info("{} ranks on {} nodes; global batch {} = batch {} x {} ranks, x {} accumulation steps = {} samples per "
                 "update; rank shares of each global batch: {}",
                 world_.size, world_.node_count, global_batch, global_batch / world_.size, world_.size, accumulation,
                 samples_per_update_, shares);
  }
  max_train_steps_ = args_.max_train_epochs ? *args_.max_train_epochs * updates_per_epoch_ : args_.max_train_steps;
  num_epochs_ = (max_train_steps_ + updates_per_epoch_ - 1) / updates_per_epoch_;
  save_every_n_epochs_ = args_.save_every_n_epochs;
  if (args_.save_n_epoch_ratio && *args_.save_n_epoch_ratio > 0) {  // kohya: floor(epochs / ratio), at least 1
    save_every_n_epochs_ = std::max<int64_t>(1, num_epochs_ / *args_.save_n_epoch_ratio);
  }
  spdlog::info("{} training images with repeats, {} regularization; {} batches per epoch, {} optimizer steps per epoch, "
               "{} steps over {} epochs",
               num_train_images_, num_reg_images_, batches_per_epoch_, updates_per_epoch_, max_train_steps_, num_epochs_);
  TrainArgs schedule_args = args_;
  schedule_args.max_train_steps = max_train_steps_;
  scheduler_ = std::make_unique<LrScheduler>(*made_.optimizer, make_lr_schedule(schedule_args, world_.size, made_.uses_adafactor_schedule));

  loader_options_.seed = seed_;
  loader_options_.pin_memory = device_.is_cuda();  // pinned batches copy to the GPU without a staging copy, async
  loader_options_.rank = world_.rank;
  loader_options_.world_size = world_.size;
  loader_options_.workers = static_cast<int>(args_.max_data_loader_n_workers);
  loader_options_.queue_depth = 2 * std::max<int>(1, static_cast<int>(args_.max_data_loader_n_workers));
  loader_options_.max_train_steps = max_train_steps_;
  LoaderOptions train_loader_options = loader_options_;
  train_loader_options.load_pixels = !(args_.cache_latents || args_.cache_latents_to_disk);
  loader_ = std::make_unique<DataLoader>(loader_datasets, *planner_, train_loader_options);

  // The held-out images (--validation_split or the datasets' validation_split), in a fixed order.
  std::vector<DatasetIndex> parts = index_datasets(
      blueprint_, {.skip_bad_images = args_.skip_bad_images, .part = DatasetPart::validation, .validation_seed = validation_seed_});
  for (size_t i = 0; i < parts.size(); ++i) {
    if (parts[i].images.empty()) continue;
    validation_blueprint_.datasets.push_back(blueprint_.datasets[i]);
    validation_indexes_.push_back(std::move(parts[i]));
  }
  std::vector<LoaderDataset> validation_datasets;
  for (size_t i = 0; i < validation_indexes_.size(); ++i) {
    validation_datasets.push_back({&validation_blueprint_.datasets[i], &validation_indexes_[i]});
    num_validation_images_ += validation_indexes_[i].num_train_images;
  }
  if (!validation_datasets.empty()) {
    validation_planner_ = std::make_unique<BatchPlanner>(validation_indexes_, validation_blueprint_, world_.size, validation_seed_);
    validation_loader_ = std::make_unique<DataLoader>(validation_datasets, *validation_planner_, loader_options_);
    spdlog::info("{} validation images, {} validation batches", num_validation_images_, validation_planner_->steps_per_epoch());
  }
}

// --cache_latents_to_disk: the HDF5 latent cache in the cache folder (made by `sdt cache-latents`, or here, every rank
// encoding its share, then waiting until all shares are in); --cache_latents: the same, in a folder of the run that is
// deleted at the end. Training then reads each rank's items from it and loads no pixels. The text-encoder outputs
// likewise (--cache_text_encoder_outputs(_to_disk)), by processed caption.
void Trainer::set_up_caches() {
  vae_latents_ = args_.vae_latents == "mean" ? LatentSampling::mean : LatentSampling::sample;
  auto cache_options = [&](bool to_disk, const char* run_folder, const char* flag, const char* what) {
    CacheOptions options;
    if (to_disk) {
      options.cache_dir = default_cache_dir(args_);
    } else {
      run_cache_dirs_.push_back(fs::path(*args_.output_dir) / run_folder);
      options.cache_dir = run_cache_dirs_.back().string();
    }
    if (options.cache_dir.empty()) fail(flag, "no cache folder: give --train_data_dir or --dataset_config");
    options.on_progress = cache_progress_line(what, world_);
    return options;
  };
  if (args_.cache_latents || args_.cache_latents_to_disk) {
    const CacheOptions options = cache_options(args_.cache_latents_to_disk, ".sdt_latent_cache", "--cache_latents_to_disk", "caching latents");
    const CacheBuildSummary built = build_latent_cache(*family_, args_, options, blueprint_, indexes_, world_);
    wait_for_latent_cache(*family_, args_, options, blueprint_, indexes_, 7 * 24 * 3600.0);
    latent_cache_ = std::make_unique<LatentCacheReader>(options.cache_dir, latent_cache_identity(*family_, options));
    latent_keys_.emplace(blueprint_, indexes_);
    spdlog::info("latents from the cache {} ({} entries; {} were valid, {} encoded by this rank)", options.cache_dir,
                 latent_cache_->size(), built.valid_before, built.encoded);
  }
  if (args_.cache_text_encoder_outputs || args_.cache_text_encoder_outputs_to_disk) {
    // kohya's partial cache: a trained encoder whose part of the conditioning comes alone (FLUX's CLIP-L) encodes
    // every step, the others' outputs come from the cache.
    const std::set<int> trained = trained_->trained_text_encoders();
    if (!trained.empty() && !family_->text_encoding_strategy().encodes_alone(trained)) {
      fail("--cache_text_encoder_outputs", "the text encoder is trained, so its outputs change every step: add "
                                           "--network_train_unet_only, or do not cache them");
    }
    encoded_each_step_ = trained;
    const CacheOptions options = cache_options(args_.cache_text_encoder_outputs_to_disk, ".sdt_text_encoder_cache",
                                               "--cache_text_encoder_outputs_to_disk", "caching text-encoder outputs");
    build_text_encoder_cache(*family_, args_, options, blueprint_, indexes_, world_);
    wait_for_text_encoder_cache(*family_, args_, options, blueprint_, indexes_, 7 * 24 * 3600.0);
    text_cache_ = std::make_unique<TextEncoderCacheReader>(options.cache_dir, text_encoder_cache_identity(*family_, args_, options));
    spdlog::info("text-encoder outputs from the cache {} ({} captions)", options.cache_dir, text_cache_->size());
  }
}

// The output folder, logs (rank 0 alone writes files), sample prompts and kohya's ss_* metadata.
void Trainer::set_up_outputs() {
  output_dir_ = *args_.output_dir;
  fs::create_directories(output_dir_);
  output_name_ = args_.output_name.value_or("last");
  const std::string log_dir = args_.logging_dir.value_or((output_dir_ / "logs").string());
  if (world_.rank == 0) {
    tensorboard_ = std::make_unique<TensorBoardWriter>(log_dir);
    jsonl_ = std::make_unique<JsonlWriter>((fs::path(log_dir) / "metrics.jsonl").string());
  }
  if (args_.sample_prompts) prompts_ = load_sample_prompts(*args_.sample_prompts);

  const double now = std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
  meta_.training_started_at = python_str(now);
  meta_.output_name = output_name_;
  meta_.learning_rate = python_str(args_.learning_rate);
  meta_.text_encoder_lr = python_str(args_.text_encoder_lr.empty() ? std::nullopt : std::optional<double>(args_.text_encoder_lr[0]));
  meta_.unet_lr = python_str(args_.unet_lr);
  meta_.num_train_images = python_str(num_train_images_);
  meta_.num_reg_images = python_str(num_reg_images_);
  meta_.num_validation_images = python_str(num_validation_images_);
  meta_.validation_seed = python_str(args_.validation_seed);
  meta_.validation_split = python_str(args_.validation_split);
  meta_.max_validation_steps = python_str(args_.max_validation_steps);
  meta_.validate_every_n_steps = python_str(args_.validate_every_n_steps);
  meta_.validate_every_n_epochs = python_str(args_.validate_every_n_epochs);
  meta_.num_batches_per_epoch = python_str(batches_per_epoch_);
  meta_.num_epochs = python_str(num_epochs_);
  meta_.gradient_checkpointing = python_str(args_.gradient_checkpointing);
  meta_.gradient_accumulation_steps = python_str(args_.gradient_accumulation_steps);
  meta_.max_train_steps = python_str(max_train_steps_);
  meta_.lr_scheduler = args_.lr_scheduler;
  meta_.network_dim = python_str(args_.network_dim.value_or(4));  // kohya's create_network default
  meta_.network_alpha = python_str(args_.network_alpha);
  meta_.network_dropout = python_str(args_.network_dropout);
  meta_.mixed_precision = args_.mixed_precision;
  meta_.full_fp16 = python_str(args_.full_fp16);
  meta_.base_model = family_->training_metadata();
  meta_.dataset = kohya_dataset_metadata(blueprint_, indexes_, args_, world_.size);
  if (!args_.network_args.empty()) {
    nlohmann::ordered_json network_args = nlohmann::ordered_json::object();  // kohya's net_kwargs: key -> value string
    for (const std::string& arg : args_.network_args) {
      const auto eq = arg.find('=');
      network_args[trim(arg.substr(0, eq))] = eq == std::string::npos ? "" : trim(arg.substr(eq + 1));
    }
    meta_.network_args_json = python_json(network_args);
  }
  // kohya's ss_sd_model_name / ss_vae_name (the file's name, or the argument as given) and, for a file, its legacy and
  // SHA-256 hashes (the whole file is read once; rank 0 alone writes files).
  auto name_and_hashes = [&](const std::string& path, std::optional<std::string>& name, std::optional<std::string>& hash,
                             std::optional<std::string>& new_hash) {
    name = path;
    if (!fs::is_regular_file(path)) return;
    name = fs::path(path).filename().string();
    if (world_.rank != 0) return;
    hash = legacy_model_hash(path);
    new_hash = file_sha256(path);
  };
  name_and_hashes(*args_.pretrained_model_name_or_path, meta_.sd_model_name, meta_.sd_model_hash, meta_.new_sd_model_hash);
  if (args_.vae) name_and_hashes(*args_.vae, meta_.vae_name, meta_.vae_hash, meta_.new_vae_hash);
  meta_.seed = python_str(static_cast<int64_t>(seed_));
  meta_.optimizer = made_.ss_optimizer();
  meta_.max_grad_norm = python_str(args_.max_grad_norm);
  meta_.min_snr_gamma = python_str(args_.min_snr_gamma);
  meta_.loss_type = args_.loss_type;
  meta_.training_comment = python_str(args_.training_comment);
  meta_.fp8_base = python_str(args_.fp8_base);
  meta_.fp8_base_unet = python_str(args_.fp8_base_unet);
}

// ---------------------------------------------------------------- the step

// One micro-step: the batch's latents and text conditioning, the objective's noised input and target, the family's
// prediction, the loss, backward. Each rank's mean loss weighs by its share of the global batch (1 when the shares are
// equal), so N ranks compute the gradient of the global batch's mean as one process does; micro-steps weigh equally,
// as in kohya. Every random stream is keyed by the update (the number of updates before it) and the sample's place in
// it, so how samples are split among ranks and micro-steps changes nothing.
void Trainer::step(TrainBatch& batch, StepTimes& times) {
  Clock::time_point phase = Clock::now();
  phase_ = "forward";
  const int64_t update_key = position_.global_step;
  const auto samples = static_cast<int64_t>(batch.captions.size());  // 0: an empty share of a short global batch
  at::Tensor loss;
  {
    AutocastScope autocast(precision_.autocast, device_.type());
    const at::Tensor latents = batch_latents(batch, update_key);
    seed_default_generator(device_, seed_, update_key, batch.update_offset, RngPurpose::NetworkDropout);
    const Conditioning conditioning = batch_conditioning(batch);
    const NoisedBatch noised = objective_->noise(latents, keyed_randoms(seed_, update_key, batch.update_offset, RngPurpose::Noise));
    const at::Tensor prediction = family_->predict(noised, conditioning).to(at::kFloat);
    // An empty share contributes nothing, but its backward still runs (sharded models gather in it).
    loss = samples == 0 ? prediction.sum() * 0.0
                        : objective_->loss(prediction, noised, batch.loss_weights.to(device_), loss_mask(batch));
  }
  times.forward += seconds_since(phase);

  phase = Clock::now();
  phase_ = "backward";
  const double share = static_cast<double>(samples * world_.size) / static_cast<double>(batch.global_batch_size);
  at::Tensor scaled = loss * (share / static_cast<double>(batch.micros));
  if (precision_.loss_scaling) scaled = scaled * scaler_.scale;
  const bool last_micro = batch.micro + 1 == batch.micros;
  parallel_->set_sync(last_micro);  // accumulation micro-steps only accumulate; the last one averages over ranks
  scaled.backward();
  times.backward += seconds_since(phase);
  // Read once backward is queued, so on a GPU the host waits for the loss only where it always did; nothing has
  // stepped the weights yet.
  const double loss_value = loss.item<double>();
  if (!std::isfinite(loss_value)) stop_on_non_finite_loss(batch, loss_value);
  accumulated_ += loss_value * static_cast<double>(samples) / static_cast<double>(batch.global_batch_size) /
                  static_cast<double>(batch.micros);

  phase = Clock::now();
  phase_ = "gradient averaging";
  parallel_->finish();
  if (fused_) fused_->finish_backward();
  times.communication += seconds_since(phase);
}

// A rank that runs out of device memory ends the job naming itself, the phase and its memory plan, with the flags that
// lower what a rank holds.
void Trainer::stop_on_out_of_memory(const c10::OutOfMemoryError& e) const {
  fail("training", "rank {}: out of memory on {} in the {} of step {}: {}. This rank's memory plan: {:.0f} MiB of "
       "weights, gradients, optimizer state and buffers, before activations. Lower it with --gradient_checkpointing, a "
       "smaller --train_batch_size, --mixed_precision bf16, --sharding full (several ranks) or --blocks_to_swap N "
       "(families with swappable blocks)",
       world_.rank, device_.str(), phase_, position_.global_step + 1, e.what_without_backtrace(),
       static_cast<double>(memory_plan_.total()) / 1048576.0);
}

// A non-finite loss would write NaN into every trained weight it reaches (and into every later file): the run stops
// instead, naming the step and the samples, with what to check. The files already written stay as they are.
void Trainer::stop_on_non_finite_loss(const TrainBatch& batch, double loss) const {
  fail("training", "step {}: the loss is {} for the samples {}. A corrupt image or cache entry (rebuild the cache with "
       "`sdt cache-latents --rebuild_cache` / `sdt cache-te --rebuild_cache`), or a learning rate too high; the files "
       "saved before this step are unaffected (--resume the last state)",
       position_.global_step + 1, loss, fmt::join(batch.image_paths, ", "));
}

at::Tensor Trainer::batch_latents(TrainBatch& batch, int64_t update_key) const {
  if (latent_cache_ && !batch.captions.empty()) {
    std::vector<LatentKey> keys;
    for (size_t i = 0; i < batch.image_paths.size(); ++i) keys.push_back(latent_keys_->key(batch.dataset, batch.image_paths[i], batch.flipped[i]));
    LatentBatch cached = latent_cache_->read_batch(keys);
    if (cached.alpha_masks.defined()) batch.alpha_masks = cached.alpha_masks;
    return cached.latents.to(device_, at::kFloat);
  }
  const at::Tensor images = batch.images.defined() ? batch.images : at::empty({0, 3, batch.bucket.height, batch.bucket.width});
  return encode_latents(*family_, images.to(device_, precision_.vae, /*non_blocking=*/true), vae_latents_, seed_, update_key,
                        batch.update_offset, RngPurpose::Latents);
}

// The text conditioning, through a trained text encoder with its graph, else without; then the image conditioning.
Conditioning Trainer::batch_conditioning(const TrainBatch& batch) const {
  Conditioning conditioning;
  {
    std::optional<torch::NoGradGuard> no_grad;
    if (!trained_->trains_text_encoder()) no_grad.emplace();
    if (!text_cache_ || batch.captions.empty()) {
      conditioning = encode_captions(*family_, batch.captions, args_.weighted_captions);
    } else {
      conditioning = family_->text_encoder_outputs_caching_strategy().outputs_from_cache(text_cache_->read_batch(batch.captions));
      for (auto& [name, c] : conditioning) c = c.to(device_, at::kFloat);
      if (!encoded_each_step_.empty()) {  // the trained encoders' part, encoded now, replaces the cached one
        const Tokens tokens = family_->tokenize_strategy().tokenize(batch.captions, args_.weighted_captions);
        for (auto& [name, fresh] : family_->text_encoding_strategy().encode_alone(tokens, encoded_each_step_)) {
          for (auto& [cached_name, c] : conditioning) {
            if (cached_name == name) c = fresh;
          }
        }
      }
    }
  }
  for (auto& named : image_conditioning(*family_, batch, device_)) conditioning.push_back(std::move(named));
  return conditioning;
}

std::optional<at::Tensor> Trainer::loss_mask(const TrainBatch& batch) const {
  if (batch.alpha_masks.defined() && args_.masked_loss) return batch.alpha_masks.to(device_);
  return std::nullopt;
}

// At the update's last micro-step: the update's loss (the mean over its micro-steps of each global batch's mean, each
// rank adding its share) gathered with every rank's stop request, so all ranks stop after the same update; then
// unscale and overflow check, clipping, the optimizer, the lr schedule and the trained model's after-update rules.
double Trainer::optimizer_update(StepTimes& times, bool& stop_now) {
  Clock::time_point phase = Clock::now();
  phase_ = "optimizer update";
  const at::Tensor update = torch::tensor({accumulated_, stop_requested ? 1.0 : 0.0}, at::TensorOptions(at::kDouble)).to(communicator_->device());
  communicator_->all_reduce(update, ReduceOp::sum);
  accumulated_ = 0;
  stop_now = update[1].item<double>() > 0;
  times.communication += seconds_since(phase);

  phase = Clock::now();
  const bool finite = !precision_.loss_scaling || parallel_->unscale(scaler_.scale);
  if (finite) {
    if (!fused_) {  // fused steps clipped and stepped every tensor in backward
      if (args_.max_grad_norm > 0) parallel_->clip_grad_norm(args_.max_grad_norm);
      update_logs_ = trained_->before_optimizer_step();
      made_.optimizer->step();
    }
    parallel_->after_step();
  } else {
    spdlog::warn("step {}: gradients overflowed at loss scale {}; skipping the update", position_.global_step + 1, scaler_.scale);
  }
  if (precision_.loss_scaling) scaler_.update(finite);
  made_.optimizer->zero_grad();
  ++position_.global_step;
  scheduler_->set_step(position_.global_step * world_.size);
  trained_->after_update(position_.global_step);
  times.optimizer += seconds_since(phase);
  if (args_.check_replicas_every_n_steps > 0 && position_.global_step % args_.check_replicas_every_n_steps == 0) {
    replica_checksum(trained_->params(), *communicator_);  // fails on every rank alike, naming the diverged ranks
  }
  return update[0].item<double>();
}

// kohya's validation: what is trained in evaluation mode; each held-out batch at the objective's validation points
// (SD's objective: the timesteps linspace(min_t, max_t, 6)[1:-1]), with latents and noise from streams keyed by
// --validation_seed (else --seed), the batch and the sample, so values compare across validations, runs and rank
// counts. The value is the mean over all held-out samples of all ranks.
double Trainer::validation_loss() {
  torch::NoGradGuard no_grad;
  trained_->set_training(false);
  validation_loader_->start_epoch(1, 0, position_.global_step);
  double sum = 0;
  int64_t count = 0, batches = 0;  // samples x points; validation batches
  while (!args_.max_validation_steps || batches < *args_.max_validation_steps) {
    std::optional<TrainBatch> batch = validation_loader_->next();
    if (!batch) break;
    ++batches;
    AutocastScope autocast(precision_.autocast, device_.type());
    const int points = objective_->validation_points();
    const int64_t key = batch->update * (points + 1);  // the latents' streams, then one per validation point
    const at::Tensor latents = encode_latents(*family_, batch->images.to(device_, precision_.vae), vae_latents_, validation_seed_, key,
                                              batch->update_offset, RngPurpose::ValidationLatents);
    Conditioning conditioning = encode_captions(*family_, batch->captions, args_.weighted_captions);
    for (auto& named : image_conditioning(*family_, *batch, device_)) conditioning.push_back(std::move(named));
    for (int k = 0; k < points; ++k) {
      const NoisedBatch noised = objective_->noise_at_validation_point(
          latents, k, keyed_randoms(validation_seed_, key + k + 1, batch->update_offset, RngPurpose::ValidationNoise));
      const at::Tensor prediction = family_->predict(noised, conditioning).to(at::kFloat);
      if (latents.size(0) == 0) continue;  // an empty share of a short batch: it ran for the collectives only
      sum += static_cast<double>(latents.size(0)) *
             objective_->loss(prediction, noised, batch->loss_weights.to(device_), loss_mask(*batch)).item<double>();
      count += latents.size(0);
    }
  }
  trained_->set_training(true);
  const at::Tensor totals = torch::tensor({sum, static_cast<double>(count)}, at::TensorOptions(at::kDouble)).to(communicator_->device());
  communicator_->all_reduce(totals, ReduceOp::sum);
  return totals[1].item<double>() > 0 ? totals[0].item<double>() / totals[1].item<double>() : 0.0;
}

// ---------------------------------------------------------------- the loop

TrainSummary Trainer::run() {
  summary_.first_step = position_.global_step;
  progress_ = std::make_unique<ProgressBar>(max_train_steps_, position_.global_step);
  for (double l : position_.recent_losses) recent_sum_ += l;
  if (args_.sample_at_first) on_rank0_with_whole_models(true, [&] { sample_images(std::nullopt); });
  const int64_t first_epoch = position_.epoch, first_batch = position_.epoch_step;
  for (int64_t epoch = first_epoch; epoch <= num_epochs_ && position_.global_step < max_train_steps_; ++epoch) {
    loader_->start_epoch(epoch, epoch == first_epoch ? first_batch : 0, position_.global_step);
    StepTimes times;
    while (position_.global_step < max_train_steps_) {
      const Clock::time_point waiting = Clock::now();
      std::optional<TrainBatch> batch = loader_->next();
      if (!batch) break;
      times.data += seconds_since(waiting);
      bool stop_now = false;
      double loss = 0;
      try {
        step(*batch, times);
        if (batch->micro + 1 < batch->micros) continue;
        loss = optimizer_update(times, stop_now);
      } catch (const c10::OutOfMemoryError& e) {
        stop_on_out_of_memory(e);
      }
      record_update(loss, *batch, epoch, times);
      outputs_after_update(epoch);
      if (stop_now && position_.global_step < max_train_steps_) {
        spdlog::warn("step {}: asked to stop (SIGUSR1/SIGTERM); saving the state and stopping", position_.global_step);
        save_state(fmt::format("{}-step{:08d}", output_name_, position_.global_step));
        summary_.interrupted = true;
        break;
      }
    }
    if (summary_.interrupted) break;
    outputs_after_epoch(epoch);
  }
  finish();
  return summary_;
}

double Trainer::average_loss() const {
  return position_.recent_losses.empty() ? 0.0 : recent_sum_ / static_cast<double>(position_.recent_losses.size());
}

// The update's loss into the moving average (over an epoch's updates, as kohya's), the step times, the position
// (the next batch), the progress line and the logs.
void Trainer::record_update(double loss, const TrainBatch& batch, int64_t epoch, StepTimes& times) {
  const int64_t global_step = position_.global_step;
  summary_.losses.push_back(loss);
  curve_.emplace_back(global_step, loss);
  position_.recent_losses.push_back(loss);
  recent_sum_ += loss;
  if (static_cast<int64_t>(position_.recent_losses.size()) > updates_per_epoch_) {
    recent_sum_ -= position_.recent_losses.front();
    position_.recent_losses.erase(position_.recent_losses.begin());
  }
  times.steps = 1;
  for (StepTimes* t : {&summary_.times, &window_}) {
    t->data += times.data;
    t->forward += times.forward;
    t->backward += times.backward;
    t->communication += times.communication;
    t->optimizer += times.optimizer;
    t->steps += 1;
  }
  times = StepTimes{};
  if (args_.log_time_every_n_steps > 0 && global_step % args_.log_time_every_n_steps == 0) {
    log_times(window_, *communicator_, "the last steps");
    window_ = StepTimes{};
  }
  const bool last_of_epoch = batch.step + 1 == batches_per_epoch_;
  position_.epoch = last_of_epoch ? epoch + 1 : epoch;
  position_.epoch_step = last_of_epoch ? 0 : batch.step + 1;
  const double lr = made_.optimizer->param_groups().at(0).options().get_lr();
  if (world_.rank != 0) return;
  progress_->update(global_step, average_loss(), lr);
  std::map<std::string, double> metrics = {{"loss", loss}, {"avr_loss", average_loss()}, {"lr", lr}};
  if (precision_.loss_scaling) metrics["loss_scale"] = scaler_.scale;
  metrics.insert(update_logs_.begin(), update_logs_.end());
  jsonl_->write(global_step, epoch, metrics);
  tensorboard_->add_scalar("loss/current", static_cast<float>(loss), global_step);
  tensorboard_->add_scalar("loss/average", static_cast<float>(average_loss()), global_step);
  tensorboard_->add_scalar("lr/group0", static_cast<float>(lr), global_step);
  for (const auto& [name, value] : update_logs_) tensorboard_->add_scalar(name, static_cast<float>(value), global_step);
}

// --save_every_n_steps (with --save_state and kohya's --save_last_n_steps), --sample_every_n_steps,
// --validate_every_n_steps.
void Trainer::outputs_after_update(int64_t epoch) {
  const int64_t global_step = position_.global_step;
  if (args_.save_every_n_steps && global_step % *args_.save_every_n_steps == 0 && global_step < max_train_steps_) {
    const int64_t every = *args_.save_every_n_steps;
    const std::string name = fmt::format("{}-step{:08d}", output_name_, global_step);
    on_rank0_with_whole_models(trained_->trains_denoiser_weights(), [&] {
      summary_.weights_path = save_weights(name, epoch);
      if (auto r = step_to_remove(global_step, every, args_.save_last_n_steps, false)) {
        remove_saved(fmt::format("{}-step{:08d}", output_name_, *r), false);
      }
    });
    if (args_.save_state) {
      save_state(name);
      const std::optional<int64_t> keep = args_.save_last_n_steps_state ? args_.save_last_n_steps_state : args_.save_last_n_steps;
      if (auto r = step_to_remove(global_step, every, keep, true)) remove_saved(fmt::format("{}-step{:08d}", output_name_, *r), true);
    }
  }
  // kohya samples by steps only when no --sample_every_n_epochs is given.
  if (!prompts_.empty() && args_.sample_every_n_steps && !args_.sample_every_n_epochs && global_step % *args_.sample_every_n_steps == 0) {
    on_rank0_with_whole_models(true, [&] { sample_images(std::nullopt); });
  }
  if (validation_loader_ && args_.validate_every_n_steps && global_step % *args_.validate_every_n_steps == 0) {
    log_validation("step", validation_loss(), epoch);
  }
}

// Validation each --validate_every_n_epochs, --save_every_n_epochs (kohya's --save_last_n_epochs), --sample_every_n_epochs.
void Trainer::outputs_after_epoch(int64_t epoch) {
  if (validation_loader_ && (!args_.validate_every_n_epochs || epoch % *args_.validate_every_n_epochs == 0)) {
    log_validation("epoch", validation_loss(), epoch);
  }
  if (epoch < num_epochs_ && save_every_n_epochs_ && epoch % *save_every_n_epochs_ == 0) {
    const int64_t every = *save_every_n_epochs_;
    on_rank0_with_whole_models(trained_->trains_denoiser_weights(), [&] {
      summary_.weights_path = save_weights(fmt::format("{}-{:06d}", output_name_, epoch), epoch);
      if (args_.save_last_n_epochs && epoch - every * *args_.save_last_n_epochs > 0) {
        remove_saved(fmt::format("{}-{:06d}", output_name_, epoch - every * *args_.save_last_n_epochs), false);
      }
    });
    if (args_.save_state) {
      save_state(fmt::format("{}-{:06d}", output_name_, epoch));
      const std::optional<int64_t> keep = args_.save_last_n_epochs_state ? args_.save_last_n_epochs_state : args_.save_last_n_epochs;
      if (keep && epoch - every * *keep > 0) remove_saved(fmt::format("{}-{:06d}", output_name_, epoch - every * *keep), true);
    }
  }
  if (!prompts_.empty() && epoch < num_epochs_ && args_.sample_every_n_epochs && epoch % *args_.sample_every_n_epochs == 0) {
    on_rank0_with_whole_models(true, [&] { sample_images(epoch); });
  }
}

// The end of the run: the time split, the memory figures, the run's caches removed, the final state, weights, loss
// curve and samples (an interrupted run has saved its state and writes nothing more).
void Trainer::finish() {
  summary_.steps = position_.global_step;
  log_times(summary_.times, *communicator_, "the run");
  summary_.planned_bytes = memory_plan_.total();
  summary_.peak_bytes = CpuTensorMeter::peak_bytes() - bytes_before_run_;
  spdlog::info("rank {}: peak CPU tensor memory {:.1f} MiB; the plan's {:.1f} MiB and {:.1f} MiB of activations, data and "
               "transients",
               world_.rank, static_cast<double>(summary_.peak_bytes) / 1048576.0, static_cast<double>(summary_.planned_bytes) / 1048576.0,
               static_cast<double>(summary_.peak_bytes - summary_.planned_bytes) / 1048576.0);
  if (device_.is_cuda()) {
    // The caching allocator's own figures: what tensors held at most, and what it held from CUDA for them.
    const auto stats = at::accelerator::getDeviceStats(device_.index());
    const auto all = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    summary_.device_peak_bytes = stats.allocated_bytes[all].peak;
    spdlog::info("rank {}: peak {} memory {:.1f} MiB allocated, {:.1f} MiB reserved; the plan's {:.1f} MiB before activations",
                 world_.rank, device_.str(), static_cast<double>(summary_.device_peak_bytes) / 1048576.0,
                 static_cast<double>(stats.reserved_bytes[all].peak) / 1048576.0, static_cast<double>(summary_.planned_bytes) / 1048576.0);
  }
  if (summary_.interrupted) return;
  if (!run_cache_dirs_.empty()) {
    latent_cache_.reset();
    text_cache_.reset();
    communicator_->barrier();  // every rank has stopped reading
    if (world_.rank == 0) {
      for (const fs::path& dir : run_cache_dirs_) fs::remove_all(dir);
    }
  }
  if (args_.save_state || args_.save_state_on_train_end) save_state(output_name_);
  const bool sample_at_end = !prompts_.empty() && (args_.sample_every_n_epochs || args_.sample_every_n_steps);
  on_rank0_with_whole_models(trained_->trains_denoiser_weights() || sample_at_end, [&] {
    progress_->finish();
    tensorboard_->flush();
    summary_.weights_path = save_weights(output_name_, num_epochs_);
    write_line_chart_png((output_dir_ / (output_name_ + "_loss.png")).string(), curve_, output_name_ + ": loss per step");
    if (sample_at_end) sample_images(num_epochs_);
  });
}

// ---------------------------------------------------------------- outputs

// What rank 0 alone does with the models (write the trained weights, sample): with a block engine it runs between a
// gather of every block's weights to rank 0 and their release, in which all ranks take part.
void Trainer::on_rank0_with_whole_models(bool reads_sharded_weights, const std::function<void()>& work) {
  if (reads_sharded_weights) parallel_->gather_whole_to_root();
  if (world_.rank == 0) work();
  if (reads_sharded_weights) parallel_->release_whole();
}

std::string Trainer::save_weights(const std::string& name, int64_t epoch) {
  const std::string path = (output_dir_ / (name + ".safetensors")).string();
  LoRATrainingMetadata m = meta_;
  m.num_epochs = python_str(epoch);
  m.steps = std::to_string(position_.global_step);
  m.epoch = std::to_string(epoch);
  const double now = std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
  m.training_finished_at = python_str(now);
  m.model_spec = sai_model_spec(family_->model_spec(), args_, mode_ == TrainMode::network, now);
  trained_->save(path, m);
  spdlog::info("saved {}", path);
  return path;
}

// Collective: a LoRA state needs no gather, a whole model's is gathered to rank 0 block by block under full sharding.
void Trainer::save_state(const std::string& name) {
  const fs::path dir = output_dir_ / (name + "-state");
  const bool weights_sharded = trained_->trains_denoiser_weights();
  if (weights_sharded) parallel_->gather_whole_to_root();
  save_train_state(dir, *trained_, *made_.optimizer, *parallel_, position_, seed_, samples_per_update_, world_, scaler_);
  if (weights_sharded) parallel_->release_whole();
  if (world_.rank == 0) spdlog::info("saved state {}", dir.string());
  communicator_->barrier();  // no rank goes on (or exits) before the state is complete
  summary_.state_path = dir.string();
}

void Trainer::remove_saved(const std::string& name, bool is_state) const {
  const fs::path path = is_state ? output_dir_ / (name + "-state") : output_dir_ / (name + ".safetensors");
  if (fs::remove_all(path) > 0) spdlog::info("removed {}", path.string());
}

// kohya's sample images, with what is trained in evaluation mode (no dropouts).
void Trainer::sample_images(std::optional<int64_t> epoch) {
  if (prompts_.empty()) return;
  torch::NoGradGuard no_grad;
  trained_->set_training(false);
  const fs::path dir = output_dir_ / "sample";
  fs::create_directories(dir);
  for (const auto& p : prompts_) {
    SampleOptions o;
    o.prompt = p.prompt;
    o.negative_prompt = p.negative_prompt;
    o.sampler = p.sampler.value_or(args_.sample_sampler);
    if (p.steps) o.steps = static_cast<int>(*p.steps);
    o.scale = p.scale;
    o.guidance_scale = p.guidance_scale;
    if (p.seed) o.seed = static_cast<uint64_t>(*p.seed);
    if (p.width) o.width = static_cast<int>(*p.width);
    if (p.height) o.height = static_cast<int>(*p.height);
    AutocastScope autocast(precision_.autocast, device_.type());
    const std::string file = sample_image_name(args_.output_name, epoch, position_.global_step, p, timestamp("%Y%m%d%H%M%S"));
    write_png((dir / file).string(), family_->sample(o));
  }
  trained_->set_training(true);
}

void Trainer::log_validation(const char* which, double value, int64_t epoch) {
  const int64_t step = position_.global_step;
  const double train_average = average_loss();
  summary_.validation_losses.emplace_back(step, value);
  spdlog::info("step {}: validation loss {:.6f} ({} average; training moving average {:.6f})", step, value, which, train_average);
  if (world_.rank != 0) return;
  const std::string prefix = std::string("loss/validation/") + which;
  const int64_t x = which == std::string("epoch") ? epoch : step;
  jsonl_->write(step, epoch, {{prefix + "_average", value}, {prefix + "_divergence", value - train_average}});
  tensorboard_->add_scalar(prefix + "_average", static_cast<float>(value), x);
  tensorboard_->add_scalar(prefix + "_divergence", static_cast<float>(value - train_average), x);
}

}  // namespace

TrainSummary train(const TrainArgs& args, const World& world, TrainMode mode) { return Trainer(args, world, mode).run(); }

}  // namespace sdt
