// `sdt train` / `sdt train_db` on N ranks (run under mpiexec -np 2 and -np 3; also runs as one process, where
// the comparisons are trivial): N ranks with batch b train exactly like one process with batch N*b and like one
// process with batch b accumulating N micro-steps, and so do N ranks with --sharding optimizer (ZeRO-1) and
// --sharding gradients (ZeRO-2, with accumulation): the same losses and final weights within 1e-5 relative (fp32).
// Only rank 0 writes files. States written by 2 ranks (the np2 job) resume on 3 (the np3 job), also in another
// sharding mode, and end where an uninterrupted run ends.
#include <gtest/gtest.h>
#include <mpi.h>

#include <cstring>
#include <filesystem>
#include <functional>
#include <fstream>

#include <fmt/format.h>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include "cluster/world.h"
#include "src/core/safetensors.h"
#include "src/core/tensor_io.h"
#include "src/train/trainer.h"
#include "tests/families/tiny_dit/tiny_dit.h"
#include "tests/train/toy_dataset.h"
#include "tests/run_tests_on_every_rank.h"

namespace sdt {
namespace {

namespace fs = std::filesystem;

const World* the_world = nullptr;

void barrier() {
  if (the_world->size > 1) MPI_Barrier(MPI_COMM_WORLD);
}

// Two 32x32 images (one bucket), 6 repeats: 12 samples per epoch, a whole number of updates of 4 and of 6 samples.
fs::path make_dataset(const fs::path& root) {
  if (the_world->rank == 0) testing_support::make_toy_dataset(root, 6);
  barrier();
  return root / "train";
}

fs::path scratch(const std::string& name) { return fs::path(testing::TempDir()) / ("sdt_dist_" + name); }

// The tiny SD 1.x model unless `model` names another fixture model (SDXL's).
TrainArgs tiny_run(const fs::path& root, TrainMode mode, const std::string& model = SDT_FIXTURES "/sd/sd1") {
  TrainArgs args;
  args.pretrained_model_name_or_path = model;
  args.tokenizer = SDT_FIXTURES "/sd/sampling/tokenizer";
  args.train_data_dir = make_dataset(root).string();
  args.resolution = "32";
  args.output_name = "toy";
  args.network_module = "networks.lora";
  args.network_dim = 4;
  args.network_alpha = 4;
  args.learning_rate = mode == TrainMode::network ? 2e-3 : 1e-4;
  args.lr_scheduler = "cosine";
  args.max_train_steps = 4;
  args.seed = 7;
  args.max_data_loader_n_workers = 1;
  args.multires_noise_iterations = 2;  // the Python-random stream too
  args.noise_offset = 0.05;
  args.ddp_bucket_mb = 1;              // several buckets
  args.check_replicas_every_n_steps = 1;  // the replicas stay identical
  return args;
}

// The largest difference between the two files' weights, relative to their largest weight (all tensors as one
// vector: Adam's normalised steps turn the ~1e-7 rounding of a mean of means into larger relative changes of weights
// that are near zero, so a per-tensor ratio measures those, not a fault). The per-tensor worst is printed.
double max_relative_difference(const std::string& a, const std::string& b) {
  safetensors::File fa(a), fb(b);
  EXPECT_EQ(fa.tensors().size(), fb.tensors().size());
  double largest_difference = 0, largest_weight = 1e-12, worst_tensor = 0;
  std::string worst_name;
  for (const auto& t : fa.tensors()) {
    if (t.name.ends_with(".alpha")) continue;  // constants, not trained
    const at::Tensor x = load_tensor(fa, t.name).to(at::kDouble), y = load_tensor(fb, t.name).to(at::kDouble);
    const double difference = (x - y).abs().max().item<double>(), weight = y.abs().max().item<double>();
    largest_difference = std::max(largest_difference, difference);
    largest_weight = std::max(largest_weight, weight);
    if (difference / std::max(weight, 1e-12) > worst_tensor) {
      worst_tensor = difference / std::max(weight, 1e-12);
      worst_name = t.name;
    }
  }
  std::cout << "  largest weight difference " << largest_difference << " of largest weight " << largest_weight
            << "; worst single tensor " << worst_name << " " << worst_tensor << " of its largest\n";
  return largest_difference / largest_weight;
}

void expect_same_losses(const std::vector<double>& a, const std::vector<double>& b, const char* what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  for (size_t i = 0; i < a.size(); ++i) EXPECT_NEAR(a[i], b[i], 1e-5 * std::abs(b[i])) << what << ", step " << i + 1;
}

// Rank r's output folder; only rank 0's may hold files afterwards.
void expect_only_rank0_wrote(const fs::path& root) {
  const fs::path mine = root / fmt::format("rank{}", the_world->rank);
  size_t files = 0;
  if (fs::exists(mine)) {
    for (const auto& e : fs::recursive_directory_iterator(mine)) files += e.is_regular_file();
  }
  if (the_world->rank == 0) {
    EXPECT_GT(files, 0u);
  } else {
    EXPECT_EQ(files, 0u) << "rank " << the_world->rank << " wrote into " << mine;
  }
}

void expect_ranks_train_like_one_process(TrainMode mode, const std::string& tag,
                                         const std::string& model = SDT_FIXTURES "/sd/sd1",
                                         const std::function<void(TrainArgs&)>& configure = {}) {
  const World& world = *the_world;
  const fs::path root = scratch(tag);
  if (world.rank == 0) fs::remove_all(root);
  barrier();
  TrainArgs args = tiny_run(root, mode, model);
  if (configure) configure(args);
  args.train_batch_size = 2;
  args.output_dir = (root / fmt::format("rank{}", world.rank)).string();
  const TrainSummary ranks = train(args, world, mode);
  barrier();
  expect_only_rank0_wrote(root);
  if (world.rank == 0) {
    TrainArgs whole = args;
    whole.train_batch_size = 2 * world.size;
    whole.output_dir = (root / "whole").string();
    const TrainSummary one = train(whole, World{}, mode);
    TrainArgs accumulating = args;
    accumulating.gradient_accumulation_steps = world.size;
    accumulating.output_dir = (root / "accumulating").string();
    const TrainSummary accumulated = train(accumulating, World{}, mode);

    expect_same_losses(ranks.losses, one.losses, "N ranks vs one process with batch N*b");
    expect_same_losses(accumulated.losses, one.losses, "accumulation vs one process with batch N*b");
    const double ranks_vs_one = max_relative_difference(ranks.weights_path, one.weights_path);
    const double accumulated_vs_one = max_relative_difference(accumulated.weights_path, one.weights_path);
    std::cout << tag << " on " << world.size << " ranks: max relative weight difference to one process " << ranks_vs_one
              << ", accumulation to one process " << accumulated_vs_one << "\n";
    EXPECT_LT(ranks_vs_one, 1e-5);
    EXPECT_LT(accumulated_vs_one, 1e-5);
  }
  barrier();
  // The sharded modes against plain data parallel with the same ranks and batches. ZeRO-2 accumulates 2
  // micro-steps of batch 1 (it reduce-scatters every micro-step); a bucket per tensor cuts tensors across the
  // ranks' shards. Full sharding gathers every U-Net block (with the LoRA merged into it) as it runs.
  for (const char* sharding : {"optimizer", "gradients", "full"}) {
    TrainArgs sharded = args;
    sharded.ddp_bucket_mb = 0;
    if (sharded.sharding = sharding; sharded.sharding == "gradients") {
      sharded.train_batch_size = 1;
      sharded.gradient_accumulation_steps = 2;
    }
    TrainArgs plain = sharded;
    plain.sharding = "none";
    plain.output_dir = (root / fmt::format("plain_{}_rank{}", sharding, world.rank)).string();
    const TrainSummary reference = sharded.gradient_accumulation_steps == 1 ? ranks : train(plain, world, mode);
    sharded.output_dir = (root / fmt::format("{}_rank{}", sharding, world.rank)).string();
    if (sharded.sharding == "full") {  // rank 0 samples from blocks it gathers for the moment
      const fs::path prompts = root / fmt::format("prompts{}.txt", world.rank);
      std::ofstream(prompts) << "a red square --w 32 --h 32 --s 2 --d 5\n";
      sharded.sample_prompts = prompts.string();
      sharded.sample_every_n_steps = 2;
    }
    const TrainSummary zero = train(sharded, world, mode);
    if (sharded.sample_prompts) {
      size_t images = 0;
      if (fs::exists(fs::path(sharded.output_dir.value()) / "sample")) {
        for (const auto& e : fs::directory_iterator(fs::path(sharded.output_dir.value()) / "sample")) images += e.path().extension() == ".png";
      }
      if (world.rank == 0) {
        EXPECT_GE(images, 2u) << "samples at steps 2 and 4";
      } else {
        EXPECT_EQ(images, 0u) << "only rank 0 samples";
      }
    }
    if (world.rank == 0) {
      expect_same_losses(zero.losses, reference.losses, sharding);
      const double difference = max_relative_difference(zero.weights_path, reference.weights_path);
      std::cout << tag << " on " << world.size << " ranks with --sharding " << sharding
                << ": max relative weight difference to plain data parallel " << difference << "\n";
      EXPECT_LT(difference, 1e-5) << sharding;
    }
    barrier();
  }
}

TEST(DistributedTrainer, LoraOnNRanksEqualsOneProcess) { expect_ranks_train_like_one_process(TrainMode::network, "lora"); }
TEST(DistributedTrainer, FullFineTuneOnNRanksEqualsOneProcess) { expect_ranks_train_like_one_process(TrainMode::whole_model, "full"); }

// SDXL through the same trainer: two text encoders, the size conditioning of each sample, the SGM file. The LoRA runs
// with SGD: AdamW moves a weight whose gradient is near its eps by up to lr whatever the rounding of that gradient, and
// the tiny SDXL's LoRA has many such gradients in its first steps (its lora_up start at zero), so that summing a
// batch's gradient in another order moves weights by up to 7e-5 of the largest (SD's tests cover AdamW); with SGD
// N ranks and every sharding mode give one process's weights within 5e-8 of the largest.
TEST(DistributedTrainer, SdxlLoraOnNRanksEqualsOneProcess) {
  expect_ranks_train_like_one_process(TrainMode::network, "sdxl_lora", SDT_FIXTURES "/sdxl/sdxl_a", [](TrainArgs& args) {
    args.optimizer_type = "SGDNesterov";
    args.learning_rate = 0.05;
  });
}
TEST(DistributedTrainer, SdxlFullFineTuneOnNRanksEqualsOneProcess) {
  expect_ranks_train_like_one_process(TrainMode::whole_model, "sdxl_full", SDT_FIXTURES "/sdxl/sdxl_a");
}

// kohya's --fused_backward_pass (sdxl_train.py): Adafactor steps each weight inside backward, as soon as its gradient
// averaged over the ranks is in (in finish(), bucket by bucket), each clipped by its own norm. N ranks give what one
// process gives with the whole global batch.
TEST(DistributedTrainer, SdxlFusedBackwardPassOnNRanksEqualsOneProcess) {
  const World& world = *the_world;
  const fs::path root = scratch("sdxl_fused");
  if (world.rank == 0) fs::remove_all(root);
  barrier();
  TrainArgs args = tiny_run(root, TrainMode::whole_model, SDT_FIXTURES "/sdxl/sdxl_a");
  args.optimizer_type = "Adafactor";
  args.optimizer_args = {"relative_step=False", "scale_parameter=False"};
  args.lr_scheduler = "constant";
  args.fused_backward_pass = true;
  args.max_grad_norm = 0.05;  // every tensor clipped by its own norm
  args.train_batch_size = 2;
  args.output_dir = (root / fmt::format("rank{}", world.rank)).string();
  const TrainSummary ranks = train(args, world, TrainMode::whole_model);
  if (world.rank == 0) {
    TrainArgs whole = args;
    whole.train_batch_size = 2 * world.size;
    whole.output_dir = (root / "whole").string();
    const TrainSummary one = train(whole, World{}, TrainMode::whole_model);
    expect_same_losses(ranks.losses, one.losses, "fused steps: N ranks vs one process with batch N*b");
    const double difference = max_relative_difference(ranks.weights_path, one.weights_path);
    std::cout << "sdxl_fused on " << world.size << " ranks: max relative weight difference to one process " << difference << "\n";
    EXPECT_LT(difference, 1e-5);
  }
  barrier();
}

// `args` (--sharding full with --blocks_to_swap, its output folder under `root`) on this job's ranks against one plain
// process with the whole global batch (no sharding, no swap): the same losses, weights within 1e-5 of the largest.
void expect_sharded_swapped_ranks_train_like_one_process(TrainArgs args, TrainMode mode, const fs::path& root, const std::string& tag) {
  const World& world = *the_world;
  args.output_dir = (root / fmt::format("{}_rank{}", tag, world.rank)).string();
  const TrainSummary ranks = train(args, world, mode);
  if (world.rank == 0) {
    TrainArgs one = args;
    one.sharding = "none";
    one.blocks_to_swap = 0;
    one.train_batch_size = world.size;
    one.output_dir = (root / (tag + "_one")).string();
    const TrainSummary single = train(one, World{}, mode);
    expect_same_losses(ranks.losses, single.losses, tag.c_str());
    const double difference = max_relative_difference(ranks.weights_path, single.weights_path);
    std::cout << tag << " on " << world.size << " fully sharded, swapping ranks: max relative weight difference to one "
              << "process " << difference << "\n";
    EXPECT_LT(difference, 1e-5);
  }
  barrier();
}

// The second family, the tiny DiT (flow matching, blocks of several tensors, LoRA adapters inside its blocks), on N
// ranks with --sharding full and --blocks_to_swap 2 together (1 of 3 double blocks and 2 of 4 single blocks on the
// host) trains like one plain process with the whole global batch, LoRA and full fine-tuning. (Small
// lrs: AdamW moves a weight whose gradient is near zero by up to lr whatever the rounding of that gradient, and N ranks
// sum a batch's gradient in another order than one process.)
TEST(DistributedTrainer, TinyDitFullyShardedAndSwappedOnNRanksEqualsOneProcess) {
  const World& world = *the_world;
  if (world.size == 1) GTEST_SKIP() << "needs several ranks";
  tiny_dit::register_family();
  const fs::path root = scratch("tiny_dit");
  if (world.rank == 0) {
    fs::remove_all(root);
    tiny_dit::TinyDitConfig config;
    config.double_blocks = 3;
    config.single_blocks = 4;
    tiny_dit::write_checkpoint((root / "model").string(), config, 3, SDT_FIXTURES "/sd/sd1");
    testing_support::make_toy_dataset(root, 6, 64);
  }
  barrier();
  for (TrainMode mode : {TrainMode::network, TrainMode::whole_model}) {
    TrainArgs args = tiny_dit::training_args((root / "model").string(), (root / "train").string(), mode);
    args.max_train_steps = 4;
    args.seed = 7;
    args.sharding = "full";
    args.blocks_to_swap = 2;
    args.learning_rate = mode == TrainMode::network ? 1e-3 : 2e-5;
    expect_sharded_swapped_ranks_train_like_one_process(args, mode, root, mode == TrainMode::network ? "tiny_dit_lora" : "tiny_dit_full");
  }
}

// FLUX.1 (the tiny fixture) on N ranks with --sharding full and --blocks_to_swap 2 together (1 of 3 double blocks and
// 2 of 4 single blocks on the host, a rank swapping only its shard) trains like one plain process with the whole global
// batch: a LoRA of the transformer and CLIP-L, and full fine-tuning of the transformer. The LoRA runs with SGD, as
// SDXL's does and for the same reason: AdamW's normalised first steps of the zero lora_up weights turn the ~1e-7
// rounding of a gradient summed in another order into differences of up to 6e-5 of the largest weight.
TEST(DistributedTrainer, FluxFullyShardedAndSwappedOnNRanksEqualsOneProcess) {
  const World& world = *the_world;
  if (world.size == 1) GTEST_SKIP() << "needs several ranks";
  const fs::path root = scratch("flux");
  if (world.rank == 0) fs::remove_all(root);
  barrier();
  for (TrainMode mode : {TrainMode::network, TrainMode::whole_model}) {
    TrainArgs args = tiny_run(root, mode);
    testing_support::use_tiny_flux(args);
    args.sharding = "full";
    args.blocks_to_swap = 2;
    if (mode == TrainMode::network) args.optimizer_type = "SGDNesterov";
    args.learning_rate = mode == TrainMode::network ? 0.05 : 2e-5;
    expect_sharded_swapped_ranks_train_like_one_process(args, mode, root, mode == TrainMode::network ? "flux_lora" : "flux_full");
  }
}

// One image with 5 repeats to train on and one held out: with N ranks x batch 1 the last global batch of an epoch
// is short and some ranks' shares of it are empty, as are all but one rank's shares of the validation batch. Those
// ranks still run the model on an empty batch (sharded models gather in forward and backward), and each rank's mean
// weighs by its share: N ranks train and validate like one process with batch N, plain and fully sharded.
TEST(DistributedTrainer, EmptySharesOfShortBatchesTrainLikeOneProcess) {
  const World& world = *the_world;
  if (world.size == 1) GTEST_SKIP() << "needs several ranks";
  const fs::path root = scratch("short");
  if (world.rank == 0) {
    fs::remove_all(root);
    const fs::path dir = root / "train" / "5_toy";
    fs::create_directories(dir);
    for (int i = 0; i < 2; ++i) {
      cv::Mat m(32, 32, CV_8UC3, cv::Scalar(40 + 150 * i, 60, 220 - 150 * i));
      cv::rectangle(m, cv::Rect(4 + 14 * i, 8, 10, 10), cv::Scalar(250, 250, 250), cv::FILLED);
      cv::imwrite((dir / fmt::format("{}.png", i)).string(), m);
      std::ofstream(dir / fmt::format("{}.txt", i)) << "a square number " << i;
    }
  }
  barrier();
  for (const char* sharding : {"none", "full"}) {
    TrainArgs args = tiny_run(root, TrainMode::whole_model);
    args.train_data_dir = (root / "train").string();
    args.train_batch_size = 1;
    args.max_train_steps = 0;
    args.max_train_epochs = 1;
    args.validation_split = 0.5;
    args.validate_every_n_steps = 1;
    args.sharding = sharding;
    args.output_dir = (root / fmt::format("{}_rank{}", sharding, world.rank)).string();
    const TrainSummary ranks = train(args, world, TrainMode::whole_model);
    if (world.rank == 0) {
      TrainArgs one = args;
      one.sharding = "none";
      one.train_batch_size = world.size;
      one.output_dir = (root / fmt::format("{}_one", sharding)).string();
      const TrainSummary single = train(one, World{}, TrainMode::whole_model);
      expect_same_losses(ranks.losses, single.losses, sharding);
      ASSERT_EQ(ranks.validation_losses.size(), single.validation_losses.size());
      for (size_t i = 0; i < single.validation_losses.size(); ++i) {
        EXPECT_NEAR(ranks.validation_losses[i].second, single.validation_losses[i].second, 1e-5 * single.validation_losses[i].second);
      }
      const double difference = max_relative_difference(ranks.weights_path, single.weights_path);
      std::cout << "short batches with empty shares on " << world.size << " ranks (--sharding " << sharding
                << "): max relative weight difference to one process " << difference << "\n";
      EXPECT_LT(difference, 1e-5);
    }
    barrier();
  }
}

// The np2 job trains 2 steps of a 4-step run with 2 ranks x batch 3 and saves its state where the np3 job finds
// it; the np3 job resumes it on 3 ranks x batch 2 (the same 6 samples per update), in another sharding mode when
// asked, and compares the end with one uninterrupted process of batch 6.
void expect_two_rank_state_resumes_on_three(TrainMode mode, const char* written_with, const char* resumed_with,
                                            const std::string& tag) {
  const World& world = *the_world;
  if (world.size != 2 && world.size != 3) GTEST_SKIP() << "runs in the np2 (writes) and np3 (resumes) jobs";
  const fs::path root = scratch("resume_" + tag);
  const fs::path hand_over = fs::path(SDT_BINARY_DIR) / ("distributed_resume_state_" + tag);
  if (world.rank == 0 && world.size == 2) {
    fs::remove_all(root);
    fs::remove_all(hand_over);
  }
  barrier();
  TrainArgs args = tiny_run(root, mode);
  args.train_batch_size = 6 / world.size;
  if (world.size == 2) {
    args.max_train_steps = 4;
    args.save_every_n_steps = 2;
    args.save_state = true;
    args.sharding = written_with;
    args.output_dir = (root / "two").string();
    train(args, world, mode);
    barrier();
    if (world.rank == 0) fs::copy(root / "two" / "toy-step00000002-state", hand_over);
    barrier();
    return;
  }
  if (!fs::exists(hand_over / "train_state.json")) GTEST_SKIP() << "the np2 job has not written " << hand_over;
  args.resume = hand_over.string();
  args.sharding = resumed_with;
  args.output_dir = (root / fmt::format("three{}", world.rank)).string();
  const TrainSummary resumed = train(args, world, mode);
  EXPECT_EQ(resumed.first_step, 2);
  if (world.rank == 0) {
    TrainArgs straight = args;
    straight.resume.reset();
    straight.sharding = "none";
    straight.train_batch_size = 6;
    straight.output_dir = (root / "straight").string();
    const TrainSummary one = train(straight, World{}, mode);
    ASSERT_EQ(resumed.losses.size(), 2u);
    expect_same_losses(resumed.losses, {one.losses[2], one.losses[3]}, "resumed on 3 ranks vs uninterrupted");
    const double difference = max_relative_difference(resumed.weights_path, one.weights_path);
    std::cout << tag << ": written by 2 ranks (--sharding " << written_with << "), resumed on 3 (--sharding "
              << resumed_with << "): max relative weight difference to an uninterrupted run " << difference << "\n";
    EXPECT_LT(difference, 1e-5);
  }
  barrier();
}

TEST(DistributedTrainer, AStateOfTwoRanksResumesOnThree) {
  expect_two_rank_state_resumes_on_three(TrainMode::network, "none", "none", "lora");
}
TEST(DistributedTrainer, AZeroTwoLoraStateResumesOnThreeRanksWithZeroOne) {
  expect_two_rank_state_resumes_on_three(TrainMode::network, "gradients", "optimizer", "lora_zero");
}
TEST(DistributedTrainer, AZeroOneFullFineTuneStateResumesOnThreeRanksWithZeroTwo) {
  expect_two_rank_state_resumes_on_three(TrainMode::whole_model, "optimizer", "gradients", "full_zero");
}
TEST(DistributedTrainer, AFullyShardedLoraStateResumesOnThreeRanks) {
  expect_two_rank_state_resumes_on_three(TrainMode::network, "full", "full", "lora_fsdp");
}
TEST(DistributedTrainer, AFullyShardedFineTuneStateResumesOnThreeRanks) {
  expect_two_rank_state_resumes_on_three(TrainMode::whole_model, "full", "full", "full_fsdp");
}

}  // namespace
}  // namespace sdt

int main(int argc, char** argv) {
  sdt::DistributedSession session;
  sdt::the_world = &session.world();
  ::testing::InitGoogleTest(&argc, argv);
  return sdt::run_tests_on_every_rank(session);
}
