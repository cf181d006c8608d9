// The training loop's step time, split into data, forward, backward, communication and optimizer, for the demo's
// configuration (tiny SD 1.x model from tests/fixtures, U-Net LoRA dim 8, AdamW, batch 4 of 64x64 images), and the
// same work as a bare LibTorch loop (fixed tensors, no loader, no logs): the difference is the trainer's overhead.
// Prints figures; asserts nothing.
//   bench_train_step <source dir> [steps=60] [rounds=3]
#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <random>

#include <fmt/format.h>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>
#include <torch/torch.h>

#include "src/families/family.h"
#include "src/networks/lora.h"
#include "src/train/make_optimizer.h"
#include "src/train/trainer.h"

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

namespace {

// 32 images of 64x64: coloured backgrounds with a bright square somewhere, each with a caption.
fs::path make_images(const fs::path& root) {
  const fs::path dir = root / "1_bench";
  fs::create_directories(dir);
  std::mt19937 rng(0);
  for (int i = 0; i < 32; ++i) {
    cv::Mat m(64, 64, CV_8UC3, cv::Scalar(rng() % 256, rng() % 256, rng() % 256));
    cv::rectangle(m, cv::Rect(rng() % 40, rng() % 40, 20, 20), cv::Scalar(250, 250, 250), cv::FILLED);
    cv::imwrite((dir / fmt::format("{:02d}.png", i)).string(), m);
    std::ofstream(dir / fmt::format("{:02d}.txt", i)) << "a square, number " << i;
  }
  return root;
}

sdt::TrainArgs demo_args(const fs::path& source, const fs::path& work, int64_t steps) {
  sdt::TrainArgs args;
  args.pretrained_model_name_or_path = (source / "tests/fixtures/sd/sd1").string();
  args.tokenizer = (source / "tests/fixtures/sd/sampling/tokenizer").string();
  args.train_data_dir = (work / "images").string();
  args.resolution = "64";
  args.train_batch_size = 4;
  args.output_dir = (work / "out").string();
  args.network_module = "networks.lora";
  args.network_dim = 8;
  args.network_alpha = 8;
  args.network_train_unet_only = true;
  args.learning_rate = 3e-3;
  args.max_train_steps = steps;
  args.seed = 42;
  args.max_data_loader_n_workers = 1;
  args.log_time_every_n_steps = 0;
  return args;
}

// The trainer's work per step with nothing around it: VAE encode, text encode, noise, the denoiser with its LoRA,
// loss, backward, AdamW step, on one fixed batch, through the family's hooks.
double bare_seconds_per_step(const sdt::TrainArgs& args, int64_t steps) {
  std::unique_ptr<sdt::Family> family = sdt::load_family_for_training(args);
  const sdt::ModelBundle& bundle = family->models();
  for (const auto& m : {bundle.denoiser, bundle.vae, bundle.text_encoders.at(0)}) {
    m->eval();
    for (auto& p : m->parameters()) p.requires_grad_(false);
  }
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(42);
  sdt::LoRANetwork network(sdt::parse_lora_network_args(args.network_dim, args.network_alpha, std::nullopt, {}),
                           family->network_targets(false), false, true, gen);
  network->train();
  std::vector<sdt::ParamGroup> groups;
  for (const auto& g : network->prepare_optimizer_params({}, std::nullopt, args.learning_rate)) groups.push_back({g.params, g.lr});
  sdt::MadeOptimizer made = sdt::make_optimizer(args, groups);
  const std::unique_ptr<sdt::TrainingObjective> objective = family->make_objective(args);
  const at::Tensor images = torch::rand({4, 3, 64, 64}) * 2 - 1;
  const std::vector<std::string> captions(4, "a square, number 1");
  auto python_random = std::make_shared<std::mt19937_64>(0);
  const sdt::SampleRandoms randoms = [&](int64_t) {
    return sdt::SampleRandom{gen, [python_random] { return std::uniform_real_distribution<double>(0.0, 1.0)(*python_random); }};
  };
  const auto start = Clock::now();
  for (int64_t i = 0; i < steps; ++i) {
    at::Tensor latents;
    sdt::Conditioning conditioning;
    {
      torch::NoGradGuard no_grad;
      latents = family->latents_caching_strategy().encode(images, false, sdt::LatentSampling::sample, gen).latents;
      conditioning = family->text_encoding_strategy().encode(family->tokenize_strategy().tokenize(captions, false));
    }
    const sdt::NoisedBatch noised = objective->noise(latents, randoms);
    const at::Tensor loss = objective->loss(family->predict(noised, conditioning), noised, torch::ones({4}), std::nullopt);
    loss.backward();
    torch::nn::utils::clip_grad_norm_(groups.at(0).params, args.max_grad_norm);
    made.optimizer->step();
    made.optimizer->zero_grad();
  }
  return std::chrono::duration<double>(Clock::now() - start).count() / static_cast<double>(steps);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    fmt::print(stderr, "usage: bench_train_step <source dir> [steps=60] [rounds=3]\n");
    return 2;
  }
  const fs::path source = argv[1];
  const int64_t steps = argc > 2 ? std::stoll(argv[2]) : 60;
  const int rounds = argc > 3 ? std::stoi(argv[3]) : 3;
  const fs::path work = fs::temp_directory_path() / "sdt_bench_train_step";
  fs::remove_all(work);
  make_images(work / "images");
  const sdt::TrainArgs args = demo_args(source, work, steps);
  fmt::print("demo configuration: tiny SD 1.x, U-Net LoRA dim 8, AdamW, batch 4 of 64x64, {} steps, {} threads\n", steps,
             at::get_num_threads());
  std::vector<double> trainer_totals, bare_totals;
  for (int r = 0; r < rounds; ++r) {
    const sdt::TrainSummary summary = sdt::train(args, sdt::World{}, sdt::TrainMode::network);
    const sdt::StepTimes& t = summary.times;
    const double n = static_cast<double>(t.steps);
    fmt::print("round {} trainer ms/step: data {:.2f}  forward {:.2f}  backward {:.2f}  communication {:.2f}  "
               "optimizer {:.2f}  total {:.2f}\n",
               r + 1, 1e3 * t.data / n, 1e3 * t.forward / n, 1e3 * t.backward / n, 1e3 * t.communication / n,
               1e3 * t.optimizer / n, 1e3 * t.total() / n);
    trainer_totals.push_back(t.total() / n);
    bare_totals.push_back(bare_seconds_per_step(args, steps));
    fmt::print("round {} bare LibTorch loop ms/step: {:.2f}\n", r + 1, 1e3 * bare_totals.back());
  }
  const double trainer = *std::min_element(trainer_totals.begin(), trainer_totals.end());
  const double bare = *std::min_element(bare_totals.begin(), bare_totals.end());
  fmt::print("best of {}: trainer {:.2f} ms/step, bare loop {:.2f} ms/step, trainer overhead {:+.1f}%\n", rounds, 1e3 * trainer,
             1e3 * bare, 100.0 * (trainer / bare - 1.0));
  fs::remove_all(work);
  return 0;
}
