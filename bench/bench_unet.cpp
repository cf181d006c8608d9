// Forward and forward + backward time of one SD1-style U-Net in LibTorch, to set beside PyTorch's on the same CPU
// (bench/bench_unet_pytorch.py builds the same model with diffusers and prints the same lines). Prints figures;
// asserts nothing.
//   bench_unet [iterations=7] [threads=1,2]
// The model: block_out_channels (64, 128, 128), 2 layers per block, cross-attention at the first two levels, 8 heads,
// context 768 x 77 tokens, batch 2 of 4 x 32 x 32 latents; default initialisation after torch.manual_seed(0).
#include <algorithm>
#include <chrono>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "src/core/text.h"
#include "src/models/unet.h"

using Clock = std::chrono::steady_clock;

double milliseconds_since(Clock::time_point t) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t).count();
}

double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  const size_t n = values.size();
  return n % 2 == 1 ? values[n / 2] : (values[n / 2 - 1] + values[n / 2]) / 2;
}

int main(int argc, char** argv) {
  const int iterations = argc > 1 ? std::stoi(argv[1]) : 7;
  std::vector<int> thread_counts;
  for (const std::string& n : sdt::split(argc > 2 ? argv[2] : "1,2", ',')) thread_counts.push_back(std::stoi(n));

  sdt::UNetConfig config;
  config.block_out_channels = {64, 128, 128};
  config.down_attention = {true, true, false};
  config.up_attention = {false, true, true};
  config.num_heads = {8, 8, 8};
  torch::manual_seed(0);
  sdt::UNet2DConditionModel unet(config);
  int64_t parameters = 0;
  for (const auto& p : unet->parameters()) parameters += p.numel();

  const at::Tensor latents = torch::randn({2, 4, 32, 32});  // (B, C, h, w)
  const at::Tensor timesteps = torch::tensor({10, 700});     // (B)
  const at::Tensor context = torch::randn({2, 77, 768});     // (B, S, D)
  fmt::print("libtorch U-Net: {:.1f} M parameters, batch 2 x 4 x 32 x 32, context 77 x 768, median of {} after 2 "
             "warm-up\n", static_cast<double>(parameters) / 1e6, iterations);

  for (const int threads : thread_counts) {
    at::set_num_threads(threads);
    std::vector<double> forward_ms, train_ms;
    for (int i = 0; i < iterations + 2; ++i) {
      {
        torch::NoGradGuard no_grad;
        const auto t0 = Clock::now();
        unet->forward(latents, timesteps, context);
        if (i >= 2) forward_ms.push_back(milliseconds_since(t0));
      }
      unet->zero_grad();
      const auto t0 = Clock::now();
      unet->forward(latents, timesteps, context).square().mean().backward();
      if (i >= 2) train_ms.push_back(milliseconds_since(t0));
    }
    fmt::print("libtorch threads {}: forward {:.1f} ms, forward + backward {:.1f} ms\n", threads, median(forward_ms),
               median(train_ms));
  }
  return 0;
}
