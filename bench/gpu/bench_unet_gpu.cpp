// SD 1.5's U-Net (860 M parameters, random weights) on a CUDA device: forward + backward of every weight under bf16
// autocast at 512x512 (64x64 latents), batch 4, context 77 x 768; the median over iterations after warm-up, and the
// caching allocator's peak. bench/gpu/bench_unet_gpu.py times diffusers' U-Net of the same configuration in PyTorch
// eager on the same card and counts the step's FLOPs; bench/gpu/check.sh sets both side by side with MFU.
//   bench_unet_gpu [iterations=10] [batch=4]
#include <algorithm>
#include <chrono>
#include <string>
#include <vector>

#include <ATen/DeviceAccelerator.h>
#include <fmt/format.h>
#include <torch/cuda.h>

#include "src/models/unet.h"
#include "src/train/precision.h"

using Clock = std::chrono::steady_clock;

int main(int argc, char** argv) {
  const int iterations = argc > 1 ? std::stoi(argv[1]) : 10;
  const int64_t batch = argc > 2 ? std::stoll(argv[2]) : 4;
  if (!torch::cuda::is_available()) {
    fmt::print("bench_unet_gpu: no CUDA device\n");
    return 77;
  }
  const c10::Device device(c10::kCUDA, 0);
  torch::manual_seed(0);
  sdt::UNet2DConditionModel unet(sdt::UNetConfig::sd1());
  unet->to(device);
  int64_t parameters = 0;
  for (const auto& p : unet->parameters()) parameters += p.numel();
  const auto on_device = at::TensorOptions(at::kFloat).device(device);
  const at::Tensor latents = torch::randn({batch, 4, 64, 64}, on_device);
  const at::Tensor timesteps = torch::randint(0, 1000, {batch}, on_device.dtype(at::kLong));
  const at::Tensor context = torch::randn({batch, 77, 768}, on_device);

  std::vector<double> step_ms;
  at::accelerator::resetPeakStats(0);
  for (int i = 0; i < iterations + 3; ++i) {
    unet->zero_grad(true);
    at::accelerator::synchronizeDevice(0);
    const auto t0 = Clock::now();
    {
      sdt::AutocastScope autocast(at::kBFloat16, c10::kCUDA);
      const at::Tensor loss = unet->forward(latents, timesteps, context).to(at::kFloat).square().mean();
      loss.backward();
    }
    at::accelerator::synchronizeDevice(0);
    if (i >= 3) step_ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
  }
  std::sort(step_ms.begin(), step_ms.end());
  const auto stats = at::accelerator::getDeviceStats(0);
  const auto all = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
  fmt::print("libtorch U-Net SD1.5 ({:.1f} M parameters), batch {} x 4 x 64 x 64, bf16 autocast: forward + backward "
             "{:.2f} ms (median of {}), peak {:.0f} MiB allocated\n",
             static_cast<double>(parameters) / 1e6, batch, step_ms[step_ms.size() / 2], iterations,
             static_cast<double>(stats.allocated_bytes[all].peak) / 1048576.0);
  return 0;
}
