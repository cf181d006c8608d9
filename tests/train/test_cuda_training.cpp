// Training on a CUDA device through the same trainer: `--device cuda` against `--device cpu` on the same run, for the
// SD U-Net (LoRA, DDPM) and the tiny DiT (LoRA and full fine-tuning, flow matching, full sharding and block swap
// through the block engine). Skipped where LibTorch sees no CUDA device (ctest reports them as skipped).
//
// Both runs draw every random number on the host (noise, timesteps, VAE samples), so they differ only by the
// arithmetic: TF32 is turned off here so the GPU computes in fp32 as the CPU does, and what remains is the order of
// float sums (cuBLAS/cuDNN against oneDNN), about 1e-6 relative per op. Over a few AdamW steps a weight whose
// gradient is near zero moves by up to lr whatever its rounding, so the tolerance on the weights is 1e-4 relative to
// the largest weight at the learning rates below, and 1e-4 relative on each step's loss.
#include <gtest/gtest.h>

#include <filesystem>

#include <torch/cuda.h>
#include <torch/torch.h>

#include "src/core/safetensors.h"
#include "src/core/tensor_io.h"
#include "src/train/trainer.h"
#include "tests/families/tiny_dit/tiny_dit.h"
#include "tests/train/toy_dataset.h"

namespace sdt {
namespace {

namespace fs = std::filesystem;

bool has_cuda() { return torch::cuda::is_available() && torch::cuda::device_count() > 0; }

class CudaTraining : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!has_cuda()) GTEST_SKIP() << "skipped: no CUDA device";
    at::globalContext().setAllowTF32CuBLAS(false);
    at::globalContext().setAllowTF32CuDNN(false);
  }
};

// The largest difference between two weight files, relative to the largest weight.
double relative_difference(const std::string& a, const std::string& b) {
  safetensors::File fa(a), fb(b);
  double difference = 0, largest = 1e-12;
  for (const auto& t : fa.tensors()) {
    if (t.name.ends_with(".alpha")) continue;
    const at::Tensor x = load_tensor(fa, t.name).to(at::kDouble), y = load_tensor(fb, t.name).to(at::kDouble);
    difference = std::max(difference, (x - y).abs().max().item<double>());
    largest = std::max(largest, y.abs().max().item<double>());
  }
  return difference / largest;
}

void expect_same_run(const TrainSummary& gpu, const TrainSummary& cpu, const std::string& what) {
  ASSERT_EQ(gpu.losses.size(), cpu.losses.size()) << what;
  for (size_t i = 0; i < cpu.losses.size(); ++i) EXPECT_NEAR(gpu.losses[i], cpu.losses[i], 1e-4 * cpu.losses[i]) << what << " step " << i;
  const double difference = relative_difference(gpu.weights_path, cpu.weights_path);
  std::cout << "[cuda] " << what << ": weights within " << difference << " of the CPU run\n";
  EXPECT_LT(difference, 1e-4) << what;
}

TrainArgs sd_lora_run(const std::string& tag) {
  const fs::path root = fs::path(testing::TempDir()) / ("sdt_cuda_sd_" + tag);
  fs::remove_all(root);
  TrainArgs args;
  args.pretrained_model_name_or_path = SDT_FIXTURES "/sd/sd1";
  args.tokenizer = SDT_FIXTURES "/sd/sampling/tokenizer";
  args.train_data_dir = testing_support::make_toy_dataset(root, 4).string();
  args.resolution = "32";
  args.output_dir = (root / "out").string();
  args.output_name = "toy";
  args.network_module = "networks.lora";
  args.network_dim = 4;
  args.network_alpha = 4;
  args.learning_rate = 1e-3;
  args.max_train_steps = 6;
  args.train_batch_size = 2;
  args.seed = 1;
  args.max_data_loader_n_workers = 1;
  return args;
}

TEST_F(CudaTraining, SdLoraTrainsOnTheGpuAsOnTheCpu) {
  TrainArgs cpu = sd_lora_run("cpu"), gpu = sd_lora_run("gpu");
  cpu.device = "cpu";
  gpu.device = "cuda";
  expect_same_run(train(gpu, World{}, TrainMode::network), train(cpu, World{}, TrainMode::network), "SD LoRA");
}

TrainArgs tiny_dit_run(const std::string& tag, TrainMode mode) {
  tiny_dit::register_family();
  const fs::path root = fs::path(testing::TempDir()) / ("sdt_cuda_dit_" + tag);
  fs::remove_all(root);
  tiny_dit::TinyDitConfig config;
  config.double_blocks = 3;
  config.single_blocks = 4;
  tiny_dit::write_checkpoint((root / "model").string(), config, 3, SDT_FIXTURES "/sd/sd1");
  TrainArgs args = tiny_dit::training_args((root / "model").string(), testing_support::make_toy_dataset(root, 4, 64).string(), mode);
  args.output_dir = (root / "out").string();
  args.output_name = "toy";
  args.train_batch_size = 2;
  args.model_prediction_type = "raw";
  args.max_train_steps = 6;
  if (mode == TrainMode::whole_model) args.learning_rate = 2e-5;
  return args;
}

TEST_F(CudaTraining, TinyDitTrainsOnTheGpuAsOnTheCpuWithShardingAndSwap) {
  for (const TrainMode mode : {TrainMode::network, TrainMode::whole_model}) {
    const std::string tag = mode == TrainMode::network ? "lora" : "full";
    TrainArgs cpu = tiny_dit_run("cpu_" + tag, mode);
    cpu.device = "cpu";
    const TrainSummary reference = train(cpu, World{}, mode);
    for (const std::string variant : {"plain", "sharding_swap"}) {
      TrainArgs gpu = tiny_dit_run(variant + "_" + tag, mode);
      gpu.device = "cuda";
      if (variant == "sharding_swap") {
        gpu.sharding = "full";
        gpu.blocks_to_swap = 2;  // block masters in pinned host memory, copied in on the engine's copy stream
      }
      expect_same_run(train(gpu, World{}, mode), reference, "tiny DiT " + tag + " " + variant);
    }
  }
}

}  // namespace
}  // namespace sdt
