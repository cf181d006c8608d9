// One LoRA training step of an SD 1.x U-Net from cached latents (no VAE, no text encoder): LoRA on the U-Net's
// Transformer2D layers as kohya's networks.lora, DDPM noise and timesteps, MSE loss, backward, AdamW. Prints the step
// time split (forward, backward, optimizer), the peak of live tensor bytes and the process's peak RSS. Asserts nothing.
// bench/bench_lora_step_kohya.py runs the same step with kohya's networks/lora.py on diffusers' U-Net and prints the
// same lines, so the two can be set side by side on one machine.
//   bench_lora_step [full|small] [steps=3] [threads=2] [batch=1] [dim=16] [resolution=512] [profile]
// profile: the last step also prints how its time splits over the dense kernels (convolution, attention, matrix
// products, forward and backward) and everything else; the kohya script prints the same split.
// full: SD 1.5's U-Net (860 M parameters, random weights, torch's default init after torch.manual_seed(0));
// small: the same layout with block_out_channels (64, 128, 256, 256).
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <map>
#include <set>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <torch/csrc/autograd/profiler_kineto.h>
#include <torch/torch.h>

#include "src/parallel/memory_plan.h"
#include "src/families/sd/sd_family.h"
#include "src/models/unet.h"
#include "src/networks/lora.h"
#include "src/objectives/ddpm.h"
#include "src/train/make_optimizer.h"

using Clock = std::chrono::steady_clock;

namespace {

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

double peak_rss_gib() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return static_cast<double>(usage.ru_maxrss) / (1024.0 * 1024.0);  // ru_maxrss is in KiB
}

// The kernel class of an ATen op, or nullptr for "other". Classes are counted where they start, not inside each other.
const char* kernel_class(const std::string& op) {
  if (op == "aten::convolution" || op == "aten::convolution_backward") return "convolution";
  if (op.rfind("aten::_scaled_dot_product", 0) == 0) return "attention";
  if (op == "aten::addmm" || op == "aten::mm" || op == "aten::bmm") return "matrix products";
  return nullptr;
}

void print_kernel_split(const torch::autograd::profiler::ProfilerResult& result, double step_seconds) {
  std::vector<const torch::autograd::profiler::KinetoEvent*> events;
  for (const auto& e : result.events()) events.push_back(&e);
  std::sort(events.begin(), events.end(), [](auto* a, auto* b) { return a->startNs() < b->startNs(); });
  std::map<uint64_t, uint64_t> counted_until;  // per thread: end of the last counted event, so nested ops are skipped
  std::map<std::string, double> seconds;
  for (const auto* e : events) {
    const char* cls = kernel_class(e->name());
    if (cls == nullptr || e->startNs() < counted_until[e->startThreadId()]) continue;
    counted_until[e->startThreadId()] = e->endNs();
    seconds[cls] += static_cast<double>(e->durationNs()) * 1e-9;
  }
  double dense = 0;
  for (const auto& [cls, s] : seconds) {
    fmt::print("  {:<16} {:6.2f} s\n", cls, s);
    dense += s;
  }
  fmt::print("  dense kernels {:.2f} s of the profiled step's {:.2f} s ({:.0f} %)\n", dense, step_seconds,
             100 * dense / step_seconds);
}

}  // namespace

int main(int argc, char** argv) {
  const std::string size = argc > 1 ? argv[1] : "full";
  const int64_t steps = argc > 2 ? std::stoll(argv[2]) : 3;
  const int threads = argc > 3 ? std::stoi(argv[3]) : 2;
  const int64_t batch = argc > 4 ? std::stoll(argv[4]) : 1;
  const int64_t dim = argc > 5 ? std::stoll(argv[5]) : 16;
  const int64_t resolution = argc > 6 ? std::stoll(argv[6]) : 512;
  const bool profile = argc > 7 && std::string(argv[7]) == "profile";
  at::set_num_threads(threads);
  sdt::CpuTensorMeter::install();

  sdt::UNetConfig config = sdt::UNetConfig::sd1();
  if (size == "small") config.block_out_channels = {64, 128, 256, 256};
  torch::manual_seed(0);
  sdt::UNet2DConditionModel unet(config);
  unet->eval();
  for (auto& p : unet->parameters()) p.requires_grad_(false);
  int64_t parameters = 0;
  for (const auto& p : unet->parameters()) parameters += p.numel();

  sdt::LoRANetwork network(sdt::parse_lora_network_args(dim, static_cast<double>(dim) / 2, std::nullopt, {}),
                           sdt::sd_network_targets(nullptr, unet, false), false, true, at::make_generator<at::CPUGeneratorImpl>(0));
  network->train();
  int64_t lora_parameters = 0;
  std::vector<sdt::ParamGroup> groups;
  for (const auto& g : network->prepare_optimizer_params({}, std::nullopt, 1e-4)) {
    groups.push_back({g.params, g.lr});
    for (const auto& p : g.params) lora_parameters += p.numel();
  }
  // lora_up starts at zero; random values make the step's arithmetic that of a trained LoRA.
  {
    torch::NoGradGuard no_grad;
    for (auto& lora : network->unet_loras) lora->lora_up_weight().normal_(0, 0.01);
  }
  sdt::TrainArgs args;
  args.optimizer_type = "AdamW";
  args.learning_rate = 1e-4;
  sdt::MadeOptimizer made = sdt::make_optimizer(args, groups);
  const sdt::DdpmSchedule schedule = sdt::make_ddpm_schedule(false);
  const sdt::DdpmOptions ddpm = sdt::ddpm_options_from_args(args);

  const int64_t side = resolution / 8;
  const at::Tensor latents = torch::randn({batch, 4, side, side}) * 0.18215;
  const at::Tensor context = torch::randn({batch, 77, config.cross_attention_dim});
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(1);
  fmt::print("sdt LoRA step: U-Net {} ({:.1f} M parameters), LoRA dim {} on {} layers ({:.2f} M parameters), batch {} of "
             "{}x{} latents, AdamW, fp32, {} threads\n",
             size, static_cast<double>(parameters) / 1e6, dim, network->unet_loras.size(), static_cast<double>(lora_parameters) / 1e6,
             batch, side, side, threads);

  sdt::CpuTensorMeter::reset_peak();
  namespace profiler = torch::autograd::profiler;
  const profiler::ProfilerConfig profiler_config(profiler::ProfilerState::KINETO);
  const std::set<torch::profiler::impl::ActivityType> cpu_only{torch::profiler::impl::ActivityType::CPU};
  for (int64_t step = 0; step < steps; ++step) {
    const bool profiled = profile && step == steps - 1;
    if (profiled) {
      profiler::prepareProfiler(profiler_config, cpu_only);
      profiler::enableProfiler(profiler_config, cpu_only);
    }
    auto t = Clock::now();
    const sdt::NoisedLatents noised = sdt::noise_latents(schedule, latents, ddpm.noise, gen, [] { return 0.5; });
    const at::Tensor pred = unet->forward(noised.noisy_latents, noised.timesteps, context);
    const at::Tensor loss = at::mse_loss(pred, noised.noise);
    const double forward = seconds_since(t);
    t = Clock::now();
    loss.backward();
    const double backward = seconds_since(t);
    t = Clock::now();
    made.optimizer->step();
    made.optimizer->zero_grad();
    const double optimizer = seconds_since(t);
    fmt::print("step {}: forward {:.2f} s, backward {:.2f} s, optimizer {:.3f} s, total {:.2f} s, loss {:.4f}\n", step + 1,
               forward, backward, optimizer, forward + backward + optimizer, loss.item<double>());
    if (profiled) print_kernel_split(*profiler::disableProfiler(), forward + backward + optimizer);
  }
  fmt::print("peak live tensor bytes {:.2f} GiB; peak RSS {:.2f} GiB\n",
             static_cast<double>(sdt::CpuTensorMeter::peak_bytes()) / (1u << 30), peak_rss_gib());
  return 0;
}
