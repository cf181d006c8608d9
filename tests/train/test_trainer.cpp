// `sdt train` / `sdt train_db` end to end on the tiny SD 1.x fixture model: a U-Net LoRA trained for a few hundred
// steps on a tiny dataset ends clearly below its starting loss and writes a LoRA file in kohya's format; a run
// resumed from its state ends bitwise where an uninterrupted run ends; full fine-tuning, mixed precision and
// --save_last_n_steps do what they say.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <numeric>

#include "src/core/error.h"
#include "src/core/safetensors.h"
#include "src/core/tensor_io.h"
#include "src/train/train_state.h"
#include "src/train/trainer.h"
#include "tests/train/toy_dataset.h"

namespace sdt {
namespace {

namespace fs = std::filesystem;

TrainArgs tiny_run(const fs::path& root) {
  TrainArgs args = testing_support::tiny_lora_run(root, SDT_FIXTURES "/sd/sd1");
  args.network_train_unet_only = true;
  args.learning_rate = 1e-2;
  args.max_train_steps = 300;
  args.min_timestep = 400;
  args.max_timestep = 600;
  return args;
}

// Every tensor of two safetensors files, bit for bit.
void expect_same_tensors(const std::string& a, const std::string& b) {
  safetensors::File fa(a), fb(b);
  ASSERT_EQ(fa.tensors().size(), fb.tensors().size());
  for (const auto& t : fa.tensors()) {
    ASSERT_TRUE(fb.contains(t.name)) << t.name;
    const auto x = fa.bytes(t), y = fb.bytes(t.name);
    ASSERT_EQ(x.size(), y.size()) << t.name;
    EXPECT_EQ(std::memcmp(x.data(), y.data(), x.size()), 0) << t.name << " differs";
  }
}

// --network_weights that hold none of the network's weights (a VAE file given by mistake) stop the run before it
// trains a fresh LoRA under the user's nose.
TEST(Trainer, NetworkWeightsWithNoneOfTheNetworksKeysAreRefused) {
  const fs::path root = fs::path(testing::TempDir()) / "sdt_trainer_bad_weights";
  fs::remove_all(root);
  TrainArgs args = tiny_run(root);
  args.max_train_steps = 1;
  args.network_weights = SDT_FIXTURES "/sd/sd1/vae/diffusion_pytorch_model.safetensors";
  try {
    train(args, World{}, TrainMode::network);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--network_weights"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("not a LoRA for this model"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(fs::exists(root / "out" / "toy.safetensors"));
}

// A loss that is no longer finite (here: a learning rate that blows the weights up) stops the run with the step and
// the samples, instead of writing NaN weights and exiting 0.
TEST(Trainer, ANonFiniteLossStopsTheRunNamingTheStep) {
  const fs::path root = fs::path(testing::TempDir()) / "sdt_trainer_nan";
  fs::remove_all(root);
  TrainArgs args = tiny_run(root);
  args.max_train_steps = 20;
  args.learning_rate = 1e30;
  try {
    train(args, World{}, TrainMode::network);
    FAIL() << "expected the run to stop";
  } catch (const Error& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find("the loss is"), std::string::npos) << message;
    EXPECT_NE(message.find(".png"), std::string::npos) << message;  // the samples are named
  }
  EXPECT_FALSE(fs::exists(root / "out" / "toy.safetensors"));
}

// --resume latest takes the newest whole state: a damaged one (an empty train_state.json from a disk that filled up
// under an older sdt) is skipped with a warning instead of stopping every requeued run.
TEST(ResumeLatest, SkipsADamagedStateForTheNewestWholeOne) {
  const fs::path out = fs::path(testing::TempDir()) / "sdt_resume_latest";
  fs::remove_all(out);
  fs::create_directories(out / "toy-step00000004-state");
  std::ofstream(out / "toy-step00000004-state" / "train_state.json") << R"({"sdt": {"global_step": 4}})";
  fs::create_directories(out / "toy-step00000006-state");
  std::ofstream(out / "toy-step00000006-state" / "train_state.json");  // 0 bytes
  fs::create_directories(out / "toy-step00000008-state.partial");  // unfinished
  EXPECT_EQ(newest_state(out), out / "toy-step00000004-state");
}

TEST(Trainer, UnetLoraLossFallsAndTheFileIsKohyas) {
  const fs::path root = fs::path(testing::TempDir()) / "sdt_trainer";
  fs::remove_all(root);
  TrainArgs args = tiny_run(root);
  TrainSummary summary = train(args, World{}, TrainMode::network);
  ASSERT_EQ(summary.steps, 300);
  auto mean = [](auto begin, auto end) { return std::accumulate(begin, end, 0.0) / static_cast<double>(end - begin); };
  const double first = mean(summary.losses.begin(), summary.losses.begin() + 30);
  const double last = mean(summary.losses.end() - 30, summary.losses.end());
  std::cout << "mean loss of the first 30 steps " << first << ", of the last 30 " << last << "\n";
  EXPECT_LT(last, 0.7 * first);

  safetensors::File lora(summary.weights_path);
  EXPECT_EQ(lora.metadata().at("ss_network_module"), "networks.lora");
  EXPECT_EQ(lora.metadata().at("ss_network_dim"), "4");
  EXPECT_TRUE(lora.metadata().count("sshs_model_hash"));
  // kohya's base-model keys: a diffusers folder is named as given and not hashed; the finishing time is recorded.
  EXPECT_EQ(lora.metadata().at("ss_sd_model_name"), SDT_FIXTURES "/sd/sd1");
  EXPECT_FALSE(lora.metadata().contains("ss_sd_model_hash"));
  EXPECT_EQ(lora.metadata().at("ss_base_model_version"), "sd_v1");
  EXPECT_EQ(lora.metadata().at("ss_v2"), "False");
  EXPECT_EQ(lora.metadata().at("modelspec.architecture"), "stable-diffusion-v1/lora");  // SAI model spec, as kohya writes it
  EXPECT_EQ(lora.metadata().at("modelspec.prediction_type"), "epsilon");
  EXPECT_GE(std::stod(lora.metadata().at("ss_training_finished_at")), std::stod(lora.metadata().at("ss_training_started_at")));
  // The dataset as kohya describes folders given on the command line (json.dumps of the folder's tags and counts;
  // the captions are the class tokens, as the default caption extension is ".caption").
  EXPECT_EQ(lora.metadata().at("ss_tag_frequency"), R"({"4_toy": {"toy": 2}})");
  EXPECT_EQ(lora.metadata().at("ss_dataset_dirs"), R"({"4_toy": {"n_repeats": 4, "img_count": 2}})");
  EXPECT_EQ(lora.metadata().at("ss_reg_dataset_dirs"), "{}");
  EXPECT_EQ(lora.metadata().at("ss_color_aug"), "False");
  EXPECT_EQ(lora.metadata().at("ss_total_batch_size"), lora.metadata().at("ss_batch_size_per_device"));  // 1 rank, no accumulation
  EXPECT_TRUE(lora.metadata().at("ss_bucket_info").starts_with(R"({"buckets": {)")) << lora.metadata().at("ss_bucket_info");
  size_t unet_keys = 0;
  for (const auto& t : lora.tensors()) {
    EXPECT_TRUE(t.name.starts_with("lora_unet_")) << t.name;
    unet_keys += t.name.ends_with(".lora_down.weight");
  }
  EXPECT_GT(unet_keys, 0u);
  EXPECT_TRUE(fs::exists(root / "out" / "toy_loss.png"));
  EXPECT_TRUE(fs::exists(root / "out" / "logs" / "metrics.jsonl"));
  EXPECT_EQ(summary.times.steps, 300);
  EXPECT_GT(summary.times.forward, 0);
  EXPECT_GT(summary.times.backward, 0);
  fs::remove_all(root);
}

// 2N steps in one run, and N steps + --resume + N steps, give the same weights bit for bit: the state carries the
// weights, the optimizer moments, the data position (here mid-epoch, with accumulation), both random streams and the
// loss window. Text-encoder and U-Net LoRA, pyramid noise (Python's stream), AdamW.
void expect_bitwise_resume(TrainMode mode, const std::string& tag, const std::function<void(TrainArgs&)>& configure = {}) {
  const fs::path root = fs::path(testing::TempDir()) / ("sdt_resume_" + tag);
  fs::remove_all(root);
  TrainArgs args = tiny_run(root);
  args.network_train_unet_only = false;
  args.max_train_steps = 6;
  args.gradient_accumulation_steps = 2;  // 4 batches per epoch: 2 updates; step 3 is mid-epoch 2
  args.multires_noise_iterations = 2;
  args.min_timestep = 0;
  args.max_timestep = 1000;
  args.learning_rate = mode == TrainMode::network ? 1e-2 : 1e-4;
  args.lr_scheduler = "cosine";
  args.save_every_n_steps = 3;
  args.save_state = true;
  if (configure) configure(args);
  args.output_dir = (root / "straight").string();
  const TrainSummary straight = train(args, World{}, mode);
  ASSERT_EQ(straight.steps, 6);
  const fs::path state = root / "straight" / "toy-step00000003-state";
  ASSERT_TRUE(fs::exists(state / "train_state.json"));

  args.output_dir = (root / "resumed").string();
  args.resume = state.string();
  const TrainSummary resumed = train(args, World{}, mode);
  EXPECT_EQ(resumed.first_step, 3);
  EXPECT_EQ(resumed.steps, 6);
  ASSERT_EQ(resumed.losses.size(), 3u);
  for (size_t i = 0; i < 3; ++i) EXPECT_EQ(resumed.losses[i], straight.losses[3 + i]) << "step " << 4 + i;
  expect_same_tensors(straight.weights_path, resumed.weights_path);
  fs::remove_all(root);
}

TEST(Trainer, LoraResumeIsBitwise) { expect_bitwise_resume(TrainMode::network, "lora"); }
TEST(Trainer, FullFineTuneResumeIsBitwise) { expect_bitwise_resume(TrainMode::whole_model, "full"); }

// kohya's three LoRA dropouts draw from the default generator, which the trainer keys by (update, sample place) before
// each micro-step, and gradient checkpointing replays the forward's draws: a resumed run draws the same masks.
TEST(Trainer, LoraWithDropoutsAndCheckpointingResumesBitwise) {
  expect_bitwise_resume(TrainMode::network, "lora_dropout", [](TrainArgs& args) {
    args.network_dropout = 0.1;
    args.network_args = {"rank_dropout=0.2", "module_dropout=0.1"};
    args.gradient_checkpointing = true;
  });
}

TEST(Trainer, ResumeRefusesAStateOfAnotherMode) {
  const fs::path root = fs::path(testing::TempDir()) / "sdt_resume_mode";
  fs::remove_all(root);
  TrainArgs args = tiny_run(root);
  args.max_train_steps = 1;
  args.save_state_on_train_end = true;
  const TrainSummary lora = train(args, World{}, TrainMode::network);
  ASSERT_TRUE(fs::exists(lora.state_path));
  args.resume = lora.state_path;
  try {
    train(args, World{}, TrainMode::whole_model);
    FAIL() << "a LoRA state resumed a full fine-tune";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("'network' run"), std::string::npos) << e.what();
  }
  fs::remove_all(root);
}

// train_db: the U-Net and the text encoder themselves learn; the result is one LDM-layout file.
TEST(Trainer, FullFineTuneLossFallsAndWritesOneCheckpoint) {
  const fs::path root = fs::path(testing::TempDir()) / "sdt_full";
  fs::remove_all(root);
  TrainArgs args = tiny_run(root);
  args.learning_rate = 3e-4;
  args.learning_rate_te = 1e-5;
  args.max_train_steps = 150;
  const TrainSummary summary = train(args, World{}, TrainMode::whole_model);
  auto mean = [](auto begin, auto end) { return std::accumulate(begin, end, 0.0) / static_cast<double>(end - begin); };
  const double first = mean(summary.losses.begin(), summary.losses.begin() + 20);
  const double last = mean(summary.losses.end() - 20, summary.losses.end());
  std::cout << "full fine-tune: mean loss of the first 20 steps " << first << ", of the last 20 " << last << "\n";
  EXPECT_LT(last, 0.8 * first);
  safetensors::File checkpoint(summary.weights_path);
  int unet = 0, vae = 0, text = 0;
  for (const auto& t : checkpoint.tensors()) {
    unet += t.name.starts_with("model.diffusion_model.");
    vae += t.name.starts_with("first_stage_model.");
    text += t.name.starts_with("cond_stage_model.transformer.");
  }
  EXPECT_GT(unet, 0);
  EXPECT_GT(vae, 0);
  EXPECT_GT(text, 0);
  fs::remove_all(root);
}

// --mixed_precision bf16 (LoRA fp32, base bf16, autocast), fp16 with the loss scaler, and --full_bf16 train: the loss
// stays finite and falls.
void expect_mixed_precision_trains(const std::string& precision, bool full, double ratio) {
  // A folder per case: ctest runs the cases as parallel processes.
  const fs::path root = fs::path(testing::TempDir()) / ("sdt_mp_" + precision + (full ? "_full" : ""));
  fs::remove_all(root);
  TrainArgs args = tiny_run(root);
  args.mixed_precision = precision;
  args.full_bf16 = full && precision == "bf16";
  args.full_fp16 = full && precision == "fp16";
  args.max_train_steps = 120;
  const TrainSummary summary = train(args, World{}, TrainMode::network);
  auto mean = [](auto begin, auto end) { return std::accumulate(begin, end, 0.0) / static_cast<double>(end - begin); };
  const double first = mean(summary.losses.begin(), summary.losses.begin() + 20);
  const double last = mean(summary.losses.end() - 20, summary.losses.end());
  std::cout << precision << (full ? " full" : "") << ": mean loss of the first 20 steps " << first << ", of the last 20 " << last << "\n";
  EXPECT_TRUE(std::isfinite(last));
  EXPECT_LT(last, ratio * first);
  safetensors::File lora(summary.weights_path);
  EXPECT_EQ(lora.metadata().at("ss_mixed_precision"), precision);
  fs::remove_all(root);
}

TEST(Trainer, MixedPrecisionBf16Trains) { expect_mixed_precision_trains("bf16", false, 0.8); }
TEST(Trainer, MixedPrecisionFp16WithLossScalingTrains) { expect_mixed_precision_trains("fp16", false, 0.8); }
TEST(Trainer, FullBf16Trains) { expect_mixed_precision_trains("bf16", true, 0.9); }

// --sharding full under --mixed_precision bf16 gathers the fp32 blocks in bf16 (what autocast computes in anyway):
// the losses follow the unsharded run's within bf16 rounding, and the gradients still reach the fp32 masters.
TEST(Trainer, FullShardingGathersBlocksInTheMixedPrecisionDtype) {
  const fs::path root = fs::path(testing::TempDir()) / "sdt_full_sharding_bf16";
  fs::remove_all(root);
  TrainArgs args = tiny_run(root);
  args.mixed_precision = "bf16";
  args.learning_rate = 3e-4;
  args.max_train_steps = 6;
  const TrainSummary plain = train(args, World{}, TrainMode::whole_model);
  args.sharding = "full";
  args.output_dir = (root / "sharded").string();
  const TrainSummary sharded = train(args, World{}, TrainMode::whole_model);
  ASSERT_EQ(sharded.losses.size(), plain.losses.size());
  for (size_t i = 0; i < plain.losses.size(); ++i) {
    std::cout << "step " << i + 1 << ": loss " << plain.losses[i] << " unsharded, " << sharded.losses[i] << " sharded\n";
    EXPECT_NEAR(sharded.losses[i], plain.losses[i], 2e-2 * plain.losses[i]) << "step " << i + 1;
  }
  safetensors::File a(plain.weights_path), b(sharded.weights_path);
  const std::string name = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight";  // a ResNet conv: a sharded block
  safetensors::File initial(SDT_FIXTURES "/sd/sd1/model_ldm.safetensors");
  const at::Tensor before = load_tensor(initial, name).to(at::kFloat);
  const at::Tensor x = load_tensor(a, name).to(at::kFloat), y = load_tensor(b, name).to(at::kFloat);
  // Adam's normalised steps turn bf16 rounding of small gradients into visible differences element by element; the
  // two runs' updates must still point the same way.
  const at::Tensor dx = (x - before).to(at::kDouble).flatten(), dy = (y - before).to(at::kDouble).flatten();
  const double cosine = (dx * dy).sum().item<double>() / (dx.norm().item<double>() * dy.norm().item<double>() + 1e-30);
  std::cout << "the sharded block's update against the unsharded one's: cosine " << cosine << "\n";
  EXPECT_GT(dy.abs().max().item<double>(), 0.0) << "the sharded block was not trained";
  EXPECT_GT(cosine, 0.9);
  fs::remove_all(root);
}

// kohya's --save_last_n_steps (get_remove_step_no): saving every 2 steps of 8 and keeping 3 steps' worth removes
// step 2 when step 6 is saved; states follow --save_last_n_steps_state (1: only the newest stays).
TEST(Trainer, SaveLastNStepsRemovesOlderFiles) {
  const fs::path root = fs::path(testing::TempDir()) / "sdt_last_n";
  fs::remove_all(root);
  TrainArgs args = tiny_run(root);
  args.max_train_steps = 8;
  args.save_every_n_steps = 2;
  args.save_last_n_steps = 3;
  args.save_state = true;
  args.save_last_n_steps_state = 1;
  train(args, World{}, TrainMode::network);
  const fs::path out = root / "out";
  EXPECT_FALSE(fs::exists(out / "toy-step00000002.safetensors"));
  EXPECT_TRUE(fs::exists(out / "toy-step00000004.safetensors"));
  EXPECT_TRUE(fs::exists(out / "toy-step00000006.safetensors"));
  EXPECT_TRUE(fs::exists(out / "toy.safetensors"));
  EXPECT_FALSE(fs::exists(out / "toy-step00000002-state"));
  EXPECT_FALSE(fs::exists(out / "toy-step00000004-state"));
  EXPECT_TRUE(fs::exists(out / "toy-step00000006-state"));
  EXPECT_TRUE(fs::exists(out / "toy-state"));
  fs::remove_all(root);
}

// kohya's epoch arithmetic around saving and sampling: --save_n_epoch_ratio 2 over 4 epochs saves every
// floor(4 / 2) = 2 epochs; --sample_at_first samples before the first step; with --sample_every_n_epochs given,
// --sample_every_n_steps is ignored (epochs 2 and the end only). --training_comment reaches the metadata.
TEST(Trainer, EpochRatioSamplingAtFirstAndTheCommentAreKohyas) {
  const fs::path root = fs::path(testing::TempDir()) / "sdt_epoch_ratio";
  fs::remove_all(root);
  fs::create_directories(root);
  std::ofstream(root / "prompts.txt") << "a red square --w 64 --h 64 --s 2 --d 5\n";
  TrainArgs args = tiny_run(root);
  args.max_train_steps = 0;
  args.max_train_epochs = 4;
  args.save_n_epoch_ratio = 2;
  args.sample_prompts = (root / "prompts.txt").string();
  args.sample_at_first = true;
  args.sample_every_n_steps = 1;
  args.sample_every_n_epochs = 2;
  args.training_comment = "trained by the test";
  const TrainSummary summary = train(args, World{}, TrainMode::network);
  const fs::path out = root / "out";
  EXPECT_FALSE(fs::exists(out / "toy-000001.safetensors"));
  EXPECT_TRUE(fs::exists(out / "toy-000002.safetensors"));
  EXPECT_FALSE(fs::exists(out / "toy-000003.safetensors"));
  std::vector<std::string> samples;
  for (const auto& e : fs::directory_iterator(out / "sample")) samples.push_back(e.path().filename().string().substr(0, 11));
  std::sort(samples.begin(), samples.end());
  EXPECT_EQ(samples, (std::vector<std::string>{"toy_000000_", "toy_e000002", "toy_e000004"}));
  EXPECT_EQ(safetensors::File(summary.weights_path).metadata().at("ss_training_comment"), "trained by the test");
  fs::remove_all(root);
}

// kohya flags whose effect sdt does not have are refused, naming the flag, before anything loads.
TEST(Trainer, KohyaFlagsWithoutAnEffectHereAreRefusedByName) {
  const fs::path root = fs::path(testing::TempDir()) / "sdt_refused_flags";
  fs::remove_all(root);
  const std::vector<std::pair<std::string, std::function<void(TrainArgs&)>>> flags{
      {"--deepspeed", [](TrainArgs& a) { a.deepspeed = true; }},
      {"--dataset_class", [](TrainArgs& a) { a.dataset_class = "my.Dataset"; }},
      {"--huggingface_repo_id", [](TrainArgs& a) { a.huggingface_repo_id = "me/lora"; }},
      {"--log_with", [](TrainArgs& a) { a.log_with = "wandb"; }},
      {"--initial_step", [](TrainArgs& a) { a.initial_step = 2; }}};
  for (const auto& [flag, set] : flags) {
    TrainArgs args = tiny_run(root);
    set(args);
    try {
      train(args, World{}, TrainMode::network);
      ADD_FAILURE() << flag << " was accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(flag), std::string::npos) << e.what();
    }
  }
  fs::remove_all(root);
}

}  // namespace
}  // namespace sdt

namespace sdt {
namespace {

// --validation_split holds one of the two images out. Validations at the same weights give the same value (the
// step-2 validation and the end of epoch 1 both see step 2's weights): fixed timesteps, noise and batches. Validating
// leaves training untouched: the training losses equal those of a run without validation, bit for bit.
TEST(Trainer, ValidationLossIsFixedAndLeavesTrainingAlone) {
  const fs::path root = fs::path(testing::TempDir()) / "sdt_validation";
  fs::remove_all(root);
  TrainArgs args = tiny_run(root);
  args.max_train_steps = 4;
  args.validation_split = 0.5;
  args.validation_seed = 3;
  args.validate_every_n_steps = 2;
  const TrainSummary validated = train(args, World{}, TrainMode::network);
  ASSERT_EQ(validated.validation_losses.size(), 4u);  // steps 2 and 4, and the ends of epochs 1 and 2
  EXPECT_EQ(validated.validation_losses[0].first, 2);
  EXPECT_GT(validated.validation_losses[0].second, 0);
  EXPECT_EQ(validated.validation_losses[0].second, validated.validation_losses[1].second);
  EXPECT_EQ(validated.validation_losses[2].second, validated.validation_losses[3].second);
  EXPECT_NE(validated.validation_losses[0].second, validated.validation_losses[2].second);
  args.validate_every_n_steps = std::nullopt;
  args.validate_every_n_epochs = 100;  // never
  const TrainSummary plain = train(args, World{}, TrainMode::network);
  EXPECT_TRUE(plain.validation_losses.empty());
  EXPECT_EQ(plain.losses, validated.losses);
  fs::remove_all(root);
}

}  // namespace
}  // namespace sdt

namespace sdt {
namespace {

// Training from the latent cache (--cache_latents_to_disk: built here, kept; --cache_latents: built in the run's
// folder and removed at the end) gives the losses of encoding on the fly with the deterministic posterior mean
// (--vae_latents mean), flips included: the cache holds the same latents and the loader skips the pixels. The same
// for the text-encoder output cache.
TEST(Trainer, TrainingFromTheLatentCacheEqualsEncodingOnTheFly) {
  const fs::path root = fs::path(testing::TempDir()) / "sdt_latent_cache";
  fs::remove_all(root);
  TrainArgs args = tiny_run(root);
  args.max_train_steps = 6;
  args.flip_aug = true;
  args.vae_latents = "mean";
  const TrainSummary on_the_fly = train(args, World{}, TrainMode::network);

  args.cache_latents_to_disk = true;
  args.output_dir = (root / "disk").string();
  const TrainSummary from_disk = train(args, World{}, TrainMode::network);
  bool has_part = false;
  for (const auto& e : fs::recursive_directory_iterator(root / "train" / "sdt_cache")) has_part |= e.path().extension() == ".h5";
  EXPECT_TRUE(has_part) << "no .h5 part in " << root / "train" / "sdt_cache";

  args.cache_latents_to_disk = false;
  args.cache_latents = true;
  args.output_dir = (root / "memory").string();
  const TrainSummary from_memory = train(args, World{}, TrainMode::network);
  EXPECT_FALSE(fs::exists(root / "memory" / ".sdt_latent_cache"));

  // And the text conditioning from its cache too (a frozen text encoder: U-Net LoRA only).
  args.cache_latents = false;
  args.cache_text_encoder_outputs_to_disk = true;
  args.output_dir = (root / "text").string();
  const TrainSummary from_text_cache = train(args, World{}, TrainMode::network);

  ASSERT_EQ(on_the_fly.losses.size(), 6u);
  for (const auto* cached : {&from_disk, &from_memory, &from_text_cache}) {
    ASSERT_EQ(cached->losses.size(), on_the_fly.losses.size());
    for (size_t i = 0; i < on_the_fly.losses.size(); ++i) {
      EXPECT_NEAR(cached->losses[i], on_the_fly.losses[i], 1e-5 * on_the_fly.losses[i]) << "step " << i + 1;
    }
  }
  fs::remove_all(root);
}

}  // namespace
}  // namespace sdt
