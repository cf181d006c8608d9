// The second family through the training core: the tiny DiT (tests/families/tiny_dit) with flow matching, trained by
// the same `sdt train` / `sdt train_db` code path as SD, LoRA on its several-tensor blocks and full fine-tuning, with
// gradient checkpointing, full sharding and block swap through the same block seam.
#include <gtest/gtest.h>

#include <filesystem>

#include <fmt/format.h>

#include "src/core/error.h"
#include "src/core/safetensors.h"
#include "src/families/family.h"
#include "src/train/trainer.h"
#include "tests/families/tiny_dit/tiny_dit.h"
#include "tests/train/weight_files.h"

namespace sdt {
namespace {

namespace fs = std::filesystem;
using testing_support::bitwise_equal;
using testing_support::relative_difference;

// Blocks enough to swap: --blocks_to_swap 2 swaps 1 of the 3 double blocks and 2 of the 4 single blocks (kohya's FLUX
// split; a stack keeps at least two blocks on the device).
tiny_dit::TinyDitConfig swappable_config() {
  tiny_dit::TinyDitConfig config;
  config.double_blocks = 3;
  config.single_blocks = 4;
  return config;
}

TrainArgs tiny_dit_run(const std::string& tag, TrainMode mode, const tiny_dit::TinyDitConfig& config = {}) {
  return tiny_dit::toy_run((fs::path(testing::TempDir()) / ("sdt_tiny_dit_" + tag)).string(), mode, config);
}

class TinyDitTraining : public ::testing::TestWithParam<TrainMode> {};

TEST_P(TinyDitTraining, LossFallsThroughTheSameTrainer) {
  const TrainMode mode = GetParam();
  TrainArgs args = tiny_dit_run(mode == TrainMode::network ? "lora" : "full", mode);
  args.max_train_steps = 120;
  const TrainSummary summary = train(args, World{}, mode);
  ASSERT_EQ(summary.losses.size(), 120u);
  const auto [first, last] = testing_support::loss_trend(summary.losses, "[tiny_dit]");
  EXPECT_LT(last, 0.8 * first);
  const safetensors::File weights(summary.weights_path);
  if (mode == TrainMode::network) {
    EXPECT_TRUE(weights.contains("lora_unet_double_blocks_0_img_qkv.lora_down.weight"));
    EXPECT_TRUE(weights.contains("lora_unet_single_blocks_1_linear1.lora_up.weight"));
    EXPECT_EQ(weights.metadata().at("ss_base_model_version"), "tiny_dit");
  } else {
    EXPECT_TRUE(weights.contains("double_blocks.0.img_qkv.weight"));
  }
}

// Gradient checkpointing, full sharding, block swap, and both run the blocks through the same seam: one
// process gives the weights of the plain run, up to the order of float sums (recomputation and the flat shard
// buffers): 1e-5 relative. (AdamW moves a weight whose gradient is near zero by up to lr whatever its rounding, so the
// full fine-tune runs at lr 2e-5.)
TEST_P(TinyDitTraining, CheckpointingShardingAndSwapTrainLikeThePlainRun) {
  const TrainMode mode = GetParam();
  const std::string tag = mode == TrainMode::network ? "lora" : "full";
  auto run_args = [&](const std::string& variant) {
    TrainArgs args = tiny_dit_run(variant + "_" + tag, mode, swappable_config());
    args.max_train_steps = 6;
    if (mode == TrainMode::whole_model) args.learning_rate = 2e-5;
    return args;
  };
  const TrainSummary plain = train(run_args("plain"), World{}, mode);
  for (const std::string variant : {"checkpointing", "sharding", "swap", "sharding_swap"}) {
    TrainArgs other = run_args(variant);
    other.gradient_checkpointing = variant == "checkpointing";
    if (variant.starts_with("sharding")) other.sharding = "full";
    if (variant.ends_with("swap")) other.blocks_to_swap = 2;
    const TrainSummary run = train(other, World{}, mode);
    const double difference = relative_difference(run.weights_path, plain.weights_path);
    std::cout << "[tiny_dit] " << tag << " " << variant << ": weights within " << difference << " of the plain run\n";
    EXPECT_LT(difference, 1e-5) << variant;
    for (size_t i = 0; i < plain.losses.size(); ++i) EXPECT_NEAR(run.losses[i], plain.losses[i], 1e-5 * plain.losses[i]) << variant;
  }
}

// Block swap moves weights between host and device and nothing else: with it on, one process trains bit for bit as
// with it off. Both run the blocks in the engine (--sharding full, which on one rank keeps each block whole), so the
// weights the optimizer steps are laid out alike.
TEST_P(TinyDitTraining, BlockSwapChangesNoBit) {
  const TrainMode mode = GetParam();
  const std::string tag = mode == TrainMode::network ? "lora" : "full";
  auto run_args = [&](const std::string& variant, int64_t blocks_to_swap) {
    TrainArgs args = tiny_dit_run(variant + "_" + tag, mode, swappable_config());
    args.max_train_steps = 4;
    args.sharding = "full";
    args.blocks_to_swap = blocks_to_swap;
    return args;
  };
  const TrainSummary resident = train(run_args("resident", 0), World{}, mode);
  for (int64_t k : {1, 2}) {
    const TrainSummary swapped = train(run_args(fmt::format("swap{}", k), k), World{}, mode);
    EXPECT_EQ(swapped.losses, resident.losses) << "--blocks_to_swap " << k;
    EXPECT_TRUE(bitwise_equal(swapped.weights_path, resident.weights_path)) << "--blocks_to_swap " << k;
  }
}

INSTANTIATE_TEST_SUITE_P(Modes, TinyDitTraining, ::testing::Values(TrainMode::network, TrainMode::whole_model),
                         [](const auto& info) { return info.param == TrainMode::network ? "lora" : "full"; });

TEST(TinyDitFamily, IsRecognisedFromItsCheckpointAndRefusesTooManySwappedBlocks) {
  TrainArgs args = tiny_dit_run("recognised", TrainMode::network, swappable_config());
  EXPECT_EQ(family_of_checkpoint(std::nullopt, *args.pretrained_model_name_or_path), "tiny_dit");
  args.blocks_to_swap = 4;  // 2 of the 3 double blocks: one would be left on the device
  args.max_train_steps = 1;
  try {
    train(args, World{}, TrainMode::network);
    FAIL() << "expected --blocks_to_swap 4 to be refused";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--blocks_to_swap"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("at most 1"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace sdt
