// Training on a CUDA device through the same trainer, against the CPU and against itself. Skipped where LibTorch sees
// no CUDA device (ctest reports them as skipped); bench/gpu/check.sh runs them on a GPU machine.
//
// A GPU run draws every random number the CPU run draws (noise, timesteps, VAE samples come from the host's keyed
// streams), so with TF32 off the two differ only in the order of float sums (cuBLAS/cuDNN against oneDNN): about
// 1e-6 relative per op, a few times that through the model's depth; 1e-4 relative bounds it with room.
#include <gtest/gtest.h>

#include <filesystem>

#include <torch/cuda.h>
#include <torch/torch.h>

#include "src/train/trainer.h"
#include "tests/families/tiny_dit/tiny_dit.h"
#include "tests/train/toy_dataset.h"
#include "tests/train/weight_files.h"

namespace sdt {
namespace {

namespace fs = std::filesystem;
using testing_support::bitwise_equal;
using testing_support::relative_difference;

class CudaTraining : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!torch::cuda::is_available() || torch::cuda::device_count() == 0) GTEST_SKIP() << "skipped: no CUDA device";
    at::globalContext().setAllowTF32CuBLAS(false);
    at::globalContext().setAllowTF32CuDNN(false);
  }
  void TearDown() override {
    at::globalContext().setAllowTF32CuBLAS(false);  // PyTorch's defaults
    at::globalContext().setAllowTF32CuDNN(true);
  }
};

TrainArgs sd_lora_run(const std::string& tag, const std::string& device) {
  const fs::path root = fs::path(testing::TempDir()) / ("sdt_cuda_sd_" + tag);
  fs::remove_all(root);
  TrainArgs args = testing_support::tiny_lora_run(root, SDT_FIXTURES "/sd/sd1");
  args.device = device;
  return args;
}

// One step of SGD with Nesterov momentum moves each weight by -1.9 lr times its gradient, so after one step the
// lora_up weights (zero before it) are the gradients up to that factor: comparing them compares the LoRA gradients of
// the U-Net and the text encoder. lora_down receives none in the first step (lora_up is zero) and stays at its
// initialisation, which both runs draw on the host.
TEST_F(CudaTraining, OneFp32StepGivesTheLossAndLoraGradientsOfTheCpu) {
  TrainArgs cpu = sd_lora_run("step_cpu", "cpu"), gpu = sd_lora_run("step_gpu", "cuda");
  for (TrainArgs* args : {&cpu, &gpu}) {
    args->max_train_steps = 1;
    args->optimizer_type = "SGDNesterov";
    args->learning_rate = 1.0;
    args->max_grad_norm = 0;
  }
  const TrainSummary on_cpu = train(cpu, World{}, TrainMode::network), on_gpu = train(gpu, World{}, TrainMode::network);
  ASSERT_EQ(on_gpu.losses.size(), 1u);
  EXPECT_NEAR(on_gpu.losses[0], on_cpu.losses[0], 1e-4 * on_cpu.losses[0]);
  const double gradients = relative_difference(on_gpu.weights_path, on_cpu.weights_path, "lora_up");
  std::cout << "[cuda] one step: loss " << on_gpu.losses[0] << " (CPU " << on_cpu.losses[0] << "), LoRA gradients within "
            << gradients << "\n";
  EXPECT_LT(gradients, 1e-4);
  EXPECT_LT(relative_difference(on_gpu.weights_path, on_cpu.weights_path, "lora_down"), 1e-6);  // untouched: equal init
}

TrainArgs tiny_dit_run(const std::string& tag, TrainMode mode) {
  tiny_dit::TinyDitConfig config;  // blocks enough to swap 2: 1 of the 3 double blocks and 2 of the 4 single ones
  config.double_blocks = 3;
  config.single_blocks = 4;
  TrainArgs args = tiny_dit::toy_run((fs::path(testing::TempDir()) / ("sdt_cuda_dit_" + tag)).string(), mode, config);
  args.device = "cuda";
  return args;
}

// bf16 autocast on the GPU trains: the loss of the last 20 of 120 steps is below 0.8 of the first 20's, as the CPU
// test of the same run asserts (tests/families/test_tiny_dit.cpp).
TEST_F(CudaTraining, Bf16AutocastLowersTheLoss) {
  TrainArgs args = tiny_dit_run("bf16", TrainMode::network);
  args.mixed_precision = "bf16";
  args.max_train_steps = 120;
  const TrainSummary summary = train(args, World{}, TrainMode::network);
  const auto [first, last] = testing_support::loss_trend(summary.losses, "[cuda] bf16");
  EXPECT_LT(last, 0.8 * first);
}

// kohya's --fp8_base on the device: the tiny FLUX's transformer and, on CUDA, its text encoders (CLIP-L and T5, their
// embeddings and T5's norms kept in bf16) stored in fp8, widened by CUDA's autocast (norms in fp32); a LoRA of the
// transformer and CLIP-L trains and its loss falls (last 20 of 60 steps below the first 20's), with 2 blocks swapped.
TEST_F(CudaTraining, Fp8BaseWithFp8TextEncodersTrainsAFluxLora) {
  const fs::path root = fs::path(testing::TempDir()) / "sdt_cuda_flux_fp8";
  fs::remove_all(root);
  TrainArgs args = testing_support::tiny_flux_run(root);
  args.device = "cuda";
  args.mixed_precision = "bf16";
  args.fp8_base = true;
  args.network_train_unet_only = false;
  args.gradient_checkpointing = true;
  args.blocks_to_swap = 2;
  args.learning_rate = 1e-2;
  args.max_train_steps = 60;
  const TrainSummary summary = train(args, World{}, TrainMode::network);
  const auto [first, last] = testing_support::loss_trend(summary.losses, "[cuda] FLUX fp8 base");
  EXPECT_LT(last, first);
  fs::remove_all(root);
}

// Block swap on the device moves block weights between pinned host memory and the GPU on a copy stream and changes
// no bit: with the engine in both runs (--sharding full, whole blocks on one rank), swap 2 equals swap 0, for LoRA
// and for full fine-tuning.
TEST_F(CudaTraining, BlockSwapOnTheDeviceChangesNoBit) {
  for (const TrainMode mode : {TrainMode::network, TrainMode::whole_model}) {
    const std::string tag = mode == TrainMode::network ? "lora" : "full";
    auto run = [&](int64_t blocks_to_swap) {
      TrainArgs args = tiny_dit_run(tag + "_swap" + std::to_string(blocks_to_swap), mode);
      args.max_train_steps = 4;
      args.sharding = "full";
      args.blocks_to_swap = blocks_to_swap;
      return train(args, World{}, mode);
    };
    const TrainSummary resident = run(0), swapped = run(2);
    EXPECT_EQ(swapped.losses, resident.losses) << tag;
    EXPECT_TRUE(bitwise_equal(swapped.weights_path, resident.weights_path)) << tag;
  }
}

// The memory plan counts the tensors a rank holds for the whole run (weights, gradients, optimizer state, buffers);
// the allocator's peak adds the step's activations and rounds each block up (512 bytes; the tiny models have a few
// thousand tensors). For the tiny DiT at 64x64, batch 2, that is within 64 MiB above the plan, and never below it.
TEST_F(CudaTraining, TheAllocatorsPeakIsThePlanPlusActivations) {
  TrainArgs args = tiny_dit_run("memory", TrainMode::network);
  args.max_train_steps = 2;
  const TrainSummary summary = train(args, World{}, TrainMode::network);
  std::cout << "[cuda] plan " << summary.planned_bytes << " bytes, allocator peak " << summary.device_peak_bytes << "\n";
  EXPECT_GE(summary.device_peak_bytes, summary.planned_bytes);
  EXPECT_LE(summary.device_peak_bytes, summary.planned_bytes + (int64_t{64} << 20));
}

}  // namespace
}  // namespace sdt
